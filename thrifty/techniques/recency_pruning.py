"""Recency pruning: E-RECAP's control, the same per-layer token counts as `token_pruning`, the newest tokens.

Example:
    >>> from thrifty.techniques import build
    >>> build("recency_pruning", keep_ratio=0.8).schedule
    'compound'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.techniques.base import DecisionContext, register
from thrifty.techniques.pruning_common import PruningTechnique


@register("recency_pruning")
@dataclass
class RecencyPruning(PruningTechnique):
    """Keeps the protected tokens and the newest prunable ones: the oldest history goes first."""

    def preference(self, ctx: DecisionContext, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        return rows.flip(0)  # rows are in position order
