"""The session's capacity-doubling KV buffers (issue 22): appending in place gives exactly the caches that
concatenation gave, and no session, fork or prefix-store entry ever sees its tensors change."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.backbones import HFDecoder, tiny_model
from thrifty.runtime import Session
from thrifty.runtime.prefix_store import PrefixStore

TOL = 1e-5
BB = HFDecoder.from_model(tiny_model("llama", num_hidden_layers=2))


def _fresh(ids):
    s = Session(BB)
    s.extend(torch.tensor(ids))
    return s


def _snapshot(s):
    return [t.clone() for t in s.kv_tensors()], list(s.token_ids)


def _unchanged(s, snap):
    kv, ids = snap
    return s.token_ids == ids and all(torch.equal(a, b) for a, b in zip(s.kv_tensors(), kv))


OPS = st.lists(st.one_of(st.tuples(st.just("extend"), st.integers(1, 9)),
                         st.tuples(st.just("decode"), st.integers(1, 3)),
                         st.tuples(st.just("rollback"), st.floats(0.0, 1.0)),
                         st.tuples(st.just("fork"), st.just(0)),
                         st.tuples(st.just("switch"), st.integers(0, 3))), min_size=1, max_size=14)


@settings(max_examples=30, deadline=None)
@given(OPS, st.integers(0, 2**16))
def test_any_sequence_of_appends_rollbacks_and_forks_equals_recomputation(ops, seed):
    g = torch.Generator().manual_seed(seed)
    sessions = [Session(BB)]
    sessions[0].extend(torch.randint(0, 256, (5,), generator=g))
    frozen = []  # (fork, its snapshot) for forks never touched again
    cur = 0
    for op, arg in ops:
        s = sessions[cur]
        if op == "extend":
            s.extend(torch.randint(0, 256, (arg,), generator=g))
        elif op == "decode" and s._last_logits is not None:
            s.decode(arg)
        elif op == "rollback" and s.next_position > 1:
            s.rollback(max(1, int(arg * s.next_position)))
        elif op == "fork":
            f = s.fork()
            frozen.append((f, _snapshot(f)))
            sessions.append(s.fork())
        elif op == "switch":
            cur = arg % len(sessions)
    for s in sessions:  # every live session's caches are what recomputing its tokens gives
        ref = _fresh(s.token_ids)
        assert s.kv_lengths() == ref.kv_lengths()
        assert all((a - b).abs().max().item() <= TOL for a, b in zip(s.kv_tensors(), ref.kv_tensors()))
    for f, snap in frozen:  # and what a fork held when it was made is untouched by everyone else's writes
        assert _unchanged(f, snap)


def test_appending_writes_in_place_within_the_capacity():
    s = Session(BB)
    s.extend(torch.arange(10))
    data = s._bufs[0][0].data
    for t in range(20):
        s.extend([t])
    assert s._bufs[0][0].data is data  # 30 <= the first capacity (10 + 64): no reallocation, no copy
    assert s.kv_tensors()[0].data_ptr() == data.data_ptr()
    s.rollback(12)  # its own frontier, nothing handed out past 12: later appends reuse the slots
    s.extend(torch.arange(5))
    assert s._bufs[0][0].data is data and s._bufs[0][0].filled == 17
    assert s.reserved_kv_bytes() >= sum(t.numel() * t.element_size() for t in s.kv_tensors())


def test_a_fork_pins_the_shared_prefix_and_the_other_side_copies():
    s = Session(BB)
    s.extend(torch.arange(10))
    f = s.fork()
    snap = _snapshot(f)
    s.rollback(4)
    s.extend(torch.arange(50, 60))  # below the pin (10): must not overwrite the fork's slots 4..9
    assert _unchanged(f, snap)
    s_snap = _snapshot(s)
    f.extend(torch.arange(3))  # the fork is at its buffer's frontier: it writes in place past the pin
    assert _unchanged(s, s_snap) and _unchanged(f, (snap[0], snap[1])) is False and len(f) == 13
    ref = _fresh(f.token_ids)
    assert all((a - b).abs().max().item() <= TOL for a, b in zip(f.kv_tensors(), ref.kv_tensors()))


def test_a_prefix_store_entry_survives_the_session_rolling_back_and_rewriting():
    store = PrefixStore(1 << 24)
    s = Session(BB)
    ids = torch.arange(20)
    s.extend(ids)
    store.insert(s)
    s.rollback(5)
    s.extend(torch.arange(100, 130))  # rewrites the slots the stored prefix came from
    hit, n = store.lookup(BB, ids.tolist())
    assert n == 20
    ref = _fresh(ids.tolist())
    assert all((a - b).abs().max().item() <= TOL for a, b in zip(hit.kv_tensors(), ref.kv_tensors()))


def test_a_stop_token_ends_decoding_without_a_pass_of_its_own():
    s = Session(BB)
    s.extend(torch.arange(8))
    ref = s.fork().decode(4).token_ids
    out = s.decode(4, stop_ids=[ref[1]])
    assert out.token_ids == ref[:2] and len(out.works) == 1  # one pass: the first token fed back
    assert s.token_ids[-1] == ref[0] and s.next_position == 9  # the stop id is not in the session
    s.extend([ref[1]])  # appended later with the next tokens, it gives the caches of feeding it back
    ref_s = _fresh(s.token_ids)
    assert all((a - b).abs().max().item() <= TOL for a, b in zip(s.kv_tensors(), ref_s.kv_tensors()))


def test_a_session_built_on_a_base_keeps_its_tensors_when_the_base_rewrites():
    store = PrefixStore(1 << 24)
    first = _fresh(list(range(30)))
    store.insert(first)
    base = _fresh(list(range(12)))  # holds a prefix of what the store matches
    hit, n = store.lookup(BB, list(range(30)), base=base)  # the base's 12 tokens come from base's own buffers
    assert n == 30
    snap = _snapshot(hit)
    base.rollback(3)
    base.extend(torch.arange(200, 240))  # the base rewrites slots 3.. of its buffers: not those handed out
    assert _unchanged(hit, snap)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=12), st.lists(st.integers(0, 63), min_size=1, max_size=5),
       st.integers(1, 4), st.booleans())
def test_a_draft_tree_never_changes_what_decoding_emits(prompt, drafts, n_new, plain_first):
    """Speculative decoding with drafted alternatives for the first token (a tree of depth 1; one draft is the
    plain case): accepted or not, decode emits greedy's tokens, the session then holds the caches and positions
    of extend + decode, and it continues like it. `plain_first` decides which fork writes first, so the drafted
    session either owns its buffers' frontier (the kept alternative moves in place) or copies."""
    base = _fresh(list(range(5)))
    plain, drafted = base.fork(), base.fork()
    if not plain_first:
        res = drafted.extend_with_draft(prompt, drafts)
    plain.extend(prompt)
    ref = plain.decode(n_new)
    if plain_first:
        res = drafted.extend_with_draft(prompt, drafts)
    assert res.draft_accepted == (ref.token_ids[0] in drafts)
    assert res.draft_rows == len(set(drafts))
    assert (res.logits[0] - plain_logits(base, prompt)).abs().max().item() <= TOL
    out = drafted.decode(n_new)
    assert out.token_ids == ref.token_ids
    assert len(out.works) == len(ref.works) - int(res.draft_accepted)  # one pass less when a draft was right
    assert drafted.token_ids == plain.token_ids and drafted.next_position == plain.next_position
    assert all(torch.equal(a, b) for a, b in zip(drafted.positions, plain.positions))
    assert all((a - b).abs().max().item() <= TOL for a, b in zip(drafted.kv_tensors(), plain.kv_tensors()))
    more = [3, 1, 4]
    assert (drafted.extend(more).logits - plain.extend(more).logits).abs().max().item() <= TOL


