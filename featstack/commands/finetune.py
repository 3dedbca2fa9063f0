"""`featstack finetune NET --data PHOTOS [--epochs 5] [--freeze top-2] ...`: fine-tune an exported
network (linear probe, then fine-tune), keeping the best epoch."""
from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "finetune", help="fine-tune an exported network on images",
        description="Train a network from `featstack export` end to end: its head starts from the "
                    "scikit-learn solution; the top backbone groups train at a lower learning rate; "
                    "the best epoch by validation accuracy is saved as a network folder.")
    p.add_argument("network", help="network folder (from `featstack export`)")
    p.add_argument("--data", required=True,
                   help="image folder, CSV/JSONL manifest or 'demo'; its val split (else a seeded part "
                        "of train, --val-fraction) is used for evaluation")
    p.add_argument("--out", default=None, help="output network folder (default: NETWORK-ft)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--freeze", default="top-2",
                   help="head-only | top-N (top N parameter groups of each backbone train) | none "
                        "(default top-2)")
    p.add_argument("--lr", type=float, default=1e-3, help="head learning rate (default 1e-3)")
    p.add_argument("--backbone-lr-scale", type=float, default=0.1,
                   help="backbone learning rate = lr x this (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--warmup", type=float, default=0.0,
                   help="fraction of the steps with a linear learning-rate warm-up before the cosine "
                        "decay (default 0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast precision (auto: bf16/fp16 on a GPU, fp32 on a CPU)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out part of train when the data has no val split (default 0.1)")
    p.add_argument("--bn", choices=["frozen", "train"], default="frozen",
                   help="BatchNorm statistics: frozen (default: every BatchNorm keeps the statistics the "
                        "head was fitted on) or train (trainable groups update theirs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: cores - 1, at most 4)")
    p.add_argument("--init-from-source-classifier", action="store_true",
                   help="initialise head rows of classes whose names match the backbone's pretrained "
                        "ImageNet classes (or --source-classes) from its own classifier, rescaled to the "
                        "head's scale (single-backbone logreg/linear-svm)")
    p.add_argument("--source-classes", default=None, metavar="FILE",
                   help="the pretrained classifier's label list, one class name a line in row order "
                        "(default: ImageNet's, from the classifier's size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    return p


def run(args) -> int:
    import os

    from ..finetune import finetune

    out = args.out or (str(args.network).rstrip("/\\") + "-ft")
    workers = args.workers if args.workers is not None else max(0, min(4, (os.cpu_count() or 1) - 1))
    res = finetune(args.network, args.data, out=out, epochs=args.epochs, freeze=args.freeze, lr=args.lr,
                   backbone_lr_scale=args.backbone_lr_scale, weight_decay=args.weight_decay,
                   batch_size=args.batch_size, device=args.device, precision=args.precision,
                   init_from_source=args.init_from_source_classifier or bool(args.source_classes),
                   source_classes=args.source_classes, val_fraction=args.val_fraction,
                   seed=args.seed, workers=workers, bn=args.bn, warmup=args.warmup, progress=not args.no_progress)
    if res.init:
        print(f"head rows initialised from the {res.init['label_set']} classifier: "
              + ", ".join(f"{c} -> {m['description'].split(',')[0]}" for c, m in res.init["matched"].items()))
    for h in res.history:
        if h["epoch"] == 0:
            print(f"epoch 0  val acc {h['val_accuracy']:.4f}  (exported head)")
        else:
            print(f"epoch {h['epoch']}  train loss {h['train_loss']:.4f}  train acc {h['train_accuracy']:.4f}  "
                  f"val loss {h['val_loss']:.4f}  val acc {h['val_accuracy']:.4f}")
    print(f"best epoch {res.best_epoch} (val accuracy {res.best_val_accuracy:.4f}) saved to {res.out} "
          f"in {res.seconds:.1f} s")
    return 0
