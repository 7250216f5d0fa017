"""Recurrent backbones with a fixed-size state: xLSTM (the `xlstm` package) and Mamba (`transformers`).

LRAM (Schmied et al., 2024, "A Large Recurrent Action Model") replaces a Decision Transformer by xLSTM or Mamba:
training runs in parallel over a whole sequence, acting steps one token at a time with a state whose size does not
grow with the context. Both adapters here take and return embeddings, not token ids:

    forward(x)        x (B, T, D) -> y (B, T, D)                     parallel (training)
    step(x, state)    x (B, 1, D) -> y (B, 1, D), new state          recurrent (acting); state=None starts fresh
    compile_step()    later steps run through torch.compile          (the state's shapes never change, so one
                                                                      compiled graph serves every context length)
    state_bytes(state)                                               bytes the state holds (constant in T)

Invariant (tests/test_recurrent.py): stepping through a sequence gives the parallel forward's output (<= 1e-5).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ARCHITECTURES = ("xlstm", "mamba")


class BackendError(ValueError):
    """A backbone configuration this machine cannot run (for example xLSTM's CUDA kernels without a GPU)."""


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    layers = getattr(obj, "layers", None)  # a transformers cache: a list of per-layer objects
    if layers is not None:  # 0-d tensors there are bookkeeping (transformers >= 5.2x counts tokens seen per layer)
        return [t for layer in layers for t in _tensors({k: v for k, v in vars(layer).items()
                                                          if isinstance(v, (torch.Tensor, dict, list, tuple))})
                if t.dim() > 0]
    return []


def state_bytes(state: Any) -> int:
    """Bytes held by the tensors of a recurrent state (nested dicts/tuples, or a transformers cache)."""
    return sum(t.numel() * t.element_size() for t in _tensors(state))


@dataclass(frozen=True)
class RecurrentConfig:
    arch: str = "xlstm"
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    """xLSTM: heads per mLSTM/sLSTM layer (Mamba ignores it)"""
    slstm_at: tuple[int, ...] = ()
    """xLSTM: indices of the blocks that are sLSTM (pure-PyTorch "vanilla" backend); the others are mLSTM"""
    slstm_backend: str = "vanilla"
    context_length: int = 256
    """xLSTM: the training sequence length its parallel kernels are built for (stepping is not bounded by it)"""
    state_size: int = 16
    """Mamba: SSM state size per channel"""
    expand: int = 2
    conv_kernel: int = 4

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown recurrent architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.slstm_backend == "cuda" and not torch.cuda.is_available():
            raise BackendError("sLSTM backend 'cuda' needs a CUDA GPU, and this machine has none; use "
                               "slstm_backend='vanilla' (xlstm's pure-PyTorch backend, which runs on the CPU)")
        if self.slstm_backend not in ("vanilla", "cuda"):
            raise ValueError(f"sLSTM backend must be 'vanilla' (CPU) or 'cuda', got {self.slstm_backend!r}")
        if any(not 0 <= i < self.layers for i in self.slstm_at):
            raise ValueError(f"slstm_at {self.slstm_at} names blocks outside 0..{self.layers - 1}")
        if min(self.d_model, self.layers, self.heads, self.context_length) < 1 or self.d_model % self.heads:
            raise ValueError(f"need positive sizes and d_model divisible by heads, got {self}")


class _Stepping(nn.Module):
    """`step` eagerly, or through torch.compile once `compile_step()` was called (the first step of a sequence,
    state=None, stays eager: its inputs have another structure)."""

    _compiled = None

    def compile_step(self) -> "_Stepping":
        self._compiled = torch.compile(self._step, dynamic=False)
        return self

    def step(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        if self._compiled is not None and state is not None:
            # a slice's strides (x[:, i:i + 1] of a longer input is "contiguous" but keeps the long row stride),
            # or the eager first step's against the compiled ones (xLSTM's (B, H, 1, 1) stabiliser comes out with
            # strides (H, 1, H, 1)), would each force a recompile: made canonical, one graph per batch size
            return self._compiled(_canonical_strides(x), _canonical_strides(state))
        return self._step(x, state)


def _canonical_strides(state: Any) -> Any:
    """The state with every tensor leaf laid out with row-major strides (a copy only where they differ; a state
    that is not a pytree of tensors, like Mamba's cache object, is returned as it is)."""
    import torch.utils._pytree as pytree

    def canonical(t):
        if not torch.is_tensor(t):
            return t
        want, acc = [], 1
        for size in reversed(t.shape):
            want.append(acc)
            acc *= size
        return t if tuple(reversed(want)) == t.stride() else t.clone(memory_format=torch.contiguous_format)

    return pytree.tree_map(canonical, state)


class XLSTMBackbone(_Stepping):
    """An `xlstm.xLSTMBlockStack` (Beck et al., 2024): mLSTM blocks, sLSTM blocks where `slstm_at` says."""

    def __init__(self, cfg: RecurrentConfig) -> None:
        super().__init__()
        from xlstm import (FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig,
                           sLSTMLayerConfig, xLSTMBlockStack, xLSTMBlockStackConfig)

        self.cfg = cfg
        slstm = None
        if cfg.slstm_at:
            slstm = sLSTMBlockConfig(slstm=sLSTMLayerConfig(backend=cfg.slstm_backend, num_heads=cfg.heads,
                                                            conv1d_kernel_size=cfg.conv_kernel,
                                                            bias_init="powerlaw_blockdependent"),
                                     feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu"))
        stack = xLSTMBlockStackConfig(
            mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=cfg.conv_kernel,
                                                                qkv_proj_blocksize=4, num_heads=cfg.heads)),
            slstm_block=slstm, context_length=cfg.context_length, num_blocks=cfg.layers,
            embedding_dim=cfg.d_model, slstm_at=list(cfg.slstm_at))
        self.stack = xLSTMBlockStack(stack)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); T at most `context_length` (the parallel kernels' size)."""
        if x.shape[1] > self.cfg.context_length:
            raise ValueError(f"xLSTM parallel forward over {x.shape[1]} steps, but it was built for at most "
                             f"{self.cfg.context_length} (context_length); step() has no such bound")
        return self.stack(x)

    def _step(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """x (B, 1, D) -> y (B, 1, D), state (per block: conv and mLSTM (C, n, m) or sLSTM states)."""
        return self.stack.step(x, state)


def selective_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, **_: Any):
    """Mamba's selective scan with transformers' `mamba_selective_scan` signature, one step at a time.

    u, dt, z (b, d, l); A (d, n); B, C (b, n, l); D (d,).  h_t = exp(A dt_t) h_{t-1} + dt_t u_t B_t,
    y_t = C_t . h_t + D u_t, times silu(z_t).  Same result as transformers' torch paths, but the discretised
    (b, d, l, n) tensors are never built: each step makes its own (b, d, n) slice, and `unbind` views keep the
    backward free of the full-size zero-filled gradients that indexing a big tensor step by step costs. On 2 CPU
    cores this makes a training step of the default action model 5x faster than mambapy's parallel scan."""
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = nn.functional.softplus(dt)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float32)
    ys = []
    for dt_t, du_t, b_t, c_t in zip(dt.unbind(2), (dt * u).unbind(2), B.float().unbind(2), C.float().unbind(2)):
        h = torch.exp(A * dt_t[..., None]) * h + du_t[..., None] * b_t[:, None, :]  # (b, d, n)
        ys.append((h @ c_t[..., None])[..., 0])  # (b, d)
    y = torch.stack(ys, -1).to(u.dtype)
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * nn.functional.silu(z)
    return (y, h) if return_last_state else y


