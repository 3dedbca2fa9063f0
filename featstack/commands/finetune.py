"""`featstack finetune NET --data PHOTOS [--epochs 5] [--freeze top-2] ...`: fine-tune an exported
network (linear probe, then fine-tune), keeping the best epoch."""
from __future__ import annotations

import argparse

from ..config import FinetuneConfig, api_kwargs, from_args, stage_parser


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `featstack finetune`: its options are the fields of FinetuneConfig."""
    return stage_parser(
        sub, "finetune", FinetuneConfig, help="fine-tune an exported network on images",
        description="Train a network from `featstack export` end to end: its head starts from the "
                    "scikit-learn solution; the top backbone groups train at a lower learning rate; "
                    "the best epoch by validation accuracy is saved as a network folder.")


def default_out(network: str) -> str:
    """NETWORK-ft: where a fine-tuned network goes when no --out is given."""
    return str(network).rstrip("/\\") + "-ft"


def run(args) -> int:
    from ..finetune import finetune

    cfg = from_args(FinetuneConfig, args)
    cfg.out = cfg.out or default_out(cfg.network)
    res = finetune(**api_kwargs(cfg))
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
