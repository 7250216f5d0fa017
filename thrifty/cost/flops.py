"""Analytic FLOPs of a decoder-only transformer call, from the *actual* per-layer query and key counts.

Counting convention (one multiply-add = 2 FLOPs; norms, rotary, softmax and activations are not counted,
they are O(T*d) and below 1% at the sizes we run):

per layer l, with q_l query tokens and P_l visible (query, key) pairs:
    q/o projections      2 * q_l * d * (H * hd)      each
    k/v projections      2 * q_l * d * (H_kv * hd)   each
    attention scores     2 * P_l * H * hd            (Q K^T)
    attention values     2 * P_l * H * hd            (softmax(.) V)
    gated MLP            3 * 2 * q_l * d * d_ff      (gate, up, down; Llama/Qwen/Mistral SwiGLU)
output head: 2 * n_logits * d * V, for the positions whose logits are computed.

P_l is counted exactly: a query sees every cached key of its layer plus the new keys up to itself
(causal), so with c_l cached keys and q_l new tokens P_l = q_l * c_l + q_l (q_l + 1) / 2.
Token pruning changes q_l and c_l per layer; prefix reuse makes c_l large and q_l small; early exit runs
fewer layers. Every technique is costed by this one function.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The shape facts FLOPs depend on. Built by a backbone adapter from its model config."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    mlp_matrices: int = 3  # gated MLP (gate, up, down); 2 for a plain MLP

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelShape.{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class LayerWork:
    """What one layer did in one call: new query tokens and visible (query, key) pairs."""

    queries: int
    pairs: int

    @staticmethod
    def causal(new_tokens: int, cached: int = 0) -> "LayerWork":
        """Work of `new_tokens` appended after `cached` keys under a causal mask."""
        return LayerWork(new_tokens, new_tokens * cached + new_tokens * (new_tokens + 1) // 2)


def layer_flops(shape: ModelShape, work: LayerWork) -> int:
    d, h, hkv, hd = shape.d_model, shape.n_heads, shape.n_kv_heads, shape.head_dim
    q = work.queries
    proj = 2 * q * d * (h * hd) * 2 + 2 * q * d * (hkv * hd) * 2  # q, o + k, v
    attn = 4 * work.pairs * h * hd
    mlp = shape.mlp_matrices * 2 * q * d * shape.d_ff
    return proj + attn + mlp


def kv_projection_flops(shape: ModelShape, tokens: int) -> int:
    """FLOPs of computing one layer's keys and values alone for `tokens` tokens (early exit's state propagation;
    the attention module's query projection runs too and is counted)."""
    return 2 * tokens * shape.d_model * (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim


def head_flops(shape: ModelShape, n_logits: int) -> int:
    return 2 * n_logits * shape.d_model * shape.vocab_size


def forward_flops(shape: ModelShape, works: list[LayerWork], n_logits: int) -> int:
    """FLOPs of one call: the layers that ran (len(works) <= n_layers) plus the output head."""
    if len(works) > shape.n_layers:
        raise ValueError(f"{len(works)} layer records for a {shape.n_layers}-layer model")
    return sum(layer_flops(shape, w) for w in works) + head_flops(shape, n_logits)
