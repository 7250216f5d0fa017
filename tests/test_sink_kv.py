"""Sink-KV (thrifty.techniques.sink_kv): the attention identities, the sink under episode masks, the no-op variant,
the registered attention function on every family, the sink kept out of the cache, trainability, bad variants."""

import doctest

import pytest
import torch

from thrifty.backbones import SUPPORTED_FAMILIES, HFDecoder, tiny_model
from thrifty.runtime import Session
from thrifty.techniques import REGISTRY, build, sink_kv
from thrifty.techniques.sink_kv import (ATTENTION_NAME, SINK_VARIANTS, SinkKV, UnknownSinkVariantError, attend,
                                        lse_merge)

pytestmark = [pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("error::DeprecationWarning")]


def _qkv(b=2, h=4, hkv=2, q=5, k=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, q, d, generator=g), torch.randn(b, hkv, k, d, generator=g),
            torch.randn(b, hkv, k, d, generator=g))


def _causal(q, k):
    return torch.ones(q, k, dtype=torch.bool).tril(k - q)


def test_zero_key_and_value_equal_softmax_off_by_one():
    q, k, v = _qkv()
    s = 8 ** -0.5
    zeros = torch.zeros(2, 8)
    got = attend(q, k, v, _causal(5, 5), s, zeros, zeros)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    e = torch.exp(q @ kk.transpose(-1, -2) * s) * _causal(5, 5)
    want = (e / (1 + e.sum(-1, keepdim=True))) @ vv  # the +1 of softmax-off-by-one
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, attend(q, k, v, _causal(5, 5), s))


def test_lse_merge_equals_attention_over_the_appended_column():
    q, k, v = _qkv(seed=1)
    g = torch.Generator().manual_seed(2)
    sk, sv = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    s, mask = 8 ** -0.5, _causal(5, 5)
    appended = attend(q, k, v, mask, s, sk, sv)
    plain = attend(q, k, v, mask, s)
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * s).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, -1)  # [B, H, q]
    sink_logit = torch.einsum("bhqd,hd->bhq", q, sk.repeat_interleave(2, 0)) * s
    merged = lse_merge(plain, lse, sink_logit, sv.repeat_interleave(2, 0)[None, :, None, :])
    torch.testing.assert_close(merged, appended, atol=1e-6, rtol=1e-5)
    # and the appended column is literally one more key/value pair that no mask touches
    kk = torch.cat([k, sk[None, :, None].expand(2, -1, 1, -1)], 2)
    vv = torch.cat([v, sv[None, :, None].expand(2, -1, 1, -1)], 2)
    torch.testing.assert_close(attend(q, kk, vv, torch.cat([mask, torch.ones(5, 1, dtype=torch.bool)], 1), s),
                               appended, atol=1e-6, rtol=1e-5)


def test_no_sink_equals_sdpa_with_grouped_query_heads():
    q, k, v = _qkv(q=3, k=7, seed=3)  # decoding 3 queries over 7 keys: causal aligned to the end
    got = attend(q, k, v, None, 8 ** -0.5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=_causal(3, 7), enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_the_sink_under_a_block_diagonal_episode_mask():
    """Episodes [0, 3) and [3, 7): each query sees its episode's past and the sink, and nothing of the other
    episode; its output is that of its episode alone. A fully masked row gets the sink value exactly."""
    q, k, v = _qkv(q=7, k=7, seed=4)
    g = torch.Generator().manual_seed(5)
    sk, sv = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    episode = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    mask = _causal(7, 7) & (episode[:, None] == episode[None, :])
    s = 8 ** -0.5
    out = attend(q, k, v, mask, s, sk, sv)
    second = attend(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], _causal(4, 4), s, sk, sv)
    torch.testing.assert_close(out[:, :, 3:], second, atol=1e-6, rtol=1e-5)
    first = attend(q[:, :, :3], k[:, :, :3], v[:, :, :3], _causal(3, 3), s, sk, sv)
    torch.testing.assert_close(out[:, :, :3], first, atol=1e-6, rtol=1e-5)
    # a first step of an episode still attends to the sink: its output is not its own value
    assert not torch.allclose(out[:, :, 3], v.repeat_interleave(2, 1)[:, :, 3], atol=1e-3)
    none_visible = torch.zeros(7, 7, dtype=torch.bool)
    torch.testing.assert_close(attend(q, k, v, none_visible, s, sk, sv),
                               sv.repeat_interleave(2, 0)[None, :, None].expand(2, -1, 7, -1), atol=1e-6, rtol=0)


def test_unknown_variant_is_refused_with_the_list():
    with pytest.raises(UnknownSinkVariantError, match="'kq'.*none, zero, k, v, kv, token"):
        build("sink_kv", variant="kq")
    assert set(SINK_VARIANTS) == {"none", "zero", "k", "v", "kv", "token"}
    assert REGISTRY["sink_kv"] is SinkKV


@pytest.mark.parametrize("variant,trains", [("zero", (False, False)), ("k", (True, False)),
                                            ("v", (False, True)), ("kv", (True, True))])
