"""Sink plus recent window (StreamingLLM, Xiao et al. 2023, "Efficient Streaming Language Models with Attention
Sinks"), token-count-matched to `token_pruning`: at each prune layer, as many tokens as the other pruning
techniques keep there, chosen as the first `sink_tokens` positions and the newest rest.

Unlike the other pruning techniques it honours no span: the mission survives only while it lies inside the
sink or the window. That is the point of the baseline (a context-agnostic window at the same cost).

Example:
    >>> from thrifty.techniques import build
    >>> build("sink_window", keep_ratio=0.7, sink_tokens=4).sink_tokens
    4
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from thrifty.techniques.base import DecisionContext, register
from thrifty.techniques.pruning_common import PruningTechnique


@register("sink_window")
@dataclass
class SinkWindow(PruningTechnique):
    """The first `sink_tokens` tokens and a recent window, as many tokens per layer as `token_pruning` keeps."""

    def select(self, ctx: DecisionContext, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
               protected: torch.Tensor, n_keep: int) -> torch.Tensor:
        q = int(positions.numel())
        sink = min(n_keep, int((positions < self.sink_tokens).sum()))  # rows are in position order
        keep = torch.zeros(q, dtype=torch.bool)
        keep[:sink] = True
        keep[q - (n_keep - sink):] = True
        return torch.nonzero(keep).flatten()

    def kept_cache_conflict(self) -> str | None:
        return ("its window is relative to the newest token of the whole context, but over a kept session cached "
                "entries never leave the window")
