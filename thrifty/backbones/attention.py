"""sdpa with grouped-query attention under a mask: the attention every `HFDecoder` runs in place of transformers' sdpa.

transformers' sdpa path (5.x, `sdpa_attention_forward`) passes `enable_gqa` to `scaled_dot_product_attention` only
when there is no mask; with a mask and more than one query it first copies the KV heads up to the query heads
(`repeat_kv`). A session's prefill over a kept cache always has a mask (the new tokens are causal among
themselves), so it paid that copy on every layer: ~0.45 of the 1.33 ms of one layer's attention for 30 queries over
a 2.5k-token cache (6 query heads, 2 KV heads, head_dim 32, one thread; `docs/decision_latency.md`).
`gqa_sdpa_attention` calls sdpa with `enable_gqa` and the mask instead; a session's prefill gives the same logits to the last bit
(tests/test_attention.py, against transformers' sdpa, and within 1e-5 of eager attention). Every other case
(no mask, one query, no grouping, a position bias, a soft-cap) goes to transformers' own function.

Registered in transformers' `AttentionInterface` under `GQA_SDPA` (with sdpa's mask builder, so a model's own
forward, e.g. in training, builds the masks sdpa would). `HFDecoder` switches a model built with "sdpa" to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GQA_SDPA = "thrifty_sdpa"
"""The registered name; `SDPA_NAMES` are the implementations that behave as sdpa (is_causal when no mask)."""
SDPA_NAMES = ("sdpa", GQA_SDPA)


def gqa_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, q, hd], key/value [B, H_kv, k, hd], additive or boolean mask [B|1, 1, q, k] or None
    -> (output [B, q, H, hd], None), as transformers' attention functions return it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    plain = (attention_mask is None or query.shape[2] == 1 or groups == 1 or key.shape[-1] != value.shape[-1]
             or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
             or kwargs.get("output_attentions", False))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
    AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)


register()
