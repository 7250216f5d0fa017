"""thrifty's sdpa (grouped-query attention under a mask, `thrifty.backbones.attention`) equals transformers' sdpa
and eager attention, through the model's own forward and through a session's masked prefill over a cache."""

import pytest
import torch

from thrifty.backbones import HFDecoder, tiny_model
from thrifty.backbones.attention import GQA_SDPA, SDPA_NAMES
from thrifty.runtime import Session

GQA_FAMILIES = ["llama", "qwen2", "mistral"]  # tiny configs: 4 query heads over 2 KV heads


def _ids(n, seed=3):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_a_wrapped_sdpa_model_switches_to_the_gqa_form(family):
    bb = HFDecoder.from_model(tiny_model(family, attn_implementation="sdpa"))
    assert bb.config._attn_implementation == GQA_SDPA and bb.is_sdpa
    assert not HFDecoder.from_model(tiny_model(family, attn_implementation="eager")).is_sdpa
    assert set(SDPA_NAMES) == {"sdpa", GQA_SDPA}


def _prefill_over_cache(bb, ids):
    s = Session(bb)
    s.extend(ids[0, :25])
    return s.extend(ids[0, 25:], logits="all").logits  # 15 queries over 25 cached keys: a mask on every layer


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_masked_prefill_over_a_cache_equals_transformers_sdpa_and_eager(family):
    """The case the GQA form changes: several queries under a mask (a prefill after a cached prefix). Against the
    same session run with transformers' sdpa (switched back after wrapping): bit for bit; against the models' own forward under sdpa and eager: within 1e-5."""
    ids = _ids(40)
    refs = {}
    for attn in ("sdpa", "eager"):
        model = tiny_model(family, attn_implementation=attn)
        with torch.no_grad():
            refs[attn] = model(ids).logits[0]
    out = _prefill_over_cache(HFDecoder.from_model(tiny_model(family, attn_implementation="sdpa")), ids)
    plain = HFDecoder.from_model(tiny_model(family, attn_implementation="sdpa"))
    plain.model.set_attn_implementation("sdpa")
    assert plain.config._attn_implementation == "sdpa"
    assert torch.equal(out, _prefill_over_cache(plain, ids))
    torch.testing.assert_close(out, refs["sdpa"][25:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out, refs["eager"][25:], atol=1e-5, rtol=0)


def test_the_models_own_forward_and_its_training_gradients_are_unchanged():
    """A model's own forward (the masks it builds itself, e.g. with padding in training) and its gradients."""
    ids = _ids(24)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :5] = 0  # left padding: a mask, so the GQA form runs
    grads = []
    for wrap in (False, True):
        model = tiny_model("llama", attn_implementation="sdpa")
        if wrap:
            HFDecoder.from_model(model)
        model.train()
        model.requires_grad_(True)
        loss = model(ids, attention_mask=attention_mask, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=0)
