"""Backbone adapters: `HFDecoder` (local Hugging Face causal LMs, one `FamilyTraits` per family) and tiny random
models for tests."""

from thrifty.backbones.families import FAMILIES, SUPPORTED_FAMILIES, FamilyTraits
from thrifty.backbones.hf import HFDecoder, ModelLoadError
from thrifty.backbones.tiny import tiny_config, tiny_model

__all__ = ["FAMILIES", "SUPPORTED_FAMILIES", "FamilyTraits", "HFDecoder", "ModelLoadError", "tiny_config",
           "tiny_model"]