def test_draft_alternatives_see_neither_each_other_nor_are_seen_and_count_their_pairs():
    """Each drafted alternative's logits equal decoding that token alone after the prompt, and the pass counts
    (query, key) pairs without the alternatives' views of each other."""
    base = _fresh(list(range(5)))
    prompt, drafts = [9, 10, 11], [4, 20, 33]
    tree = base.fork()
    res = tree.extend(torch.tensor(prompt + drafts), _rows=4, _siblings=3)
    for j, d in enumerate(drafts):
        alone = base.fork()
        alone.extend(prompt + [d])
        assert (res.logits[1 + j] - alone._last_logits).abs().max().item() <= TOL
    assert (res.logits[0] - plain_logits(base, prompt)).abs().max().item() <= TOL
    # 5 cached + 3 prompt tokens causal + 3 alternatives seeing 5 + 3 + themselves
    assert res.works[0].pairs == 3 * 5 + 3 * 4 // 2 + 3 * (5 + 3 + 1)


def test_extend_with_draft_refuses_empty_inputs():
    s = _fresh(list(range(4)))
    with pytest.raises(ValueError, match="at least one new token and one drafted token"):
        s.extend_with_draft([], [3])
    with pytest.raises(ValueError, match="at least one new token and one drafted token"):
        s.extend_with_draft([5], [])


def plain_logits(base, prompt):
    s = base.fork()
    return s.extend(prompt).logits[0]


def test_a_rejected_draft_leaves_no_trace_and_constrained_choice_is_respected():
    s = _fresh(list(range(6)))
    first = s.fork().extend([7, 8]).logits[0].argmax().item()
    wrong = (first + 1) % 64
    res = s.fork().extend_with_draft([7, 8], wrong)
    assert res.draft_accepted is False
    chosen = s.fork()
    res = chosen.extend_with_draft([7, 8], wrong, choose=lambda logits, emitted: wrong)  # a constraint forcing it
    assert res.draft_accepted is True and chosen.decode(1, choose=lambda logits, emitted: wrong).token_ids == [wrong]