def test_sinks_start_at_zero_and_train_only_what_the_variant_says(variant, trains):
    model = tiny_model("llama", num_hidden_layers=2)
    tech = build("sink_kv", variant=variant)
    params = tech.attach(model)
    assert params.key.shape == (2, 2, 16) and params.value.shape == (2, 2, 16)
    assert params.key.abs().sum() == 0 and params.value.abs().sum() == 0
    assert (isinstance(params.key, torch.nn.Parameter), isinstance(params.value, torch.nn.Parameter)) == trains
    assert set(dict(params.named_buffers())) | set(dict(params.named_parameters())) == {"key", "value"}
    assert not any("sink" in n for n in model.state_dict())  # bound to the model, not a submodule of it
    if any(trains):
        model.requires_grad_(False)
        model.model(input_ids=torch.arange(6)[None]).last_hidden_state.square().sum().backward()
        for name, trained in zip(("key", "value"), trains):
            if trained:
                assert getattr(params, name).grad.abs().sum() > 0


def test_variant_none_leaves_the_model_bit_for_bit():
    model = tiny_model("llama")
    ids = torch.arange(3, 20)[None]
    want = model(ids).logits
    tech = build("sink_kv", variant="none")
    assert tech.attach(model) is None and model.config._attn_implementation == "sdpa"
    bb = HFDecoder.from_model(model)
    session, _ = tech.open_session(bb, None)
    got = session.extend(ids[0], logits="all").logits
    full = Session(bb).extend(ids[0], logits="all").logits
    assert torch.equal(got, full)
    assert torch.equal(model(ids).logits, want)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_the_registered_attention_without_a_sink_is_the_familys_attention(family):
    """The function behind the attention interface reproduces each family's own attention (scaling, GQA, Gemma's
    soft-cap, sliding windows in the mask): switched in unbound, the model's own forward gives the same logits."""
    model = tiny_model(family, **({"sliding_window": 4} if family in ("mistral", "phi3") else {}))
    ids = torch.arange(3, 15)[None]
    want = model(ids).logits
    model.set_attn_implementation(ATTENTION_NAME)
    torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_the_sink_never_enters_the_cache(family):
    """A sink that changes the outputs, extended in two parts over the cache or in one: the same logits, and the
    cache holds exactly the real tokens (a cached sink would be attended twice in the second part)."""
    model = tiny_model(family, num_hidden_layers=2)
    bb = HFDecoder.from_model(model)
    ids = torch.arange(3, 21)
    plain = Session(bb).extend(ids, logits="all").logits
    tech = build("sink_kv", variant="kv")
    params = tech.attach(bb)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        params.key.copy_(torch.randn(params.key.shape, generator=g))
        params.value.copy_(torch.randn(params.value.shape, generator=g))
    whole = Session(bb).extend(ids, logits="all").logits
    session = Session(bb)
    a = session.extend(ids[:11], logits="all").logits
    b = session.extend(ids[11:], logits="all").logits
    torch.testing.assert_close(torch.cat([a, b]), whole, atol=1e-5, rtol=0)
    assert session.kv_lengths() == [len(ids)] * 2
    assert (whole - plain).abs().max() > 1e-3
    tech.detach(bb)
    torch.testing.assert_close(Session(bb).extend(ids, logits="all").logits, plain, atol=1e-5, rtol=0)


def test_token_variant_is_refused_by_a_planner_session_and_one_sink_per_model():
    bb = HFDecoder.from_model(tiny_model("llama", num_hidden_layers=1))
    with pytest.raises(ValueError, match="token.*relic_policy"):
        build("sink_kv", variant="token").open_session(bb, None)
    tech = build("sink_kv", variant="k")
    assert tech.attach(bb) is tech.attach(bb)
    with pytest.raises(ValueError, match="another model"):
        tech.attach(tiny_model("llama", num_hidden_layers=1))


def test_a_session_gives_a_shared_backbone_back_as_it_was():
    """open_session attaches the sink for the decision; close_session takes it off again, so the next
    configuration on the same backbone (a bench process keeps one) gets plain attention."""
    model = tiny_model("llama", num_hidden_layers=2)
    bb = HFDecoder.from_model(model)
    before = model.config._attn_implementation
    ids = torch.arange(3, 15)
    plain = Session(bb).extend(ids, logits="all").logits
    tech = build("sink_kv", variant="kv")
    session, _ = tech.open_session(bb, None)
    assert model.config._attn_implementation == sink_kv.ATTENTION_NAME
    with torch.no_grad():
        for t in tech.sink_params.parameters():
            t.fill_(0.5)  # a sink that changes the output
    sunk = session.extend(ids, logits="all").logits
    tech.close_session(session, None, len(ids))
    assert model.config._attn_implementation == before
    assert not any(hasattr(layer.self_attn, "_thrifty_sink") for layer in model.model.layers)
    assert not torch.allclose(sunk, plain, atol=1e-4)
    torch.testing.assert_close(Session(bb).extend(ids, logits="all").logits, plain, atol=1e-6, rtol=0)
    again, _ = tech.open_session(bb, None)  # the same sink parameters come back for the next decision
    torch.testing.assert_close(again.extend(ids, logits="all").logits, sunk, atol=1e-6, rtol=0)
    tech.close_session(again, None, len(ids))
    tech.attach(bb)  # attached by the user: a session leaves it attached
    session, _ = tech.open_session(bb, None)
    tech.close_session(session, None, len(ids))
    assert model.config._attn_implementation == sink_kv.ATTENTION_NAME


def test_docstring_example_runs():
    assert doctest.testmod(sink_kv, raise_on_error=True).failed == 0
