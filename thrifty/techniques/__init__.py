"""Techniques, one per module, found by name in `REGISTRY`."""

from thrifty.techniques.base import (REGISTRY, DecisionContext, Full, LayerHook, Technique, UnknownTechniqueError,
                                     build, register)

__all__ = ["REGISTRY", "DecisionContext", "Full", "LayerHook", "Technique", "UnknownTechniqueError", "build",
           "register"]
