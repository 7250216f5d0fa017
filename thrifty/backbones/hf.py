"""Adapter around a local Hugging Face decoder-only causal LM (Llama, Qwen2, Qwen3, Mistral).

`HFDecoder` is the only code in thrifty that touches model internals. It exposes the pieces a caller needs
to run the model one layer at a time (embedding, rotary tables, one decoder layer, final norm + head) and
builds explicit additive attention masks from *original* token positions, so that callers can drop tokens
or cache entries anywhere and still get exact attention. Only public submodules are used:
`model.model.embed_tokens`, `.layers[i]`, `.rotary_emb`, `.norm` and `model.lm_head`.

Shapes: batch is always 1; q = new query tokens, k = keys visible to them, d = hidden size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from thrifty.cost.flops import ModelShape

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

_EXPECTED = "expected a local Hugging Face causal-LM directory (config.json + *.safetensors)"


class ModelLoadError(ValueError):
    """A model directory or in-memory model that thrifty cannot use."""


def _check_family(model_type: Any, where: str) -> str:
    if model_type not in SUPPORTED_FAMILIES:
        raise ModelLoadError(
            f"{where}: unsupported model family {model_type!r} (config.model_type); "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return model_type


class HFDecoder:
    """A decoder-only causal LM, usable layer by layer. Build with `load(path)` or `from_model(model)`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._family = _check_family(getattr(model.config, "model_type", None), type(model).__name__)
        inner = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "rotary_emb", "norm")
        if inner is None or not hasattr(model, "lm_head") or not all(hasattr(inner, n) for n in needed):
            raise ModelLoadError(
                f"{type(model).__name__} is not a causal LM with .model.{{{','.join(needed)}}} and .lm_head"
            )

    # ------------------------------------------------------------------ construction
    @staticmethod
    def check_dir(path: str | Path) -> Path:
        """Check that `path` looks like a local causal-LM directory of a supported family, without loading it."""
        p = Path(path)
        if not p.is_dir():
            raise ModelLoadError(f"no model directory at {p}: {_EXPECTED}")
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise ModelLoadError(f"no config.json in {p}: {_EXPECTED}")
        try:
            raw = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"unreadable config.json in {p}: {e}") from e
        _check_family(raw.get("model_type"), str(p))
        archs = raw.get("architectures") or []
        if archs and not any(str(a).endswith("ForCausalLM") for a in archs):
            raise ModelLoadError(
                f"{p} is not a causal LM: config architectures {archs} have no '*ForCausalLM' entry; "
                f"thrifty needs a decoder-only causal LM of family {', '.join(SUPPORTED_FAMILIES)}"
            )
        if not any(p.glob("*.safetensors")):
            other = sorted(x.name for x in p.glob("*.bin"))
            hint = f" (found {other}; convert them to safetensors)" if other else ""
            raise ModelLoadError(f"no *.safetensors weights in {p}{hint}: {_EXPECTED}")
        return p

    @classmethod
    def load(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
    ) -> "HFDecoder":
        """Load a local directory (never the network). Raises `ModelLoadError` with a precise reason."""
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        p = cls.check_dir(path)
        hf_logging.disable_progress_bar()  # a per-load weight bar would flood benchmark logs
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(p), dtype=dtype, attn_implementation=attn_implementation,
                local_files_only=True, use_safetensors=True,
            )
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"failed to load the model in {p}: {e}") from e
        model.eval()
        model.requires_grad_(False)
        return cls(model)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "HFDecoder":
        """Wrap an in-memory `*ForCausalLM` (train/eval mode and grads are left as the caller set them)."""
        return cls(model)

    # ------------------------------------------------------------------ facts
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def config(self) -> Any:
        return self._model.config

    @property
    def family(self) -> str:
        return self._family

    @property
    def n_layers(self) -> int:
        return len(self._model.model.layers)

    @property
    def shape(self) -> ModelShape:
        c = self.config
        heads = c.num_attention_heads
        return ModelShape(
            n_layers=self.n_layers,
            d_model=c.hidden_size,
            n_heads=heads,
            n_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
            d_ff=c.intermediate_size,
            vocab_size=c.vocab_size,
        )

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._model.parameters()).dtype

    def sliding_window(self, layer_idx: int) -> int | None:
        """Window size W of layer `layer_idx` (a query at p sees keys at p-W+1..p), or None for full causal."""
        c = self.config
        window = getattr(c, "sliding_window", None)
        if window is None:
            return None
        layer_types = getattr(c, "layer_types", None)
        if self._family != "mistral" and layer_types is not None:
            return int(window) if layer_types[layer_idx] == "sliding_attention" else None
        return int(window)  # Mistral applies its window to every layer

    # ------------------------------------------------------------------ pieces of the forward
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids LongTensor [1, q] -> hidden [1, q, d]."""
        return self._model.model.embed_tokens(ids.to(self.device))

    def rotary(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables for original positions [q] (h [1, q, d] gives dtype/device) -> (cos, sin)."""
        return self._model.model.rotary_emb(h, positions.to(h.device)[None])

    def run_layer(
        self,
        i: int,
        h: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: Any,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Decoder layer i on h [1, q, d] at positions [q] with additive mask [1, 1, q, k] -> [1, q, d].

        `cache` (or None) must offer `update(k, v, layer_idx)` returning all k keys/values of layer i,
        ordered like the mask's key axis. `position_embeddings` defaults to `rotary(h, positions)`.
        """
        if position_embeddings is None:
            position_embeddings = self.rotary(h, positions)
        out = self._model.model.layers[i](
            h,
            attention_mask=mask,
            position_ids=positions.to(h.device)[None],
            past_key_values=cache,
            use_cache=cache is not None,
            position_embeddings=position_embeddings,
        )
        return out[0] if isinstance(out, (tuple, list)) else out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> logits [..., vocab] (final norm, then head)."""
        return self._model.lm_head(self._model.model.norm(h))

    def attention_mask(self, query_pos: torch.Tensor, key_pos: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Additive mask [1, 1, q, k] for queries at positions [q] over keys at positions [k].

        0 where key_pos <= query_pos (and query_pos - key_pos < W on a sliding-window layer), else
        finfo(dtype).min. Valid for both sdpa and eager attention.
        """
        qp = query_pos.to(self.device)[:, None]
        kp = key_pos.to(self.device)[None, :]
        visible = kp <= qp
        window = self.sliding_window(layer_idx)
        if window is not None:
            visible = visible & (qp - kp < window)
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask = mask.masked_fill(~visible, torch.finfo(self.dtype).min)
        return mask[None, None]

    def __repr__(self) -> str:
        s = self.shape
        return (f"HFDecoder({self._family}, layers={s.n_layers}, d={s.d_model}, heads={s.n_heads}/"
                f"{s.n_kv_heads}, dtype={self.dtype}, attn={self.config._attn_implementation})")
