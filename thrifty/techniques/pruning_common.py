"""What every token-pruning technique shares: the protected set, the per-layer budget, count-matched selection.

A pruning technique drops context tokens from the deeper layers during prefill (E-RECAP, "Embodied REplanning
with Cost-Aware Pruning", itself a reproduction of SDTP). After each *prune layer* l it keeps every protected
token and the `k_l` best prunable ones; a dropped token leaves the hidden states and the KV cache of every layer
deeper than l, keeps its original position everywhere, and decoding continues from that per-layer cache.

The techniques differ only in which prunable tokens they prefer (`PruningTechnique.preference`): a learned
scorer (`token_pruning`), a seeded random order (`random_pruning`), the newest first (`recency_pruning`); or in
what they keep for the same count (`sink_window`). The budget `k_l` comes from this module alone, so every
technique at the same settings processes the same number of tokens in every layer: the baselines are
token-count-matched by construction.

Protected (never dropped): the spans named in `protect` (default: the mission and the current observation with
the decision prompt), the first `sink_tokens` positions and the newest `recent_tokens` positions of the context.

Schedules (`schedule`, with `keep_ratio`):
- "compound" (E-RECAP's): each prune layer keeps the fraction `keep_ratio` of the prunable tokens still present,
  so after the j-th prune layer floor(...floor(P * keep_ratio)...) of the P prunable tokens remain (compounding);
- "work": `keep_ratio` is the target fraction of the prefill's token-layer work (query tokens summed over all layers,
  relative to no pruning); the compounding ratio that reaches it is solved per decision. When the protected
  tokens alone exceed the target, every prunable token goes at the first prune layer.

Caveats: pruning changes nothing when a context has no prunable token (a `PruningNoOpWarning` says so); the
realised work fraction is reported per decision, since protected tokens and integer counts move it from `keep_ratio`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from thrifty.techniques.base import DecisionContext, LayerHook, Technique, warn_once

SCHEDULES = ("compound", "work")
SPAN_NAMES = ("mission", "observation", "stable_prefix", "task", "role", "own_observation")


class PruningNoOpWarning(UserWarning):
    """A pruning setting that cannot drop anything (keep_ratio 1.0, or a context inside the protected window)."""


class PruneLayerError(ValueError):
    """Prune layers that do not exist in the model (or after which nothing is left to save)."""


def default_prune_layers(n_layers: int) -> tuple[int, ...]:
    """Prune layers derived from depth, generalising E-RECAP's `range(4, n_layers - 2, 3)` for 28 layers.

    First prune layer at about 1/7 of the depth (at least layer 1, so the scorer sees contextualised states),
    then every ~3/28 of the depth, stopping before the last two layers:
    6 layers -> (1, 2, 3); 12 -> (2, ..., 9); 28 -> (4, 7, ..., 25); 32 -> (5, 8, ..., 29).
    """
    if n_layers < 3:
        raise PruneLayerError(f"token pruning needs a model of at least 3 layers, this one has {n_layers}")
    start = max(1, round(n_layers / 7))
    step = max(1, round(3 * n_layers / 28))
    layers = tuple(range(start, n_layers - 2, step))
    return layers or (n_layers - 2,)


def check_prune_layers(layers, n_layers: int) -> tuple[int, ...]:
    """Validate explicit prune layers against the model depth: integers in [0, n_layers - 2], no duplicates."""
    out = tuple(sorted(int(x) for x in layers))
    if not out:
        raise PruneLayerError("prune layers must not be empty (use keep_ratio=1.0 for no pruning)")
    if len(set(out)) != len(out):
        raise PruneLayerError(f"prune layers {list(layers)} contain duplicates")
    bad = [x for x in out if not 0 <= x <= n_layers - 2]
    if bad:
        raise PruneLayerError(
            f"prune layers {bad} out of range for a {n_layers}-layer model: choose layers in 0..{n_layers - 2} "
            f"(pruning after the last layer saves nothing)"
        )
    return out


def protected_mask(positions: torch.Tensor, spans: dict[str, tuple[int, int]], protect: tuple[str, ...],
                   sink_tokens: int, recent_tokens: int, context_len: int) -> torch.Tensor:
    """BoolTensor [q]: which of the tokens at original `positions` [q] may never be dropped."""
    keep = (positions < sink_tokens) | (positions >= context_len - recent_tokens)
    for name in protect:
        if name in spans:
            start, end = spans[name]
            keep |= (positions >= start) & (positions < end)
    return keep


def keep_counts(n_prunable: int, n_protected: int, prune_layers: tuple[int, ...], n_layers: int,
                schedule: str, keep: float, max_kept: int | None = None) -> tuple[list[int], float]:
    """Prunable tokens kept after each prune layer, and the compounding ratio used.

    compound: k_j = floor(k_{j-1} * keep), k_{-1} = n_prunable. work: the ratio r whose compounded counts make
    sum_l (n_protected + tokens of layer l) closest to keep * n_layers * (n_protected + n_prunable) from below.
    max_kept (the token cap) then bounds every k_j.
    """
    kept, ratio = _ratio_counts(n_prunable, n_protected, prune_layers, n_layers, schedule, keep)
    return (kept if max_kept is None else [min(k, max_kept) for k in kept]), ratio


def _ratio_counts(n_prunable: int, n_protected: int, prune_layers: tuple[int, ...], n_layers: int,
                  schedule: str, keep: float) -> tuple[list[int], float]:
    """`keep_counts` before the cap."""
    def counts(r: float) -> list[int]:
        out, k = [], n_prunable
        for _ in prune_layers:
            k = int(math.floor(k * r + 1e-9))  # 1e-9: 350 * 0.7 is 244.99999..., it should give 245
            out.append(k)
        return out

    if schedule == "compound":
        return counts(keep), keep
    if schedule != "work":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    total = n_layers * (n_protected + n_prunable)
    target = keep * total

    def work(r: float) -> int:
        return layer_tokens(n_prunable, n_protected, prune_layers, n_layers, counts(r))

    if work(1.0) <= target:
        return counts(1.0), 1.0
    lo, hi = 0.0, 1.0  # work(lo) <= target < work(hi)
    if work(0.0) > target:
        return counts(0.0), 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if work(mid) <= target else (lo, mid)
    return counts(lo), lo


def layer_tokens(n_prunable: int, n_protected: int, prune_layers: tuple[int, ...], n_layers: int,
                 kept: list[int]) -> int:
    """Query tokens summed over all layers when `kept[j]` prunable tokens survive prune layer j."""
    total, present, j = 0, n_prunable, 0
    for layer in range(n_layers):
        total += n_protected + present
        if j < len(prune_layers) and prune_layers[j] == layer:
            present = kept[j]
            j += 1
    return total


@dataclass
class PruningTechnique(Technique):
    noop_settings: ClassVar[dict[str, Any]] = {"keep_ratio": 1.0}
    """Base of the token-pruning techniques: fields, validation, the prefill hook and the report.

    Subclasses say which prunable rows they prefer (`preference`), or override `select` to keep a different set
    of the same size.
    """

    keep_ratio: float = 0.6
    """compound: fraction of the present prunable tokens each prune layer keeps; work: target fraction of
    token-layer work. In (0, 1]; 1.0 is the no-op setting. 0.6 (compound, the planner's prune layers 1-3)
    saves ~39% of the shipped planner's prefill FLOPs on held-out contexts (docs/pruning.md); E-RECAP used 0.7"""
    schedule: str = "compound"
    """"compound" (E-RECAP's per-layer compounding ratio) or "work" (target overall token-layer work)"""
    layers: tuple[int, ...] | None = None
    """prune layers (a token dropped after layer l is absent from layers > l); None: derived from the depth"""
    sink_tokens: int = 4
    """the first positions of the context, never dropped"""
    recent_tokens: int = 16
    """the newest positions of the context, never dropped (>= 1: the last token's logits are needed)"""
    protect: tuple[str, ...] = ("mission", "observation")
    """context spans never dropped (names of DecisionContext.spans)"""
    max_kept: int | None = None
    """token budget: at most this many prunable tokens survive any prune layer (None: no cap). With a cap, the
    deep layers' cost per call stops growing with the context (only the protected spans and the layers before
    the first prune layer still grow); every technique gets the same capped counts"""

    def __post_init__(self) -> None:
        self._report: dict[str, Any] = {}
        r = self.keep_ratio
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0.0 < r <= 1.0:
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
        self.keep_ratio = float(self.keep_ratio)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = (self.layers,)
            self.layers = tuple(int(x) for x in self.layers)
            if any(x < 0 for x in self.layers):
                raise PruneLayerError(f"prune layers must be >= 0, got {list(self.layers)}")
        self.sink_tokens, self.recent_tokens = int(self.sink_tokens), int(self.recent_tokens)
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.recent_tokens < 1:
            raise ValueError(f"recent_tokens must be >= 1 (the final token is needed for the logits), "
                             f"got {self.recent_tokens}")
        if self.max_kept is not None:
            if isinstance(self.max_kept, bool) or not isinstance(self.max_kept, numbers.Integral) or self.max_kept < 0:
                raise ValueError(f"max_kept must be a whole number >= 0 (or None for no cap), got {self.max_kept!r}")
            self.max_kept = int(self.max_kept)
        if isinstance(self.protect, str):
            self.protect = (self.protect,)
        self.protect = tuple(self.protect)
        unknown = [p for p in self.protect if p not in SPAN_NAMES]
        if unknown:
            raise ValueError(f"protect names unknown spans {unknown}; known spans: {', '.join(SPAN_NAMES)}")
        if self.is_noop:
            warn_once((self.name, "noop_setting"), f"{self.name}: keep_ratio=1.0 drops nothing; this is the no-op "
                      "setting", PruningNoOpWarning, stacklevel=3)

    @property
    def is_noop(self) -> bool:
        """True when this setting can never drop a token (keep_ratio 1.0 and no token cap)."""
        return self.keep_ratio == 1.0 and self.max_kept is None

    # ------------------------------------------------------------------ what subclasses choose
    def preference(self, ctx: DecisionContext, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        """The prunable `rows` (LongTensor [p], indices into hidden [1, q, d]) reordered best first."""
        raise NotImplementedError

    def select(self, ctx: DecisionContext, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
               protected: torch.Tensor, n_keep: int) -> torch.Tensor:
        """Sorted rows to keep, exactly `n_keep` of them: every protected row and the best of `preference`."""
        rows = torch.nonzero(~protected).flatten()
        keep = protected.clone()
        k = n_keep - int(protected.sum())
        if k > 0:
            keep[self.preference(ctx, layer, hidden, positions, rows)[:k]] = True
        return torch.nonzero(keep).flatten()

    def prepare(self, n_layers: int) -> tuple[int, ...]:
        """Resolve (and check) the prune layers for a model of `n_layers`; subclasses may load things here."""
        return check_prune_layers(self.layers, n_layers) if self.layers is not None else default_prune_layers(
            n_layers)

    # ------------------------------------------------------------------ the hook
    def prefill_hook(self, ctx: DecisionContext, n_layers: int, new_from: int) -> LayerHook | None:
        layers = self.prepare(n_layers)
        self._report = {"prune_layers": list(layers)}
        if self.is_noop:
            return None
        context_len = int(ctx.token_ids.numel())
        state: dict[str, Any] = {}

        def hook(layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
            if layer not in layers:
                return None
            protected = protected_mask(positions.cpu(), ctx.spans, self.protect, self.sink_tokens,
                                       self.recent_tokens, context_len)
            if not state:  # first prune layer: every new token is still present; fix the budget
                n_prot, n_pr = int(protected.sum()), int((~protected).sum())
                kept, ratio = keep_counts(n_pr, n_prot, layers, n_layers, self.schedule, self.keep_ratio,
                                          self.max_kept)
                work = layer_tokens(n_pr, n_prot, layers, n_layers, kept) / max(1, n_layers * (n_prot + n_pr))
                state.update(kept=kept, j=0, protected=n_prot)
                self._report.update(protected=n_prot, prunable=n_pr, kept=kept, ratio=round(ratio, 4),
                                    work=round(work, 4))
                if n_pr == 0:  # typically the first decisions of an episode: said once per process
                    warn_once((self.name, "all_protected"),
                              f"{self.name}: pruning was a no-op for a context with no token outside the protected "
                              f"spans {self.protect}, the first {self.sink_tokens} and the newest "
                              f"{self.recent_tokens} (short contexts, such as an episode's first decisions: their "
                              "reports say prunable=0). Shown once per process", PruningNoOpWarning, stacklevel=2)
            n_keep = state["protected"] + state["kept"][state["j"]]  # the same count for every technique
            state["j"] += 1
            if positions.numel() <= n_keep:
                return None
            return self.select(ctx, layer, hidden, positions, protected, n_keep)

        return hook

    def report(self) -> dict[str, Any]:
        """prune_layers; protected / prunable new tokens; kept: prunable tokens left after each prune layer;
        ratio: the compounding keep ratio used; work: realised fraction of token-layer work."""
        return dict(self._report)

    def reset(self) -> None:
        self._report = {}