@contextlib.contextmanager
def _thrifty_scan():
    """Route transformers' Mamba full-sequence scan through `selective_scan` for the duration of a call."""
    import transformers.models.mamba.modeling_mamba as modeling

    original = getattr(modeling, "mamba_selective_scan", None)
    if original is None:
        raise BackendError("this transformers version has no modeling_mamba.mamba_selective_scan to route through "
                           "thrifty's scan; use a transformers release thrifty is tested on (5.20 and 5.24)")
    modeling.mamba_selective_scan = lambda *args, **kwargs: selective_scan(*args, **kwargs)  # late-bound
    try:
        yield
    finally:
        modeling.mamba_selective_scan = original


class MambaBackbone(_Stepping):
    """`transformers.MambaModel` (Gu and Dao, 2023) over embeddings; stepping carries its conv and SSM cache.

    The parallel forward uses transformers' Mamba layers with thrifty's `selective_scan` for the scan (equal to
    transformers' own torch paths within float error, tests/test_recurrent.py); stepping uses transformers' own
    single-step state update."""

    def __init__(self, cfg: RecurrentConfig) -> None:
        super().__init__()
        from transformers import MambaConfig, MambaModel

        self.cfg = cfg
        self.model = MambaModel(MambaConfig(vocab_size=2, hidden_size=cfg.d_model, state_size=cfg.state_size,
                                            num_hidden_layers=cfg.layers, expand=cfg.expand,
                                            conv_kernel=cfg.conv_kernel, use_cache=True, use_mambapy=True))
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "cache_params"  # renamed in transformers 5.24

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _thrifty_scan():
            return self.model(inputs_embeds=x, use_cache=False).last_hidden_state

    def _step(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        out = self.model(inputs_embeds=x, use_cache=True, **{self._cache_arg: state})
        cache = getattr(out, "cache", None) or getattr(out, "cache_params", None) or getattr(out, "past_key_values")
        return out.last_hidden_state, cache


def build_recurrent(cfg: RecurrentConfig) -> nn.Module:
    return XLSTMBackbone(cfg) if cfg.arch == "xlstm" else MambaBackbone(cfg)
