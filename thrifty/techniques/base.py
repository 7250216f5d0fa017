"""The technique protocol and the one registry that the CLI, the benchmarks and the tests all read.

A technique is a small dataclass with validated fields and a few hooks the runtime calls during a decision.
Every technique has a no-op setting that reproduces the full model exactly, and reports what it realised.

Adding a technique (the checklist; see docs/techniques.md):
1. `thrifty/techniques/<name>.py`: a `@register("<name>")` dataclass subclassing `Technique`;
2. import it in `thrifty/techniques/__init__.py`;
3. a row in docs/techniques.md (paper, fields, what it reports, what it cannot combine with);
4. the shared test matrix picks it up from the registry; add its own invariant test.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

LayerHook = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
"""(layer_idx, hidden [1, q, d], positions [q]) -> sorted row indices to keep, or None to keep all."""
ExitHook = Callable[[int, torch.Tensor], bool]
"""(layer_idx, hidden [1, q, d]) -> True to stop the decision's pass after that layer (`Session.extend`)."""


@dataclass(frozen=True)
class DecisionContext:
    """What a technique may look at when a decision starts.

    token_ids: the whole context (1-D LongTensor [T]); token i has original position i.
    spans: name -> (start, end) in positions: "mission", "observation" (the current observation and the decision
    prompt) and "stable_prefix" (everything before the current observation, shared by later decisions).
    seed: per-decision seed for random choices (same seed, same choices).
    """

    token_ids: torch.Tensor
    spans: dict[str, tuple[int, int]]
    seed: int = 0


@dataclass
class Technique:
    """Base class. Subclasses override the hooks they need and validate their fields in __post_init__."""

    name: ClassVar[str] = "full"
    noop_settings: ClassVar[dict[str, Any]] = {}
    """Settings at which the technique reproduces the full model exactly (the shared test matrix checks it)."""

    def open_session(self, backbone, ctx: DecisionContext):
        """The session this decision extends, and the position from which `ctx.token_ids` must be appended.

        Default: a fresh session, the whole context recomputed. Prefix reuse returns a kept session instead.
        """
        from thrifty.runtime import Session

        return Session(backbone), 0

    def prefill_hook(self, ctx: DecisionContext, n_layers: int, new_from: int) -> LayerHook | None:
        """A hook run after each decoder layer while the tokens from `new_from` on are prefilled, or None."""
        return None

    def exit_hook(self, backbone, ctx: DecisionContext) -> ExitHook | None:
        """A hook run after each layer but the last while the decision's tokens are prefilled; when it returns True
        the pass stops and the decision's output is `exit_text()` instead of a decode (early exit). None: never."""
        return None

    def propagates_on_exit(self) -> bool:
        """Whether layers past an early exit get the exited tokens' keys and values from the exit's hidden states
        (CALM's state propagation) rather than never holding them."""
        return False

    def exit_text(self) -> str:
        """The output of the last decision that exited early (called only after `exit_hook` returned True)."""
        raise NotImplementedError(f"{self.name} has no exit hook")

    def own_flops(self) -> int:
        """FLOPs the technique itself spent in the last decision outside the backbone (e.g. an exit head)."""
        return 0

    def close_session(self, session, ctx: DecisionContext, decode_from: int) -> None:
        """Called after decoding; the session holds the context then the generated tokens from `decode_from`."""

    def kept_cache_conflict(self) -> str | None:
        """Why this technique cannot run over a session kept from earlier decisions, or None when it can.

        Over a kept session (prefix reuse) only the newly appended tokens are prefilled, the prefill hook sees only
        them, and cached entries are never rewritten. A technique whose choice depends on the whole context (a
        window relative to the newest token, a keep ratio over all tokens) returns the reason it would mean
        something else there; `composed` then refuses the combination with that reason.
        """
        return None

    def reset(self) -> None:
        """Forget per-episode state (called at the start of every episode)."""

    def report(self) -> dict[str, Any]:
        """What the technique realised in the last decision (e.g. tokens kept per layer)."""
        return {}

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_WARNED: set[tuple] = set()


def warn_once(key: tuple, message: str, category: type[Warning], stacklevel: int = 2) -> bool:
    """Warn `message` the first time `key` (e.g. (technique name, what is wrong)) is seen in this process; later
    calls with the same key are silent whatever the warning filters say, so a suite of many decisions, episodes
    and filter changes (libraries that use `warnings.catch_warnings`) shows each problem once. Returns whether it
    warned. `forget_warnings()` starts over (tests that assert a warning)."""
    if key in _WARNED:
        return False
    _WARNED.add(key)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    return True


def forget_warnings() -> None:
    """Forget which keys `warn_once` has warned about, as in a fresh process."""
    _WARNED.clear()


REGISTRY: dict[str, type[Technique]] = {}


def register(name: str):
    def deco(cls: type[Technique]) -> type[Technique]:
        if name in REGISTRY:
            raise ValueError(f"technique {name!r} registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


class UnknownTechniqueError(ValueError):
    pass


def build(name: str, **settings) -> Technique:
    """Instantiate a registered technique by name with keyword settings."""
    if name not in REGISTRY:
        raise UnknownTechniqueError(f"unknown technique {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**settings)


@register("full")
@dataclass
class Full(Technique):
    """The baseline: the whole context through every layer, recomputed at every decision."""
