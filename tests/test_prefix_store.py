"""Prefix store: lookups equal recomputation, shared prefixes are never mutated, eviction keeps to the budget."""

from functools import lru_cache

import pytest
import torch

from thrifty.backbones import HFDecoder, tiny_model
from thrifty.runtime import Session
from thrifty.runtime.prefix_store import PrefixStore, shared_store

TOL = 1e-5


@lru_cache(maxsize=None)
def backbone(family="llama", seed=0):
    return HFDecoder.from_model(tiny_model(family, seed=seed))


def _ids(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def _session(ids, bb=None, hook=None):
    s = Session(bb or backbone())
    s.extend(ids, layer_hook=hook)
    return s


def _store_tensors(store):
    out, stack = [], [r.node for r in store._roots.values()]
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        out += [t for seg in node.kv for t in seg]
    return out


def _recomputed_bytes(store):
    return sum(t.numel() * t.element_size() for t in _store_tensors(store))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lookup_then_extend_equals_recompute(family):
    bb = backbone(family)
    a, b = _ids(20), _ids(20, seed=2)
    store = PrefixStore(1 << 24)
    assert store.insert(_session(a, bb)) == 20
    assert store.insert(_session(a[:12] + b[:8], bb)) == 8  # splits a's edge at 12
    for ctx, expect in [(a + b[:5], 20), (a[:12] + b[:8] + a[:3], 20), (a[:7] + b[:4], 7), (b, 0)]:
        hit, n = store.lookup(bb, ctx, max_len=len(ctx) - 1)
        assert n == expect
        s = hit if hit is not None else Session(bb)
        got = s.extend(ctx[n:], logits="all").logits
        ref = Session(bb).extend(ctx, logits="all").logits[n:]
        assert (got - ref).abs().max() <= TOL
        assert s.token_ids == ctx and s.kv_lengths() == [len(ctx)] * bb.n_layers


def test_partial_match_of_a_pruned_session_equals_its_rollback():
    """Per-layer variable-length caches (token pruning) are stored and cut exactly like Session.rollback."""
    bb = backbone()
    ids = _ids(16)
    drop_odd = lambda l, h, p: torch.nonzero((p % 2 == 0) | (p == p[-1])).flatten() if l == 1 else None
    s = _session(ids, hook=drop_odd)
    store = PrefixStore(1 << 24)
    store.insert(s)
    hit, n = store.lookup(bb, ids[:11] + [7, 7])
    assert n == 11
    ref = s.fork()
    ref.rollback(11)
    assert hit.kv_lengths() == ref.kv_lengths() and hit.kv_lengths()[2] < 11
    for l in range(bb.n_layers):
        assert all(torch.equal(x, y) for x, y in zip(hit.layer_kv(l), ref.layer_kv(l)))
    tail = [3, 4, 5]
    assert torch.allclose(hit.extend(tail).logits, ref.extend(tail).logits, atol=TOL, rtol=0)


def test_forks_never_mutate_the_shared_prefix():
    bb = backbone()
    store = PrefixStore(1 << 24)
    a = _ids(24)
    store.insert(_session(a))
    snap = [t.clone() for t in _store_tensors(store)]
    hit, n = store.lookup(bb, a[:10] + [1, 2, 3])
    other, _ = store.lookup(bb, a + [9])
    before = [t.clone() for t in other.kv_tensors()]
    hit.extend([1, 2, 3])
    hit.decode(4)
    f = hit.fork()
    f.rollback(5)
    f.extend(_ids(6, seed=5), layer_hook=lambda l, h, p: torch.tensor([len(p) - 1]) if l == 0 else None)
    store.insert(hit)  # splits the shared edge at 10: new tensors for both halves
    store.insert(f)
    assert all(torch.equal(x, y) for x, y in zip(other.kv_tensors(), before))
    hit2, n2 = store.lookup(bb, a + [9])
    assert n2 == 24 and all(torch.equal(x, y) for x, y in zip(hit2.kv_tensors(), before))
    # the original entries, wherever they now live, hold the same values
    cat = torch.cat([t.flatten().float() for t in snap])
    cat2 = torch.cat([t.flatten().float() for t in hit2.kv_tensors() + hit2.positions])
    assert torch.equal(torch.sort(cat).values, torch.sort(cat2).values)


def test_eviction_keeps_to_the_budget_and_is_lru():
    bb = backbone()
    per_token = _recomputed_bytes_of(_session(_ids(1)))
    budget = 50 * per_token
    store = PrefixStore(budget)
    seqs = [_ids(20, seed=s) for s in range(10)]
    for i, seq in enumerate(seqs):
        store.insert(_session(seq))
        assert store.nbytes <= budget
        assert store.nbytes == _recomputed_bytes(store)
        if i >= 1:
            store.lookup(bb, seqs[0])  # keep the first one hot
    assert store.match(bb, seqs[0]) == 20
    assert store.match(bb, seqs[-1]) == 20
    assert store.match(bb, seqs[1]) == 0  # least recently used: evicted
    assert store.evicted_bytes > 0
    big = PrefixStore(per_token * 5)
    big.insert(_session(_ids(8)))  # alone larger than the budget: not kept
    assert big.nbytes == 0 and big.match(bb, _ids(8)) == 0
    assert PrefixStore(0).insert(_session(_ids(4))) == 0


def _recomputed_bytes_of(session):
    return sum(t.numel() * t.element_size() for t in session.kv_tensors()) + \
        sum(p.numel() * p.element_size() for p in session.positions)


def test_namespaces_and_backbones_do_not_mix_and_counters_are_tokens():
    bb, bb2 = backbone(), backbone(seed=1)
    ids = _ids(12)
    store = PrefixStore(1 << 24)
    store.insert(_session(ids), namespace="reuse")
    assert store.match(bb, ids, namespace="reuse") == 12
    assert store.match(bb, ids) == 0 and store.match(bb2, ids, namespace="reuse") == 0
    store.lookup(bb, ids + [1, 2], namespace="reuse", max_len=13)
    store.lookup(bb, _ids(6, seed=9), namespace="reuse")
    assert (store.queries, store.hits) == (14 + 6, 12)
    assert store.hit_rate == pytest.approx(12 / 20)


def test_shared_store_is_one_per_name():
    s = shared_store("test-shared", 1000)
    assert shared_store("test-shared", 1000) is s
    with pytest.raises(ValueError, match="budget"):
        shared_store("test-shared", 2000)
    with pytest.raises(ValueError):
        PrefixStore(-1)


def test_lookup_on_a_base_session_equals_a_plain_lookup():
    """A kept session plus the store's rest (what prefix_reuse does) equals assembling it all from the store."""
    bb = backbone()
    a = _ids(30)
    store = PrefixStore(1 << 24)
    for cut in (8, 17, 30):  # a chain of three edges, like three decisions
        store.insert(_session(a[:cut]))
    drop_odd = lambda l, h, p: torch.nonzero((p % 2 == 0) | (p == p[-1])).flatten() if l == 1 else None
    for base_len in (0, 5, 8, 12):
        base = Session(bb)
        if base_len:
            base = store.lookup(bb, a[:base_len])[0]
        via_base, n = store.lookup(bb, a + [1], base=base if base_len else None)
        plain, n2 = store.lookup(bb, a + [1])
        assert n == n2 == 30 and via_base.kv_lengths() == plain.kv_lengths()
        assert all(torch.equal(x, y) for x, y in zip(via_base.kv_tensors(), plain.kv_tensors()))
    with pytest.raises(ValueError, match="prefix"):
        store.lookup(bb, a, base=_session([7, 7, 7]))
    pruned = PrefixStore(1 << 24)
    pruned.insert(_session(a, hook=drop_odd))
    base = pruned.lookup(bb, a[:9])[0]
    via_base, _ = pruned.lookup(bb, a, base=base)
    plain, _ = pruned.lookup(bb, a)
    assert via_base.kv_lengths() == plain.kv_lengths()
    assert all(torch.equal(x, y) for x, y in zip(via_base.positions, plain.positions))
