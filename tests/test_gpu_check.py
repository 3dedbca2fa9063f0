"""benchmarks/gpu_check.py must not rot between the rare runs on a GPU machine: its --smoke
mode runs every section on the CPU (tiny models, tiny JPEGs) in a real subprocess."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_gpu_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["status"] == "ok"
    secs = res["sections"]
    assert {"env", "preprocess", "precision", "nvjpeg", "throughput"} <= set(secs)
    assert all(s["ok"] for s in secs.values()), {k: s.get("error") for k, s in secs.items()}
    for c in [*secs["preprocess"]["models"].values(), *secs["precision"]["models"].values(),
              *secs["nvjpeg"]["embeddings"].values()]:
        assert 0.9 < c["centred_min"] <= c["centred_mean"] <= 1.0 + 1e-9 and c["nn_hits"] == 1.0
    assert secs["nvjpeg"]["pixels"]["mean_abs_diff"] < 2.0
    tp = secs["throughput"]
    assert tp["featstack"]["images"] == res["settings"]["images"]
    assert tp["featstack_over_naive"] > 0 and 0 < tp["featstack_over_ceiling"]
    md = (out / "gpu_check.md").read_text()
    assert "featstack / ceiling" in md and "nvjpeg vs Pillow" in md
