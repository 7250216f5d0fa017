"""Random token pruning: E-RECAP's control, the same per-layer token counts as `token_pruning`, random tokens.

Example:
    >>> from thrifty.techniques import build
    >>> t = build("random_pruning", keep_ratio=0.7, seed=3)
    >>> t.settings()["keep_ratio"]
    0.7
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.techniques.base import DecisionContext, register
from thrifty.techniques.pruning_common import PruningTechnique


@register("random_pruning")
@dataclass
class RandomPruning(PruningTechnique):
    """Keeps the protected tokens and a uniformly random subset of the prunable ones (count-matched baseline).

    The order is drawn per decision and prune layer from (decision seed, layer, `seed`): the same seed gives
    the same pruned tokens.
    """

    seed: int = 0
    """mixed into the per-decision seed; change it to draw other subsets"""

    def preference(self, ctx: DecisionContext, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        mixed = (int(ctx.seed) * 1_000_003 + int(layer)) * 1_000_033 + int(self.seed)
        g = torch.Generator().manual_seed(mixed % (2**63))
        return rows[torch.randperm(rows.numel(), generator=g)]
