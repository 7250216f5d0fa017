"""Sink-KV attention (ReLIC, Elawady et al. 2024, "ReLIC: A Recipe for 64k Steps of In-Context Reinforcement
Learning for Embodied AI"): per layer and per KV head one extra key k^ and value v^ that every query attends to.

For a query q (after rotary), context keys k_j, values v_j (the visible ones) and scale s, per head:

    o = (e^{s q.k^} v^ + sum_j e^{s q.k_j} v_j) / (e^{s q.k^} + sum_j e^{s q.k_j})

The sink column is added inside attention, after rotary (no position encoding), outside the mask (never masked:
not by the causal mask, not by an episode mask) and after the KV-cache update (never cached: the cache holds only
real tokens). Both vectors start at zero; each is trainable or frozen by the variant:

| variant | k^ | v^ | what it is |
|---|---|---|---|
| `none` | - | - | plain attention (the no-op: the model is not touched) |
| `zero` | 0, frozen | 0, frozen | softmax-off-by-one (+1 in the denominator; Miller 2023, StreamingLLM's zero sink) |
| `k` | learned | 0, frozen | a query-dependent "attend to nothing" logit (ReLIC's released main configs) |
| `v` | 0, frozen | learned | a constant logit and a learned default output |
| `kv` | learned | learned | full Sink-KV (ReLIC's "Sink KV") |
| `token` | - | - | the baseline: a learned input embedding prepended to the sequence (a real token, cached, with a position) |

It runs on any family `HFDecoder` drives through transformers' attention interface: `attach` registers
`sink_attention` as the attention implementation "thrifty_sink_kv" and binds each layer's attention module to its
row of `SinkKVParameters`; the model's own attention modules (projections, rotary, q/k norms, cache update) run
unchanged and only the attention product is ours. `token` changes the input sequence, not attention, so only a
model built for it (the ReLIC policy, `thrifty.agents.relic_policy`) can use it; a planner session refuses it.

Also here: `lse_merge`, the same output from a plain attention output and its log-sum-exp
(o = sigmoid(L - s^) O + sigmoid(s^ - L) v^), the route for fused kernels that return the log-sum-exp.

Example:
    >>> from thrifty.techniques import build
    >>> build("sink_kv", variant="k").trains
    (True, False)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from thrifty.techniques.base import DecisionContext, Technique, register

ATTENTION_NAME = "thrifty_sink_kv"
"""The name under which `sink_attention` is registered in transformers' `AttentionInterface`."""
SINK_VARIANTS = ("none", "zero", "k", "v", "kv", "token")
_TRAINS = {"zero": (False, False), "k": (True, False), "v": (False, True), "kv": (True, True)}


class UnknownSinkVariantError(ValueError):
    """A sink variant that is not one of `SINK_VARIANTS`."""


def check_variant(variant: str) -> str:
    if variant not in SINK_VARIANTS:
        raise UnknownSinkVariantError(f"unknown sink variant {variant!r}; variants: {', '.join(SINK_VARIANTS)}")
    return variant


class SinkKVParameters(nn.Module):
    """key [L, Hkv, dh] and value [L, Hkv, dv], zero-initialised; a trainable one is a Parameter, a frozen one a
    buffer (stays zero, saved in the state dict all the same)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, value_dim: int | None = None,
                 train_key: bool = True, train_value: bool = True) -> None:
        super().__init__()
        for name, dim, train in (("key", head_dim, train_key), ("value", value_dim or head_dim, train_value)):
            zeros = torch.zeros(n_layers, n_kv_heads, dim)
            if train:
                self.register_parameter(name, nn.Parameter(zeros))
            else:
                self.register_buffer(name, zeros)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float,
           sink_key: torch.Tensor | None = None, sink_value: torch.Tensor | None = None,
           softcap: float | None = None, dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Softmax attention with an optional sink column -> [B, H, q, dv].

    query [B, H, q, d]; key [B, Hkv, k, d], value [B, Hkv, k, dv] (grouped-query: head h reads KV head h // (H/Hkv));
    mask: additive float [B|1, 1|H, q, k], bool (True = visible), or None = causal with the queries at the last q
    key positions (never `is_causal`, which aligns top-left when k != q); sink_key [Hkv, d], sink_value [Hkv, dv],
    or None for plain attention. softcap: Gemma 2's c * tanh(logit / c), applied to the sink logit too."""
    b, h, q, _ = query.shape
    groups = h // key.shape[1]
    # (groups == 1: the cache's own tensors, no copy of the whole context per call)
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    scores = torch.matmul(query, k.transpose(-1, -2)) * scaling  # [B, H, q, k]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        k_len = k.shape[2]
        mask = torch.ones(q, k_len, dtype=torch.bool, device=query.device).tril(k_len - q)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    if sink_key is not None:
        sink = torch.einsum("bhqd,hd->bhq", query, sink_key.repeat_interleave(groups, dim=0))[..., None] * scaling
        if softcap is not None:
            sink = torch.tanh(sink / softcap) * softcap
        scores = torch.cat([scores, sink], dim=-1)  # [B, H, q, k + 1], the sink column last, never masked
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=training)
    out = torch.matmul(probs[..., :k.shape[2]], v)
    if sink_key is not None:
        out = out + probs[..., -1:] * sink_value.repeat_interleave(groups, dim=0)[None, :, None, :]
    return out


