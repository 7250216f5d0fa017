"""What each supported model family does *outside* its decoder layers, declared as data.

`HFDecoder` runs embedding -> layers -> final norm -> head through the model's own modules. Everything a family
does between those modules (in its `*Model.forward` / `*ForCausalLM.forward`) is one field of `FamilyTraits`;
everything inside a decoder layer or the embedding module (norm placement, residual and attention multipliers, partial rotary, q/k norms,
attention soft-capping, parallel residuals) is the layer's own business and needs no trait.

Outside the layers (the traits):
- Granite: embeddings times `embedding_multiplier`, logits divided by `logits_scaling`.
- Cohere: logits times `logit_scale`.
- Gemma 2 and 3: logits soft-capped by `final_logit_softcapping`; sliding-window layers by layer type;
  Gemma 3 has local and global rotary tables (one per layer type); Gemma 2 has no sdpa attention.
- Mistral, Phi-3: one window on every layer; Qwen2/3: windows by layer type.
Inside the model's own modules (nothing to declare): Gemma's sqrt(d) embedding scale (its scaled embedding
module), pre/post norms, query_pre_attn_scalar and attention soft-cap; OLMo 2's post-norms and q/k norms;
Granite's residual and attention multipliers; StableLM's partial rotary and LayerNorms; Phi-3's fused projections
and partial rotary; Cohere's parallel attention/MLP residual and interleaved rotary; Qwen3's q/k norms.

Each item was read from transformers' `models/<family>/modeling_<family>.py` and is proven by the differential
test (tests/test_backbones.py); a family not listed here is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class FamilyTraits:
    """One family's steps outside its decoder layers; attribute names refer to the model config."""

    architecture: str
    """the `*ForCausalLM` class of the family (tiny configs and directory checks)"""
    embedding_multiplier: str | None = None
    """h0 = embed_tokens(ids) * config.<attr> (Granite); None: the embedding module output is used as is"""
    logits_divisor: str | None = None
    """logits = head(norm(h)) / config.<attr> (Granite `logits_scaling`)"""
    logits_multiplier: str | None = None
    """logits = head(norm(h)) * config.<attr> (Cohere `logit_scale`)"""
    logit_softcap: str | None = None
    """logits = c * tanh(logits / c) with c = config.<attr>, when it is set (Gemma 2/3 `final_logit_softcapping`)"""
    windows: Literal["none", "every_layer", "by_layer_type"] = "none"
    """which layers see only `config.sliding_window` keys back: none; every layer once `sliding_window` is set
    (Mistral, Phi-3); or the layers whose `config.layer_types[i]` is "sliding_attention" (Qwen, Gemma 2/3)"""
    rotary_by_layer_type: bool = False
    """one rotary table per layer type, `rotary_emb(h, pos, layer_type)` (Gemma 3: local and global bases)"""
    sdpa: bool = True
    """transformers runs this family's attention under sdpa (Gemma 2's attention soft-cap exists only in eager)"""
    refuse_if_set: tuple[tuple[str, str], ...] = ()
    """(config attribute, reason): a config with that attribute truthy is refused with the reason"""

    def attention(self, requested: str | None) -> str:
        """The attention implementation to build with: `requested`, or by default sdpa where the family has it
        and eager otherwise. Raises ValueError for sdpa on a family without it."""
        if requested is None:
            return "sdpa" if self.sdpa else "eager"
        if requested == "sdpa" and not self.sdpa:
            raise ValueError(f"{self.architecture} has no sdpa attention in transformers; use eager")
        return requested

    def config_value(self, config: Any, attr: str | None) -> float | None:
        """config.<attr> as a float, or None when the trait or the config value is unset."""
        value = getattr(config, attr, None) if attr else None
        return None if value is None else float(value)

    def refusal(self, config: Any) -> str | None:
        """Why this config cannot be driven layer by layer, or None."""
        for attr, reason in self.refuse_if_set:
            if getattr(config, attr, None):
                return f"config.{attr} is set: {reason}"
        return None


_BIDIRECTIONAL = ("use_bidirectional_attention", "bidirectional attention is not a causal decoder")

FAMILIES: dict[str, FamilyTraits] = {
    "llama": FamilyTraits("LlamaForCausalLM"),
    "qwen2": FamilyTraits("Qwen2ForCausalLM", windows="by_layer_type"),
    "qwen3": FamilyTraits("Qwen3ForCausalLM", windows="by_layer_type"),
    "mistral": FamilyTraits("MistralForCausalLM", windows="every_layer"),
    "phi3": FamilyTraits("Phi3ForCausalLM", windows="every_layer"),
    "gemma": FamilyTraits("GemmaForCausalLM", refuse_if_set=(_BIDIRECTIONAL,)),
    "gemma2": FamilyTraits("Gemma2ForCausalLM", logit_softcap="final_logit_softcapping", windows="by_layer_type",
                           sdpa=False, refuse_if_set=(_BIDIRECTIONAL,)),
    "gemma3_text": FamilyTraits("Gemma3ForCausalLM", logit_softcap="final_logit_softcapping",
                                windows="by_layer_type", rotary_by_layer_type=True, refuse_if_set=(_BIDIRECTIONAL,)),
    "olmo2": FamilyTraits("Olmo2ForCausalLM"),
    "granite": FamilyTraits("GraniteForCausalLM", embedding_multiplier="embedding_multiplier",
                            logits_divisor="logits_scaling"),
    "stablelm": FamilyTraits("StableLmForCausalLM"),
    "cohere": FamilyTraits("CohereForCausalLM", logits_multiplier="logit_scale"),
}

REFUSED: dict[str, str] = {
    "gemma3": "a Gemma 3 image-text model (Gemma3ForConditionalGeneration); use a text-only Gemma 3 checkpoint "
              "(model_type 'gemma3_text', Gemma3ForCausalLM)",
}
"""Families refused with a specific reason (any other unlisted family gets the generic refusal)."""

SUPPORTED_FAMILIES = tuple(FAMILIES)
