"""CPU cost of preprocessing alone (no forward pass): featstack's fast path vs timm's transform.

    python benchmarks/bench_preprocess.py [--backbones test_resnet,test_vit,resnet18]
        [--size 375x500] [--images 64] [--repeats 3]

Writes photo-like JPEGs of the given size (with sensor-like grain), then, on one thread, times
(process CPU time, best of ``--repeats``; robust to a busy machine) per image and all backbones:

  fast       ``featstack.preprocess.decode_for`` (one decode, timm's crop per backbone, uint8)
             + batched normalisation, as extraction runs it;
  reference  one full Pillow decode + ``timm.data.create_transform`` per backbone (what
             ``--preprocess reference`` runs).

Large sizes (e.g. 3024x4032) show the effect of reduced-scale JPEG decoding (DRAFT_GAP).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_images(root: Path, n: int, h: int, w: int) -> list:
    from PIL import Image

    from featstack.data import synthetic_photo

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = np.asarray(synthetic_photo(rng, max(16, h // 4), max(16, w // 4), hue=i))
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
        img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
        paths.append(root / f"{i:04d}.jpg")
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths


def best_seconds(fn, repeats: int, clock=time.process_time) -> float:
    """The best of ``repeats`` timings of ``fn()`` by ``clock`` (CPU time by default: on a
    shared, noisy machine it is what other jobs disturb least)."""
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="test_resnet,test_vit,resnet18")
    p.add_argument("--size", default="375x500", help="HxW of the generated JPEGs")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import timm
    import torch
    from PIL import Image

    from featstack.data import decode_image
    from featstack.preprocess import Normalizer, decode_for, recipes_for, reference_transform

    torch.set_num_threads(1)
    h, w = (int(v) for v in args.size.lower().split("x"))
    names = args.backbones.split(",")
    cfgs = {k: dict(timm.data.resolve_model_data_config(timm.create_model(k, pretrained=False, num_classes=0)))
            for k in names}
    recipes, fallback = recipes_for(cfgs)
    if fallback:
        sys.exit(f"not on the fast path: {fallback}")
    norm = {k: Normalizer(c) for k, c in cfgs.items()}
    refs = {k: reference_transform(c) for k, c in cfgs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images, h, w)

        def fast():
            items = [decode_for(f, recipes) for f in paths]
            for k in names:
                norm[k](torch.stack([torch.from_numpy(np.array(it[k])) for it in items]).permute(0, 3, 1, 2))

        def reference():
            for f in paths:
                img = Image.fromarray(decode_image(f))
                for t in refs.values():
                    t(img)

        res = {name: best_seconds(fn, args.repeats) / len(paths) * 1000 for name, fn in
               (("fast", fast), ("reference", reference))}
    print(f"{args.images} JPEGs {h}x{w}, backbones {','.join(names)}, one thread, CPU ms per image "
          f"(best of {args.repeats}):")
    for name, ms in res.items():
        print(f"  {name:10s} {ms:7.2f} ms   {1000 / ms:6.1f} img/s")
    print(f"  reference / fast = {res['reference'] / res['fast']:.2f}x")


if __name__ == "__main__":
    main()