def lse_merge(out: torch.Tensor, lse: torch.Tensor, sink_logit: torch.Tensor, sink_value: torch.Tensor) -> torch.Tensor:
    """Add a sink to finished attention: out [..., q, dv] (softmax attention over the context), lse [..., q] (the
    log-sum-exp of its logits), sink_logit [..., q] (s q.k^), sink_value broadcastable to out -> [..., q, dv].

    o = sigmoid(L - s^) O + sigmoid(s^ - L) v^: the context's share of the mass is e^L / (e^L + e^s^)."""
    gate = torch.sigmoid(lse - sink_logit)[..., None]
    return gate * out + (1 - gate) * sink_value


def sink_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature -> (output [B, q, H, dv], None). The sink comes from the
    `SinkKVParameters` row bound to `module` by `SinkKV.attach`; an unbound module gets plain attention.
    The mask already carries sliding windows (thrifty builds it from original positions), so `sliding_window`
    and the other keyword arguments of the calling model are not needed here."""
    bound = getattr(module, "_thrifty_sink", None)
    sink_key = sink_value = None
    if bound is not None:
        params, layer = bound
        sink_key, sink_value = params.key[layer].to(query.dtype), params.value[layer].to(query.dtype)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = attend(query, key, value, attention_mask, scale, sink_key, sink_value, softcap=softcap, dropout=dropout,
                 training=module.training)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION_NAME, sink_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)  # a model's own forward builds a float mask for it


_register_attention()


def _causal_lm(model: Any) -> nn.Module:
    """The `*ForCausalLM` of an `HFDecoder`, or `model` itself."""
    from thrifty.backbones import HFDecoder

    return model.model if isinstance(model, HFDecoder) else model


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    layers = model.model.layers
    missing = [i for i, layer in enumerate(layers) if not hasattr(layer, "self_attn")]
    if missing:
        raise TypeError(f"{type(model).__name__}: decoder layers {missing} have no self_attn module to add a sink to")
    return [layer.self_attn for layer in layers]


@register("sink_kv")
@dataclass
class SinkKV(Technique):
    """One sink key and value per layer and KV head in every attention of the model (see the module docstring)."""

    variant: str = "kv"
    """one of `SINK_VARIANTS`: none, zero, k, v, kv, token"""

    noop_settings: ClassVar[dict[str, Any]] = {"variant": "none"}

    def __post_init__(self) -> None:
        check_variant(self.variant)
        self.sink_params: SinkKVParameters | None = None
        """the sink of the model attached to (None before `attach`, and for none and token)"""
        self._model_ref: weakref.ref | None = None
        self._previous_attention: str | None = None
        self._attached_by_session = False

    @property
    def changes_attention(self) -> bool:
        """Whether this variant adds a sink column inside attention (zero, k, v, kv)."""
        return self.variant in _TRAINS

    @property
    def trains(self) -> tuple[bool, bool]:
        """(key trainable, value trainable); (False, False) for none and token."""
        return _TRAINS.get(self.variant, (False, False))

    def attach(self, model: Any) -> SinkKVParameters | None:
        """Add the sink to every attention of `model` (a `*ForCausalLM` or an `HFDecoder`); returns its parameters,
        or None for none and token (the model is left untouched). Attaching again to the same model is a no-op."""
        if not self.changes_attention:
            return None
        model = _causal_lm(model)
        if self._model_ref is not None and self._model_ref() is not model:
            raise ValueError("this sink_kv technique is attached to another model already; build one per model")
        mods = _attention_modules(model)
        c = model.config
        heads = c.num_attention_heads
        n_kv = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(mods[0], "head_dim", None) or c.hidden_size // heads
        if self.sink_params is None:
            p = next(model.parameters())
            self.sink_params = SinkKVParameters(len(mods), n_kv, head_dim, train_key=self.trains[0],
                                                train_value=self.trains[1]).to(device=p.device, dtype=p.dtype)
            self._model_ref = weakref.ref(model)
        for i, m in enumerate(mods):
            m._thrifty_sink = (self.sink_params, i)  # a plain attribute: not a submodule of the HF model
        if c._attn_implementation != ATTENTION_NAME:
            self._previous_attention = c._attn_implementation
            model.set_attn_implementation(ATTENTION_NAME)
        return self.sink_params

    def detach(self, model: Any) -> None:
        """Undo `attach`: plain attention again with the implementation the model had."""
        model = _causal_lm(model)
        for m in _attention_modules(model):
            m.__dict__.pop("_thrifty_sink", None)
        if self._previous_attention is not None and model.config._attn_implementation == ATTENTION_NAME:
            model.set_attn_implementation(self._previous_attention)

    def open_session(self, backbone, ctx: DecisionContext):
        if self.variant == "token":
            raise ValueError("sink variant 'token' prepends a learned input embedding, which a planner session over "
                             "token ids cannot hold; use it in a model built for it (thrifty.agents.relic_policy)")
        model = _causal_lm(backbone)
        already = getattr(_attention_modules(model)[0], "_thrifty_sink", None) is not None
        self.attach(backbone)
        # attached for this decision only: the backbone may be shared (a bench process keeps one per model for
        # every configuration), so close_session gives it back as it was
        self._attached_by_session = self.changes_attention and not already
        return super().open_session(backbone, ctx)

    def close_session(self, session, ctx: DecisionContext, decode_from: int) -> None:
        if self._attached_by_session:
            self.detach(session.backbone)
            self._attached_by_session = False

    def report(self) -> dict[str, Any]:
        return {"sink_variant": self.variant, "sink_columns": int(self.changes_attention)}
