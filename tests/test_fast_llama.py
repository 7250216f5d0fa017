"""The functional Llama layer (`thrifty.backbones.fast_llama`) equals transformers' `LlamaDecoderLayer` bit for bit,
and every case it does not compute exactly goes through the module."""

import pytest
import torch

from thrifty.backbones import HFDecoder, tiny_model
from thrifty.runtime import Session


def _pair(**overrides):
    """Two decoders over identical tiny Llamas: one taking the functional path, one forced through the modules."""
    fast = HFDecoder.from_model(tiny_model("llama", **overrides))
    slow = HFDecoder.from_model(tiny_model("llama", **overrides))
    slow._functional = False
    assert fast._functional
    return fast, slow


def _ids(n, seed=5):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _session_logits(bb, ids):
    s = Session(bb)
    first = s.extend(ids[:30], logits="all").logits  # a fresh cache: causal, no mask
    rest = s.extend(ids[30:], logits="all").logits  # over a cache: a mask
    out = s.decode(4)  # single queries
    return first, rest, out.token_ids, s.kv_tensors()


def test_session_passes_equal_the_modules_bit_for_bit():
    fast, slow = _pair()
    ids = _ids(45)
    a, b = _session_logits(fast, ids), _session_logits(slow, ids)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]))


def test_a_batched_masked_pass_without_cache_equals_the_modules():
    """As the DeeR policy runs it: B rows, a padding mask [B, 1, q, q], no cache."""
    fast, slow = _pair()
    h = torch.randn(3, 9, fast.shape.d_model, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9)
    mask = torch.zeros(3, 1, 9, 9)
    mask[1, ..., :2] = torch.finfo(torch.float32).min
    for l in range(fast.n_layers):
        assert torch.equal(fast.run_layer(l, h, pos, mask, None), slow.run_layer(l, h, pos, mask, None))


def test_it_reads_the_weights_at_every_call():
    fast, slow = _pair()
    ids = _ids(40)
    with torch.no_grad():
        for bb in (fast, slow):
            bb.model.model.layers[1].mlp.down_proj.weight.mul_(1.5)  # trained in place, e.g. by planner RL
    assert torch.equal(Session(fast).extend(ids, logits="all").logits, Session(slow).extend(ids, logits="all").logits)


@pytest.mark.parametrize("case", ["plain", "hook", "train", "eager", "bias", "bfloat16"])
def test_what_it_does_not_compute_exactly_goes_through_the_module(case, monkeypatch):
    from thrifty.backbones import fast_llama

    taken = []
    real = fast_llama.run_layer
    monkeypatch.setattr(fast_llama, "run_layer", lambda *a, **k: taken.append(1) or real(*a, **k))
    if case in ("eager", "bias"):
        model = tiny_model("llama", attn_implementation="eager") if case == "eager" else \
            tiny_model("llama", attention_bias=True)
    else:
        model = tiny_model("llama")
    bb = HFDecoder.from_model(model)
    if case == "train":
        model.train()
    if case == "bfloat16":
        model.to(torch.bfloat16)
    if case == "hook":
        model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: o * 0)  # a hook that changes the output
    h = torch.randn(1, 5, bb.shape.d_model).to(bb.dtype)
    pos = torch.arange(5)
    with torch.no_grad():
        out = bb.run_layer(0, h, pos, None, None)
        ref = model.model.layers[0](h, position_embeddings=bb.rotary(h, pos), position_ids=pos[None])
    assert taken == ([1] if case == "plain" else []), case
    assert torch.equal(out, ref[0] if isinstance(ref, tuple) else ref)
