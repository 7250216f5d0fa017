"""Adapter around a local Hugging Face decoder-only causal LM of a family in `thrifty.backbones.families`.

`HFDecoder` is the only code in thrifty that touches model internals. It exposes the pieces a caller needs
to run the model one layer at a time (embedding, rotary tables, one decoder layer, final norm + head) and
builds explicit additive attention masks from *original* token positions, so that callers can drop tokens
or cache entries anywhere and still get exact attention. Only public submodules are used:
`model.model.embed_tokens`, `.layers[i]`, `.rotary_emb`, `.norm` and `model.lm_head`; what a family does
between them (embedding multiplier, logit scaling and soft-capping, sliding-window layers, rotary per layer
type) is read from its `FamilyTraits`, never from `if family == ...` branches.

Shapes: batch is always 1; q = new query tokens, k = keys visible to them, d = hidden size.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from thrifty.backbones import fast_llama
from thrifty.backbones.attention import GQA_SDPA, SDPA_NAMES
from thrifty.backbones.families import FAMILIES, REFUSED, SUPPORTED_FAMILIES, FamilyTraits
from thrifty.cost.flops import ModelShape

RotaryTables = tuple[torch.Tensor, torch.Tensor] | dict[str, tuple[torch.Tensor, torch.Tensor]]
"""What `rotary` returns and `run_layer` takes: (cos, sin), each [1, q, rotary_dim]; or, for a family with
rotary tables per layer type (Gemma 3), a dict layer type -> (cos, sin)."""

_EXPECTED = "expected a local Hugging Face causal-LM directory (config.json + *.safetensors)"


class ModelLoadError(ValueError):
    """A model directory or in-memory model that thrifty cannot use."""


def _check_family(model_type: Any, where: str) -> str:
    if model_type not in FAMILIES:
        reason = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
        raise ModelLoadError(
            f"{where}: unsupported model family {model_type!r} (config.model_type){reason}; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return model_type


def _check_config(traits: FamilyTraits, config: Any, where: str) -> None:
    refusal = traits.refusal(config)
    if refusal is not None:
        raise ModelLoadError(f"{where}: cannot drive this {config.model_type} model layer by layer: {refusal}")


def _cache_argument(layer: torch.nn.Module) -> tuple[str, bool]:
    """The decoder layer's name for its cache argument ("cache" from transformers 5.24 on, "past_key_values"
    before), and whether it takes `use_cache`; read once from the forward signature."""
    params = inspect.signature(type(layer).forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name, "use_cache" in params
    raise ModelLoadError(f"{type(layer).__name__}.forward names neither 'cache' nor 'past_key_values'")


def _position_ids(positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    """positions [q] (shared by the batch) or [B, q] -> position ids [1 or B, q]."""
    positions = positions.to(device)
    return positions[None] if positions.dim() == 1 else positions


class HFDecoder:
    """A decoder-only causal LM, usable layer by layer. Build with `load(path)` or `from_model(model)`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._family = _check_family(getattr(model.config, "model_type", None), type(model).__name__)
        self._traits = FAMILIES[self._family]
        _check_config(self._traits, model.config, type(model).__name__)
        inner = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "rotary_emb", "norm")
        if inner is None or not hasattr(model, "lm_head") or not all(hasattr(inner, n) for n in needed):
            raise ModelLoadError(
                f"{type(model).__name__} is not a causal LM with .model.{{{','.join(needed)}}} and .lm_head"
            )
        self._cache_arg, self._pass_use_cache = _cache_argument(inner.layers[0])
        c = model.config
        self._embed_mult = self._traits.config_value(c, self._traits.embedding_multiplier)
        self._logits_div = self._traits.config_value(c, self._traits.logits_divisor)
        self._logits_mult = self._traits.config_value(c, self._traits.logits_multiplier)
        self._softcap = self._traits.config_value(c, self._traits.logit_softcap)
        if getattr(c, "_attn_implementation", None) == "sdpa":  # the same attention, without repeat_kv under masks
            model.set_attn_implementation(GQA_SDPA)
        self._functional = fast_llama.config_allows(c)  # Llama layers through their weights (fast_llama)

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
        cls, path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
    ) -> "HFDecoder":
        """Load a local directory (never the network). Raises `ModelLoadError` with a precise reason.

        attn_implementation: None = sdpa where the family has it, else eager (`FamilyTraits.attention`)."""
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        p = cls.check_dir(path)
        family = json.loads((p / "config.json").read_text())["model_type"]
        try:
            attn_implementation = FAMILIES[family].attention(attn_implementation)
        except ValueError as e:
            raise ModelLoadError(f"{p}: {e}") from e
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
        """Wrap an in-memory `*ForCausalLM` (train/eval mode and grads are left as the caller set them; a model
        built with "sdpa" is switched to its exact grouped-query form, `thrifty.backbones.attention`)."""
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
    def is_sdpa(self) -> bool:
        """Attention runs as sdpa (transformers' or `thrifty.backbones.attention`'s): no mask means causal."""
        return getattr(self.config, "_attn_implementation", None) in SDPA_NAMES

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

    @property
    def traits(self) -> FamilyTraits:
        """What this family does outside its decoder layers (`thrifty.backbones.families`)."""
        return self._traits

    def sliding_window(self, layer_idx: int) -> int | None:
        """Window size W of layer `layer_idx` (a query at p sees keys at p-W+1..p), or None for full causal."""
        c = self.config
        window = getattr(c, "sliding_window", None)
        kind = self._traits.windows
        if window is None or kind == "none":
            return None
        if kind == "by_layer_type" and c.layer_types[layer_idx] != "sliding_attention":
            return None
        return int(window)

    # ------------------------------------------------------------------ pieces of the forward
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids LongTensor [1, q] -> hidden [1, q, d] (times the family's embedding multiplier, if any)."""
        h = self._model.model.embed_tokens(ids.to(self.device))
        return h if self._embed_mult is None else h * self._embed_mult

    def rotary(self, h: torch.Tensor, positions: torch.Tensor) -> RotaryTables:
        """Rotary tables for original positions [q], or [B, q] per row (h [B, q, d] gives dtype/device), see
        `RotaryTables`."""
        emb, pos = self._model.model.rotary_emb, _position_ids(positions, h.device)
        if self._traits.rotary_by_layer_type:
            return {t: emb(h, pos, t) for t in sorted(set(self.config.layer_types))}
        return emb(h, pos)

    def run_layer(
        self,
        i: int,
        h: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Any,
        position_embeddings: RotaryTables | None = None,
    ) -> torch.Tensor:
        """Decoder layer i on h [B, q, d] at positions [q] or [B, q] with additive mask [B|1, 1, q, k] -> [B, q, d].

        `cache` (or None) must offer `update(k, v, layer_idx)` returning all k keys/values of layer i,
        ordered like the mask's key axis. `position_embeddings` defaults to `rotary(h, positions)`.
        """
        pe = self.rotary(h, positions) if position_embeddings is None else position_embeddings
        if self._traits.rotary_by_layer_type:
            pe = pe[self.config.layer_types[i]]
        layer = self._model.model.layers[i]
        if self._functional and fast_llama.layer_allows(layer, self.config, h):
            return fast_llama.run_layer(layer, h, pe, mask, cache)
        kwargs = {self._cache_arg: cache}
        if self._pass_use_cache:
            kwargs["use_cache"] = cache is not None
        out = self._model.model.layers[i](
            h, attention_mask=mask, position_ids=_position_ids(positions, h.device), position_embeddings=pe, **kwargs
        )
        return out[0] if isinstance(out, (tuple, list)) else out

    def layer_kv(self, i: int, h: torch.Tensor, positions: torch.Tensor, cache: Any,
                 position_embeddings: RotaryTables | None = None) -> None:
        """Write into `cache` the keys and values decoder layer i would compute for hidden states h [1, q, d] at
        positions [q] (its input norm and attention module's own projections, norms and rotary), without running
        its attention or MLP: CALM's state propagation (Schuster et al., 2022) for early-exited tokens. The
        layer's attention module runs until its cache write, where it is stopped."""
        layer = self._model.model.layers[i]
        norm = getattr(layer, "input_layernorm", None)
        attn = getattr(layer, "self_attn", None)
        if norm is None or attn is None:
            raise ModelLoadError(f"{type(layer).__name__} has no input_layernorm/self_attn: cannot compute its "
                                 "keys and values alone (use early exit's deep_kv='skip')")
        pe = self.rotary(h, positions) if position_embeddings is None else position_embeddings
        if self._traits.rotary_by_layer_type:
            pe = pe[self.config.layer_types[i]]

        class _Written(Exception):
            pass

        class _StopAtWrite:
            def update(self, k, v, layer_idx, *args, **kwargs):
                cache.update(k, v, layer_idx)
                raise _Written

        kwargs = {self._cache_arg: _StopAtWrite()}
        try:
            attn(norm(h), position_embeddings=pe, attention_mask=None,
                 position_ids=_position_ids(positions, h.device), **kwargs)
        except _Written:
            return
        raise ModelLoadError(f"{type(attn).__name__} did not write its keys and values to the cache")

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> the model's final norm of it [..., d] (for heads other than the LM head)."""
        return self._model.model.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] -> logits [..., vocab]: final norm, head, then the family's logit scaling/soft-cap."""
        out = self._model.lm_head(self._model.model.norm(h))
        if self._logits_div is not None:
            out = out / self._logits_div
        if self._logits_mult is not None:
            out = out * self._logits_mult
        if self._softcap is not None:
            out = torch.tanh(out / self._softcap) * self._softcap
        return out

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
