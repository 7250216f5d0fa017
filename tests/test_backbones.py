"""HFDecoder: layer-by-layer forward equals the model's own forward; shapes; masks; load errors."""

import pytest
import torch

from thrifty.backbones import SUPPORTED_FAMILIES, HFDecoder, ModelLoadError, tiny_config, tiny_model
from thrifty.cost import ModelShape
from thrifty.runtime import Session

TOL = 1e-5
WINDOW = 6  # shorter than the test sequences, so sliding-window masks matter


def _window_overrides(family, window):
    if window is None:
        return {}
    if family == "mistral":
        return {"sliding_window": window}
    # Qwen: layers >= max_window_layers slide
    return {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 2}


CASES = [
    (f, attn, w)
    for f in SUPPORTED_FAMILIES
    for attn in ("sdpa", "eager")
    for w in (None, WINDOW)
    if not (f == "llama" and w is not None)
]


def _ids(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, n), generator=g)


@pytest.mark.parametrize("family,attn,window", CASES)
def test_extend_matches_model_forward(family, attn, window):
    model = tiny_model(family, attn_implementation=attn, **_window_overrides(family, window))
    bb = HFDecoder.from_model(model)
    if window is not None:
        assert any(bb.sliding_window(i) == window for i in range(bb.n_layers))
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
