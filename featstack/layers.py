"""Features of an intermediate layer (backbone keys ``ARCH@LAYER[:POOL]``), as a torch module.

Kept apart from :mod:`featstack.backbones` so that resolving and checking keys imports no torch.
"""
from __future__ import annotations

import torch


class IntermediateEmbedding(torch.nn.Module):
    """Pooled features of one intermediate stage/block of a timm model (``forward_intermediates``;
    the layers above it are pruned away)."""

    def __init__(self, model: torch.nn.Module, index: int, pool: str):
        super().__init__()
        self.model, self.index, self.pool = model, int(index), pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "cls":
            _, prefix = self.model.forward_intermediates(x, indices=[self.index], intermediates_only=True,
                                                         return_prefix_tokens=True)[0]
            return prefix[:, 0]
        feat = self.model.forward_intermediates(x, indices=[self.index], intermediates_only=True)[0]
        if self.pool == "avg":
            return feat.mean((2, 3))
        if self.pool == "max":
            return feat.amax((2, 3))
        return 0.5 * (feat.mean((2, 3)) + feat.amax((2, 3)))

    def group_matcher(self, coarse: bool = False):
        """The inner model's parameter groups (for fine-tuning's freeze policy)."""
        from timm.models import group_parameters

        if not hasattr(self.model, "group_matcher"):
            from .backbones import _children_group_matcher
            return _children_group_matcher(self.model)(coarse)
        groups = group_parameters(self.model, self.model.group_matcher(coarse=coarse))
        table = {f"model.{n}": i for i, names in enumerate(groups.values()) for n in names}
        return lambda name: table.get(name, len(groups))
