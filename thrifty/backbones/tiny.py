"""Small random models of each supported family, for tests and for profiling without downloaded weights.

Defaults: vocab 256, hidden 64, 4 layers, 4 heads, 2 KV heads (GQA), intermediate 128, max positions 1024.
Family overrides (`_FAMILY`) make each family's own features bite at this size: Qwen3 an explicit head_dim
(32, != hidden/heads); Gemma 2/3 small logit soft-caps and alternating sliding/full layers; Granite non-trivial
multipliers; special token ids inside the vocabulary where a family's defaults lie outside it. Weights are drawn
with a wider init (std 0.1) than HF's default so that greedy decoding has clear argmax margins.
A profiling-size model: `tiny_model("llama", num_hidden_layers=12, hidden_size=512, intermediate_size=1408,
num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)`.
"""

from __future__ import annotations

from typing import Any

import torch

from thrifty.backbones.families import FAMILIES, SUPPORTED_FAMILIES
from thrifty.backbones.hf import ModelLoadError

_IN_VOCAB = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=5.0)
_FAMILY: dict[str, dict[str, Any]] = {
    "qwen3": dict(head_dim=32),
    "mistral": dict(sliding_window=None),  # opt in with sliding_window=W
    "gemma": dict(head_dim=16),
    "gemma2": dict(_GEMMA, attn_logit_softcapping=5.0),
    "gemma3_text": dict(_GEMMA, layer_types=["sliding_attention", "full_attention"] * 2),
    "phi3": _IN_VOCAB,
    "olmo2": _IN_VOCAB,
    "cohere": _IN_VOCAB,
    "granite": dict(embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.125,
                    logits_scaling=2.0),
}


def tiny_config(family: str, **overrides: Any):
    """A small config of `family` (one of `SUPPORTED_FAMILIES`); keyword overrides win."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise ModelLoadError(f"unsupported model family {family!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}")
    kw: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.1, tie_word_embeddings=False, architectures=[FAMILIES[family].architecture],
    )
    kw.update(_FAMILY.get(family, {}))
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str, seed: int = 0, attn_implementation: str | None = None, **overrides: Any):
    """An eval-mode random `*ForCausalLM` of `family`, initialised from `seed` (global RNG left untouched).
    attn_implementation: None = sdpa where the family has it, else eager (`FamilyTraits.attention`)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    attn = FAMILIES[family].attention(attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    model.eval()
    model.requires_grad_(False)
    return model
