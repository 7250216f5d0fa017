"""Small random models of each supported family, for tests and for profiling without downloaded weights.

Defaults: vocab 256, hidden 64, 4 layers, 4 heads, 2 KV heads (GQA), intermediate 128, max positions 1024;
Qwen3 additionally has an explicit head_dim (32, != hidden/heads) and its q/k norms. Weights are drawn with
a wider init (std 0.1) than HF's default so that greedy decoding has clear argmax margins.
A profiling-size model: `tiny_model("llama", num_hidden_layers=12, hidden_size=512, intermediate_size=1408,
num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)`.
"""

from __future__ import annotations

from typing import Any

import torch

from thrifty.backbones.hf import SUPPORTED_FAMILIES, ModelLoadError

_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


def tiny_config(family: str, **overrides: Any):
    """A small config of `family` ("llama" | "qwen2" | "qwen3" | "mistral"); keyword overrides win."""
    from transformers import AutoConfig

    if family not in SUPPORTED_FAMILIES:
        raise ModelLoadError(f"unsupported model family {family!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}")
    kw: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.1, tie_word_embeddings=False, architectures=[_ARCH[family]],
    )
    if family == "qwen3":
        kw["head_dim"] = 32
    if family == "mistral":
        kw["sliding_window"] = None  # opt in with sliding_window=W
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa", **overrides: Any):
    """An eval-mode random `*ForCausalLM` of `family`, initialised from `seed` (global RNG left untouched)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    model.eval()
    model.requires_grad_(False)
    return model
