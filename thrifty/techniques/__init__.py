"""Techniques, one per module, found by name in `REGISTRY`."""

from thrifty.techniques.base import (REGISTRY, DecisionContext, Full, LayerHook, Technique, UnknownTechniqueError,
                                     build, register)
from thrifty.techniques import (early_exit, random_pruning, recency_pruning, sink_kv,  # noqa: F401  (register)
                                sink_window, token_pruning)

__all__ = ["REGISTRY", "DecisionContext", "Full", "LayerHook", "Technique", "UnknownTechniqueError", "build",
           "register"]
from thrifty.techniques.prefix_reuse import PrefixReuse  # noqa: E402  (registers "prefix_reuse")
from thrifty.techniques.composed import Composed, CompositionError  # noqa: E402  (registers "composed")

__all__ += ["PrefixReuse", "Composed", "CompositionError"]
