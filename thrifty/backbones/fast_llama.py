"""A Llama decoder layer run through functional calls on its own weights: the same arithmetic as transformers'
`LlamaDecoderLayer`, without its ~15 module calls, kwarg plumbing and wrappers per layer (issue 22).

A reused planner decision runs ~30 new tokens through 6 small layers, where the per-module call overhead is a
fixed cost comparable to the arithmetic: on the step-64 prefill of `thrifty profile-reuse` (24 tokens over a
2,536-token cache, 1 thread) this path took 11.7-11.9 ms against 13.0-14.2 ms through the modules, with
bit-identical logits (docs/decision_latency.md). It reads the modules' weights at every call (nothing is copied or
cached, so training the model in place stays seen) and calls the same rotary function and the same attention
function (`thrifty.backbones.attention`) as the modules do.

`HFDecoder.run_layer` takes this path only where it is the same computation: a Llama layer of exactly that class,
in eval mode, float32, sdpa attention, no biases, SiLU, and no forward hooks on the layer or its submodules (a
hook would be skipped here). Anything else goes through the module. tests/test_fast_llama.py checks equality with
the module, bit for bit, with and without caches and masks, batched, and the fallbacks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from thrifty.backbones.attention import SDPA_NAMES, gqa_sdpa_attention


def config_allows(config: Any) -> bool:
    """Whether a model config is one this path computes exactly (checked once, when an `HFDecoder` is built)."""
    return (getattr(config, "model_type", None) == "llama" and not getattr(config, "attention_bias", False)
            and not getattr(config, "mlp_bias", False) and getattr(config, "hidden_act", None) == "silu"
            and getattr(config, "pretraining_tp", 1) == 1)


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def layer_allows(layer: torch.nn.Module, config: Any, h: torch.Tensor) -> bool:
    """Whether this call may take the functional path (cheap checks, made at every call)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    attn, mlp = layer.self_attn, layer.mlp
    if type(layer) is not LlamaDecoderLayer or layer.training or h.dtype != torch.float32:
        return False
    if getattr(config, "_attn_implementation", None) not in SDPA_NAMES:
        return False
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return False
    parts = (layer, attn, mlp, layer.input_layernorm, layer.post_attention_layernorm, attn.q_proj, attn.k_proj,
             attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return not any(_hooked(m) for m in parts)


def run_layer(layer: torch.nn.Module, h: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
              mask: torch.Tensor | None, cache: Any) -> torch.Tensor:
    """h [B, q, d], rotary (cos, sin) [B|1, q, hd], additive mask [B|1, 1, q, k] or None (causal), cache with
    `update(k, v, layer_idx)` or None -> h [B, q, d], as `LlamaDecoderLayer.forward` computes it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn, mlp = layer.self_attn, layer.mlp
    b, q, d = h.shape
    hd = attn.head_dim
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
    x = F.rms_norm(h, (d,), n1.weight, n1.variance_epsilon)
    queries = F.linear(x, attn.q_proj.weight).view(b, q, -1, hd).transpose(1, 2)  # [B, H, q, hd]
    keys = F.linear(x, attn.k_proj.weight).view(b, q, -1, hd).transpose(1, 2)  # [B, H_kv, q, hd]
    values = F.linear(x, attn.v_proj.weight).view(b, q, -1, hd).transpose(1, 2)
    cos, sin = position_embeddings
    queries, keys = apply_rotary_pos_emb(queries, keys, cos, sin)
    if cache is not None:
        keys, values = cache.update(keys, values, attn.layer_idx)
    out, _ = gqa_sdpa_attention(attn, queries, keys, values, mask, dropout=0.0, scaling=attn.scaling)
    h = h + F.linear(out.reshape(b, q, -1), attn.o_proj.weight)
    x = F.rms_norm(h, (d,), n2.weight, n2.variance_epsilon)
    return h + F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight),
                        mlp.down_proj.weight)
