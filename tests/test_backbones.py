"""HFDecoder: layer-by-layer forward equals the model's own forward (every family, sdpa and eager, with and
without sliding windows, with and without a cache); family traits; shapes; masks; load errors and refusals.

Every test here fails on a FutureWarning or DeprecationWarning: thrifty must call transformers through its
supported API only (issue 21)."""

import pytest
import torch

from thrifty.backbones import FAMILIES, SUPPORTED_FAMILIES, HFDecoder, ModelLoadError, tiny_config, tiny_model
from thrifty.cost import ModelShape
from thrifty.runtime import Session

pytestmark = [pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("error::DeprecationWarning")]

TOL = 1e-5
WINDOW = 6  # shorter than the test sequences, so sliding-window masks matter

# how a tiny config of each windowed family turns on windows of WINDOW tokens
_WINDOWS = {
    "mistral": {"sliding_window": WINDOW},  # every layer
    "phi3": {"sliding_window": WINDOW},  # every layer
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},  # layers >= 2 slide
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
    "gemma2": {"sliding_window": WINDOW},  # even layers slide
    "gemma3_text": {"sliding_window": WINDOW},  # even layers slide (tiny layer_types), local rotary there
}


def _window_overrides(family, window):
    return {} if window is None else _WINDOWS[family]


def _attentions(family):
    return ("sdpa", "eager") if FAMILIES[family].sdpa else ("eager",)


CASES = [
    (f, attn, w)
    for f in SUPPORTED_FAMILIES
    for attn in _attentions(f)
    for w in (None, WINDOW)
    if w is None or f in _WINDOWS
]


def test_every_windowed_family_is_tested_with_windows():
    windowed = {f for f, t in FAMILIES.items() if t.windows != "none"}
    assert windowed == set(_WINDOWS)


def _ids(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, n), generator=g)


@pytest.mark.parametrize("family,attn,window", CASES)
def test_extend_matches_model_forward(family, attn, window):
    model = tiny_model(family, attn_implementation=attn, **_window_overrides(family, window))
    bb = HFDecoder.from_model(model)
    if window is not None:
        assert any(bb.sliding_window(i) == window for i in range(bb.n_layers))
    else:
        assert all(bb.sliding_window(i) is None or bb.sliding_window(i) > 20 for i in range(bb.n_layers))
    ids = _ids(20)
    with torch.no_grad():
        ref = model(ids).logits[0]
    out = Session(bb).extend(ids, logits="all")
    assert out.logits.shape == ref.shape
    assert (out.logits - ref).abs().max().item() <= TOL
    assert torch.equal(out.positions_kept, torch.arange(20))

    # prefix in the cache, then the suffix
    s = Session(bb)
    last = s.extend(ids[0, :12])
    assert last.logits.shape == (1, 256)
    assert (last.logits[0] - ref[11]).abs().max().item() <= TOL
    suf = s.extend(ids[0, 12:], logits="all")
    assert (suf.logits - ref[12:]).abs().max().item() <= TOL
    assert s.kv_lengths() == [20] * bb.n_layers


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_decode_matches_model_forward(family):
    """Greedy decoding through the session's cache equals re-running the model's own forward on the whole text."""
    model = tiny_model(family)
    s = Session(HFDecoder.from_model(model))
    s.extend(_ids(8))
    out = s.decode(6)
    with torch.no_grad():
        ref = model(torch.tensor([s.token_ids])).logits[0]
    assert out.token_ids == ref[7:-1].argmax(-1).tolist()
    torch.testing.assert_close(s._last_logits, ref[-1], atol=TOL, rtol=0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "granite", "cohere"])
def test_logit_traits_are_exercised(family):
    """The tiny config makes the family's logit scaling / soft-cap matter: the bare head differs from the model."""
    model = tiny_model(family)
    bb = HFDecoder.from_model(model)
    ids = _ids(12)
    with torch.no_grad():
        ref = model(ids).logits[0]
        h = model.model(ids).last_hidden_state[0]  # already normed
        bare = model.lm_head(h)
    assert (bare - ref).abs().max().item() > 1e-2
    cap = bb.traits.config_value(bb.config, bb.traits.logit_softcap)
    if cap is not None:
        assert ref.abs().max().item() < cap


def test_granite_embedding_multiplier_and_gemma_scaled_embedding():
    granite = HFDecoder.from_model(tiny_model("granite"))
    ids = _ids(5)[None]
    raw = granite.model.model.embed_tokens(ids)
    torch.testing.assert_close(granite.embed(ids), raw * granite.config.embedding_multiplier, atol=0, rtol=0)
    gemma = HFDecoder.from_model(tiny_model("gemma2", attn_implementation="eager"))
    assert gemma.traits.embedding_multiplier is None  # sqrt(d) is applied by the embedding module itself
    raw = torch.nn.functional.embedding(ids, gemma.model.model.embed_tokens.weight)
    torch.testing.assert_close(gemma.embed(ids), raw * 64 ** 0.5, atol=1e-6, rtol=0)


def test_gemma3_local_and_global_rotary():
    bb = HFDecoder.from_model(tiny_model("gemma3_text", sliding_window=WINDOW))
    pos = torch.arange(10)
    h = bb.embed(_ids(10)[None])
    tables = bb.rotary(h, pos)
    assert set(tables) == {"sliding_attention", "full_attention"}
    assert not torch.allclose(tables["sliding_attention"][0], tables["full_attention"][0])  # bases 1e4 vs 1e6
    assert [bb.sliding_window(i) for i in range(4)] == [WINDOW, None, WINDOW, None]


