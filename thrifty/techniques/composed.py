"""Composition: several techniques in one decision (e.g. prefix reuse with token pruning).

Rules (refused with a `CompositionError` naming the reason when they cannot hold):
- at most one part provides the session (overrides `open_session`, e.g. `prefix_reuse`); the others get it;
- the parts' layer hooks are chained after every layer: each sees the rows the previous ones kept;
- a part whose choice depends on the whole context (its `kept_cache_conflict()` gives a reason) cannot run over
  a kept session, and is refused when a session provider is present;
- a session provider with a prefix store gets a store namespace naming the other parts and their settings, so
  caches computed under different pruning policies never mix;
- at most one part exits early (`early_exit`); its exit hook, output and head FLOPs are the composition's. Over a
  kept session, an early-exited decision's new tokens stay out of the layers past its exit (as pruned tokens do).

Over a kept session, pruning never touches the stable prefix (cached entries are never rewritten: rewriting the
prefix is what destroys reuse in serving engines), and what it drops stays out of deeper layers' caches for every
later decision. When, is `prune_at`:
- "history" (default): the tokens appended for a decision (its observation and prompt) go through every layer
  for that decision; at the next decision, when they have become history, the hooks choose once, from the
  hidden states recorded at their prefill, which of them leave the deeper layers' caches. Later decisions
  attend over fewer keys; the current observation is always whole. Only settled history (the stable prefix) is
  shared through the prefix store.
- "prefill": the hooks prune the new tokens outside the stable prefix while they are prefilled (the current
  observation included, so the pruner must not protect it, e.g. `protect=("mission",)`).
Without a session provider, hooks run at prefill over the whole context as they would alone.
See docs/prefix_reuse.md for why "history" is the default and what each costs.

Settings: `techniques`, the part names in order (or `Technique` instances), `part_settings`, name -> that
part's settings, and `prune_at`. From a benchmark config:

    BenchConfig("reuse+random", "composed", {"techniques": ["prefix_reuse", "random_pruning"],
                                             "part_settings": {"random_pruning": {"keep_ratio": 0.7}}})

Example:
    >>> from thrifty.techniques import build
    >>> c = build("composed", techniques=["prefix_reuse", "full"], part_settings={"prefix_reuse": {"store_bytes": 0}})
    >>> [p.name for p in c.parts]
    ['prefix_reuse', 'full']
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from thrifty.techniques.base import DecisionContext, LayerHook, Technique, build, register

PRUNE_AT = ("history", "prefill")


class CompositionError(ValueError):
    """A combination of techniques that cannot work together."""


def provides_session(t: Technique) -> bool:
    """Whether the technique chooses the session itself (overrides `open_session`), e.g. prefix reuse."""
    return type(t).open_session is not Technique.open_session


def has_layer_hook(t: Technique) -> bool:
    return type(t).prefill_hook is not Technique.prefill_hook


def has_exit_hook(t: Technique) -> bool:
    return type(t).exit_hook is not Technique.exit_hook


def chain_hooks(hooks: list[LayerHook], protect_before: int | None = None) -> LayerHook:
    """One layer hook running `hooks` in order, each over the rows the previous ones kept.

    protect_before: rows at positions < protect_before are always kept and never shown to the hooks.
    Returns sorted row indices into the rows it was given (or None when all are kept).
    """

    def hook(layer: int, h: torch.Tensor, positions: torch.Tensor):
        q = positions.numel()
        rows = torch.arange(q, device=positions.device)
        fixed = rows[:0]
        if protect_before is not None:
            fixed, rows = rows[positions < protect_before], rows[positions >= protect_before]
        for fn in hooks:
            if rows.numel() == 0:
                break
            keep = fn(layer, h[:, rows], positions[rows])
            if keep is not None:
                rows = rows[torch.as_tensor(keep, dtype=torch.long, device=rows.device)]
        kept = torch.sort(torch.cat([fixed, rows])).values
        return None if kept.numel() == q else kept

    return hook


@dataclass
class _Pending:
    """New tokens of the last decision, to settle at the next: their positions [n] and hidden states per layer."""

    session: Any
    positions: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, d], the layer's output


@register("composed")
@dataclass
class Composed(Technique):
    """Several techniques in one decision: one session provider, layer hooks chained, conflicts refused."""

    noop_settings: ClassVar[dict[str, Any]] = {  # reuse is exact, so a kept session with keep 1.0 is the full model
        "techniques": ["prefix_reuse", "token_pruning"],
        "part_settings": {"prefix_reuse": {"store_bytes": 0}, "token_pruning": {"keep_ratio": 1.0}}}

    techniques: list = field(default_factory=lambda: ["full"])
    """the parts, in order: registered names (or Technique instances); the default, ["full"], is the no-op"""
    part_settings: dict = field(default_factory=dict)
    """name -> settings of that part (only for parts given by name)"""
    prune_at: str = "history"
    """over a kept session: "history" (hooks choose once, when new tokens become history, which leave the deep
    layers) or "prefill" (hooks prune the new tokens while they are prefilled); ignored without a session provider"""

    def __post_init__(self) -> None:
        if isinstance(self.techniques, str) or not self.techniques:
            raise CompositionError(f"composed needs a list of technique names, got {self.techniques!r}")
        if self.prune_at not in PRUNE_AT:
            raise CompositionError(f"prune_at must be one of {PRUNE_AT}, got {self.prune_at!r}")
        names = [t if isinstance(t, str) else getattr(t, "name", None) for t in self.techniques]
        unused = set(self.part_settings) - {n for n, t in zip(names, self.techniques) if isinstance(t, str)}
        if unused:
            raise CompositionError(f"settings given for {sorted(unused)}, which are not parts named in "
                                   f"techniques={names}")
        if "composed" in names:
            raise CompositionError("composed cannot contain composed: list the parts directly")
        if len(set(names)) != len(names):
            raise CompositionError(f"a technique appears twice in {names}")
        self.parts: list[Technique] = []
        for t in self.techniques:
            if isinstance(t, str):
                part = build(t, **self.part_settings.get(t, {}))
            elif isinstance(t, Technique):
                part = t
            else:
                raise CompositionError(f"a part must be a registered name or a Technique, got {t!r}")
            self.parts.append(part)
        providers = [p for p in self.parts if provides_session(p)]
        if len(providers) > 1:
            raise CompositionError(f"{[p.name for p in providers]} each provide the session; at most one can")
        self.provider = providers[0] if providers else None
        self.hooked = [p for p in self.parts if p is not self.provider and has_layer_hook(p)]
        exiting = [p for p in self.parts if has_exit_hook(p)]
        if len(exiting) > 1:
            raise CompositionError(f"{[p.name for p in exiting]} each decide where a decision's pass stops; at "
                                   "most one early exit can")
        self.exiting = exiting[0] if exiting else None
        if self.provider is not None:
            for p in self.parts:
                reason = p.kept_cache_conflict() if p is not self.provider else None
                if reason:
                    raise CompositionError(f"{p.name} cannot be combined with {self.provider.name}: {reason}")
            if self.hooked and self.prune_at == "history" and getattr(self.provider, "keep_session", True) is False:
                raise CompositionError(
                    f"prune_at='history' settles each decision's new tokens in the kept session at the next "
                    f"decision, but {self.provider.name} has keep_session=False, so nothing would ever be pruned: "
                    f"use prune_at='prefill' or keep_session=True")
            others = [{"name": p.name, **_plain(p.settings())} for p in self.parts if p is not self.provider]
            if hasattr(self.provider, "namespace") and others:
                self.provider.namespace = json.dumps({"prune_at": self.prune_at, "parts": others}, sort_keys=True)
            if hasattr(self.provider, "settled_only"):
                self.provider.settled_only = bool(self.hooked) and self.prune_at == "history"
        self._pending: _Pending | None = None
        self._recording: _Pending | None = None
        self._report: dict[str, Any] = {}

    @property
    def defers_pruning(self) -> bool:
        return self.provider is not None and bool(self.hooked) and self.prune_at == "history"

    # ------------------------------------------------------------------ hooks
    def open_session(self, backbone, ctx: DecisionContext):
        if self.provider is None:
            return super().open_session(backbone, ctx)
        session, new_from = self.provider.open_session(backbone, ctx)
        self._report = {}
        pending, self._pending = self._pending, None
        if self.defers_pruning and pending is not None and pending.session is session:
            self._settle(session, ctx, pending, backbone.n_layers, new_from)
        return session, new_from

    def _settle(self, session, ctx: DecisionContext, pending: _Pending, n_layers: int, new_from: int) -> None:
        """The last decision's new tokens are history now: run the hooks over them once, layer by layer, on the
        hidden states recorded at their prefill, and evict the dropped ones from the deeper layers' caches."""
        inside = pending.positions < new_from  # what the kept session still holds (all of it, normally)
        positions = pending.positions[inside]
        hook = chain_hooks([h for p in self.hooked if (h := p.prefill_hook(ctx, n_layers, new_from)) is not None])
        present = torch.arange(positions.numel())
        dropped_after: list[torch.Tensor] = []
        drops: dict[int, torch.Tensor] = {}
        for layer in range(n_layers):
            if dropped_after:
                drops[layer] = torch.cat(dropped_after)
            if present.numel() == 0 or layer not in pending.hidden:
                continue
            keep = hook(layer, pending.hidden[layer][inside][present][None], positions[present])
            if keep is not None:
                mask = torch.ones(present.numel(), dtype=torch.bool)
                mask[keep] = False
                dropped_after.append(positions[present[mask]])
                present = present[keep]
        evicted = session.drop_positions(drops)
        self._report = {"settled_tokens": int(positions.numel()),
                        "evicted_per_layer": [int(drops[l].numel()) if l in drops else 0 for l in range(n_layers)],
                        "evicted": evicted}

    def prefill_hook(self, ctx: DecisionContext, n_layers: int, new_from: int) -> LayerHook | None:
        if not self.hooked:
            return None
        if self.provider is None:
            return chain_hooks([h for p in self.hooked if (h := p.prefill_hook(ctx, n_layers, new_from)) is not None])
        stable_end = ctx.spans.get("stable_prefix", (0, 0))[1]
        if self.prune_at == "prefill":
            hooks = [h for p in self.hooked if (h := p.prefill_hook(ctx, n_layers, new_from)) is not None]
            return chain_hooks(hooks, protect_before=stable_end) if hooks else None
        self._recording = None

        def record(layer: int, h: torch.Tensor, positions: torch.Tensor) -> None:
            new = positions >= stable_end
            if self._recording is None:
                self._recording = _Pending(None, positions[new])
            self._recording.hidden[layer] = h[0, new]
            return None

        return record

    def exit_hook(self, backbone, ctx: DecisionContext):
        return None if self.exiting is None else self.exiting.exit_hook(backbone, ctx)

    def propagates_on_exit(self) -> bool:
        return self.exiting is not None and self.exiting.propagates_on_exit()

    def exit_text(self) -> str:
        if self.exiting is None:
            return super().exit_text()
        return self.exiting.exit_text()

    def own_flops(self) -> int:
        return sum(p.own_flops() for p in self.parts)

    def close_session(self, session, ctx: DecisionContext, decode_from: int) -> None:
        for p in self.parts:
            p.close_session(session, ctx, decode_from)
        if self._recording is not None:
            self._recording.session = session
            self._pending, self._recording = self._recording, None

    def kept_cache_conflict(self) -> str | None:
        return next((r for p in self.parts if (r := p.kept_cache_conflict())), None)

    def reset(self) -> None:
        for p in self.parts:
            p.reset()
        self._pending = self._recording = None
        self._report = {}

    def report(self) -> dict[str, Any]:
        """Each part's report under its name; "composed": what the last settling of history evicted."""
        out = {p.name: r for p in self.parts if (r := p.report())}
        if self._report:
            out["composed"] = dict(self._report)
        return out

    def settings(self) -> dict[str, Any]:
        return {"techniques": [p.name for p in self.parts],
                "part_settings": {p.name: _plain(p.settings()) for p in self.parts}, "prune_at": self.prune_at}


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON-able values (anything else by its repr)."""
    return json.loads(json.dumps(settings, default=repr))
