"""Session: greedy decode == generate, fork isolation, rollback, pruning via layer_hook, cost records."""

from functools import lru_cache

import pytest
import torch

from thrifty.backbones import FAMILIES, SUPPORTED_FAMILIES, HFDecoder, tiny_model
from thrifty.cost import LayerWork, forward_flops, kv_bytes
from thrifty.runtime import Session

TOL = 1e-5


@lru_cache(maxsize=None)
def backbone(family, attn=None, window=None):
    kw = {"sliding_window": window} if window else {}
    return HFDecoder.from_model(tiny_model(family, attn_implementation=attn, **kw))


def _ids(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g)


@pytest.mark.parametrize("family,window", [(f, None) for f in SUPPORTED_FAMILIES] + [("mistral", 6)])
def test_decode_matches_generate(family, window):
    bb = backbone(family, window=window)
    prompt, n = _ids(10), 12
    with torch.no_grad():
        gen = bb.model.generate(prompt[None], do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    s = Session(bb)
    s.extend(prompt)
    out = s.decode(n)
    assert out.token_ids == gen[0, 10:].tolist()
    assert len(s) == 10 + n and s.token_ids == gen[0].tolist() and s.kv_lengths() == [10 + n] * bb.n_layers
    assert len(out.works) == n
    if window is None:
        assert out.works[3] == [LayerWork.causal(1, cached=13)] * bb.n_layers


def test_decode_stop_and_errors():
    bb = backbone("llama")
    s = Session(bb)
    with pytest.raises(RuntimeError, match="extend"):
        s.decode(3)
    s.extend(_ids(8))
    ref = s.fork().decode(6).token_ids
    out = s.decode(6, stop_ids=[ref[2]])
    assert out.token_ids == ref[: ref.index(ref[2]) + 1]
    assert s.decode(0).token_ids == []


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_fork_isolation(family):
    bb = backbone(family)
    s = Session(bb)
    s.extend(_ids(12), span="mission")
    snap = [t.clone() for t in s.kv_tensors()]
    lengths, pos = s.kv_lengths(), [p.clone() for p in s.positions]
    f = s.fork()
    f.extend(_ids(5, seed=2), span="observation")
    f.decode(3)
    f.rollback(6)
    f.extend(_ids(4, seed=3), layer_hook=lambda l, h, p: torch.tensor([0, len(p) - 1]) if l == 0 else None)
    assert s.kv_lengths() == lengths and len(s) == 12 and s.spans == {"mission": (0, 12)}
    assert all(torch.equal(a, b) for a, b in zip(s.kv_tensors(), snap))
    assert all(torch.equal(a, b) for a, b in zip(s.positions, pos))
    fresh = Session(bb)
    fresh.extend(_ids(12))
    assert s.decode(5).token_ids == fresh.decode(5).token_ids


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_rollback_then_extend_equals_fresh(family):
    bb = backbone(family)
    prompt, obs = _ids(12), _ids(8, seed=2)
    s = Session(bb)
    s.extend(prompt, span="mission")
    s.extend(obs, span="observation")
    s.decode(3)
    s.rollback(15)
    assert len(s) == 15 and s.next_position == 15 and s.kv_lengths() == [15] * bb.n_layers
    assert s.spans == {"mission": (0, 12), "observation": (12, 15)}
    with pytest.raises(RuntimeError):
        s.decode(1)
    got = s.extend(obs[3:], logits="all")
    fresh = Session(bb)
    fresh.extend(prompt)
    ref = fresh.extend(obs, logits="all")
    assert (got.logits - ref.logits[3:]).abs().max().item() <= TOL
    assert s.token_ids == fresh.token_ids
    assert all((a - b).abs().max().item() <= TOL for a, b in zip(s.kv_tensors(), fresh.kv_tensors()))
    assert s.decode(4).token_ids == fresh.decode(4).token_ids
    with pytest.raises(ValueError):
        s.rollback(100)


def _masked_reference(bb, ids, dropped, from_layer):
    """Logits [T, vocab] of the full sequence where `dropped` positions are not attended (as keys) by other
    queries in layers >= from_layer; built with the backbone's own mask, nothing is removed."""
    pos = torch.arange(len(ids))
    drop = torch.zeros(len(ids), dtype=torch.bool)
    drop[dropped] = True
    with torch.no_grad():
        h = bb.embed(ids[None])
        for l in range(bb.n_layers):
            mask = bb.attention_mask(pos, pos, l)
            if l >= from_layer:
                hide = drop[None, :] & ~torch.eye(len(ids), dtype=torch.bool)  # dropped rows still see themselves
                mask = mask.masked_fill(hide[None, None], torch.finfo(bb.dtype).min)
            h = bb.run_layer(l, h, pos, mask, None)
        return bb.logits(h[0])


@pytest.mark.parametrize("family,attn", [(f, a) for f in SUPPORTED_FAMILIES for a in ("sdpa", "eager")
                                         if a == "eager" or FAMILIES[f].sdpa])
def test_layer_hook_prunes_like_masking(family, attn):
    bb = backbone(family, attn)
    prompt, more = _ids(16), _ids(5, seed=4)
    dropped = [3, 7, 8]
    seen = []

    def hook(l, h, p):
        seen.append((l, h.shape[1], p.clone()))
        if l == 1:
            return torch.tensor([i for i in range(len(p)) if i not in dropped])
        return None

    s = Session(bb)
    out = s.extend(prompt, logits="all", layer_hook=hook)
    kept = [i for i in range(16) if i not in dropped]
    assert s.kv_lengths() == [16, 16, 13, 13]
    assert out.positions_kept.tolist() == kept and out.logits.shape == (13, 256)
    assert [x[1] for x in seen] == [16, 16, 13, 13] and seen[2][2].tolist() == kept
    assert out.works == [LayerWork.causal(16)] * 2 + [LayerWork.causal(13)] * 2
    assert s.positions[2].tolist() == kept

    ref = _masked_reference(bb, prompt, dropped, from_layer=2)
    assert (out.logits - ref[kept]).abs().max().item() <= TOL
    # later tokens keep attending around the hole
    nxt = s.extend(more, logits="all")
    ref2 = _masked_reference(bb, torch.cat([prompt, more]), dropped, from_layer=2)
    assert (nxt.logits - ref2[16:]).abs().max().item() <= TOL
    assert nxt.works == [LayerWork.causal(5, 16)] * 2 + [LayerWork.causal(5, 13)] * 2
    assert s.kv_lengths() == [21, 21, 18, 18]


def test_dropping_last_token_with_last_logits_raises():
    bb = backbone("qwen2")
    s = Session(bb)
    s.extend(_ids(6))
    before = (s.kv_lengths(), len(s), s.next_position)
    with pytest.raises(ValueError, match="final new token"):
        s.extend(_ids(5, seed=2), layer_hook=lambda l, h, p: torch.arange(len(p) - 1) if l == 2 else None)
    assert (s.kv_lengths(), len(s), s.next_position) == before
    # allowed with logits="all"; then decode has nothing to start from
    r = s.extend(_ids(5, seed=2), logits="all", layer_hook=lambda l, h, p: torch.arange(len(p) - 1) if l == 2 else None)
    assert r.logits.shape == (4, 256) and s.kv_lengths() == [11, 11, 11, 10]
    with pytest.raises(RuntimeError):
        s.decode(1)
    with pytest.raises(ValueError, match="sorted"):
        s.extend([1, 2], layer_hook=lambda l, h, p: torch.tensor([1, 0]))


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_work_records_and_memory(family):
    bb = backbone(family)
    s = Session(bb)
    a = s.extend(_ids(10))
    b = s.extend(_ids(5, seed=2))
    assert a.works == [LayerWork.causal(10)] * bb.n_layers
    assert b.works == [LayerWork.causal(5, cached=10)] * bb.n_layers
    assert forward_flops(bb.shape, b.works, b.n_logits) > 0
    sh = bb.shape
    assert kv_bytes(s.kv_tensors()) == 2 * sh.n_layers * 15 * sh.n_kv_heads * sh.head_dim * 4
    assert len(s.kv_tensors()) == 2 * sh.n_layers and s.kv_tensors()[0].shape == (1, sh.n_kv_heads, 15, sh.head_dim)


def test_sliding_window_pairs():
    bb = backbone("mistral", window=6)
    w = Session(bb).extend(_ids(10)).works[0]
    # query at position p sees min(p + 1, 6) keys
    assert w == LayerWork(10, sum(min(p + 1, 6) for p in range(10)))
