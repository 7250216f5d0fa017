"""Backbone adapters: `HFDecoder` (local Hugging Face causal LMs) and tiny random models for tests."""

from thrifty.backbones.hf import SUPPORTED_FAMILIES, HFDecoder, ModelLoadError
from thrifty.backbones.tiny import tiny_config, tiny_model

__all__ = ["SUPPORTED_FAMILIES", "HFDecoder", "ModelLoadError", "tiny_config", "tiny_model"]