def test_cache_argument_follows_the_layer_signature():
    from thrifty.backbones.hf import _cache_argument

    class New(torch.nn.Module):
        def forward(self, hidden_states, cache=None, use_cache=False, **kwargs): ...

    class Old(torch.nn.Module):
        def forward(self, hidden_states, past_key_values=None, **kwargs): ...

    class Neither(torch.nn.Module):
        def forward(self, hidden_states, **kwargs): ...

    assert _cache_argument(New()) == ("cache", True)
    assert _cache_argument(Old()) == ("past_key_values", False)
    with pytest.raises(ModelLoadError, match="neither"):
        _cache_argument(Neither())


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_no_deprecated_api(family):
    """extend, extend over a cache, decode and fork never raise a FutureWarning/DeprecationWarning (the marks at
    the top of this file turn them into errors); this checks the cache argument explicitly too."""
    import inspect

    bb = HFDecoder.from_model(tiny_model(family))
    assert bb._cache_arg in inspect.signature(type(bb.model.model.layers[0]).forward).parameters
    s = Session(bb)
    s.extend(_ids(9))
    s.fork().extend(_ids(3, seed=2))
    s.decode(2)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_shape(family):
    bb = HFDecoder.from_model(tiny_model(family))
    hd = 32 if family == "qwen3" else 16
    assert bb.shape == ModelShape(n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, head_dim=hd, d_ff=128,
                                  vocab_size=256)
    assert bb.family == family and bb.n_layers == 4
    assert bb.dtype == torch.float32 and bb.device.type == "cpu"


def test_shape_overrides():
    bb = HFDecoder.from_model(tiny_model("llama", num_hidden_layers=2, hidden_size=96, num_attention_heads=6,
                                         num_key_value_heads=3, intermediate_size=200, vocab_size=300))
    assert bb.shape == ModelShape(2, 96, 6, 3, 16, 200, 300)


def test_attention_mask_values():
    bb = HFDecoder.from_model(tiny_model("mistral", sliding_window=3))
    m = bb.attention_mask(torch.tensor([5, 6]), torch.tensor([0, 2, 3, 4, 5, 6]), 0)
    assert m.shape == (1, 1, 2, 6) and m.dtype == torch.float32
    visible = (m[0, 0] == 0).int().tolist()
    assert visible == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    assert m[0, 0, 0, 0].item() == torch.finfo(torch.float32).min
    full = HFDecoder.from_model(tiny_model("llama"))
    assert (full.attention_mask(torch.tensor([5, 6]), torch.tensor([0, 2, 3, 4, 5, 6]), 0)[0, 0] == 0).int().tolist() \
        == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]


def test_load_equals_in_memory(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    bb = HFDecoder.load(tmp_path / "m")
    assert bb.family == "llama" and not bb.model.training
    assert all(not p.requires_grad for p in bb.model.parameters())
    ids = _ids(10)
    with torch.no_grad():
        ref = model(ids).logits[0]
    assert (Session(bb).extend(ids, logits="all").logits - ref).abs().max().item() <= TOL
    eager = HFDecoder.load(str(tmp_path / "m"), attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    assert (Session(eager).extend(ids, logits="all").logits - ref).abs().max().item() <= TOL


def test_load_missing_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="no model directory at"):
        HFDecoder.load(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ModelLoadError, match="config.json"):
        HFDecoder.load(f)


def test_load_no_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        HFDecoder.load(tmp_path)


def test_load_unsupported_family(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        HFDecoder.load(tmp_path)
    msg = str(e.value)
    assert "gpt2" in msg and all(f in msg for f in SUPPORTED_FAMILIES)
    with pytest.raises(ModelLoadError, match="supported families"):
        HFDecoder.from_model(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)))


def test_refuses_gemma3_image_text_model(tmp_path):
    cfg = '{"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}'
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ModelLoadError, match="gemma3_text") as e:
        HFDecoder.check_dir(tmp_path)
    assert "image-text" in str(e.value) and "supported families" in str(e.value)


def test_refuses_bidirectional_attention():
    with pytest.raises(ModelLoadError, match="use_bidirectional_attention"):
        HFDecoder.from_model(tiny_model("gemma3_text", use_bidirectional_attention=True))


def test_gemma2_defaults_to_eager_and_refuses_sdpa(tmp_path):
    tiny_model("gemma2").save_pretrained(tmp_path)
    assert HFDecoder.load(tmp_path).config._attn_implementation == "eager"
    with pytest.raises(ModelLoadError, match="no sdpa"):
        HFDecoder.load(tmp_path, attn_implementation="sdpa")


def test_load_not_causal_lm(tmp_path):
    cfg = tiny_config("llama", architectures=["LlamaForSequenceClassification"])
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a causal LM") as e:
        HFDecoder.load(tmp_path)
    assert "ForCausalLM" in str(e.value)


def test_load_no_weights(tmp_path):
    tiny_config("qwen2").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="safetensors"):
        HFDecoder.load(tmp_path)
    assert issubclass(ModelLoadError, ValueError)
