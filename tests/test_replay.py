"""Surprise-prioritized hot/cold replay (issue 19, part 2): the trees against brute force, eviction, tiers,
importance weights, the surprise score's order, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.train.replay import MinTree, ReplayConfig, SumTree, SurpriseReplay

values = st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=1, max_size=40)


@given(values, st.data())
@settings(max_examples=60, deadline=None)
def test_sum_tree_matches_a_brute_force_prefix_search(vals, data):
    tree = SumTree(len(vals))
    for i, v in enumerate(vals):
        tree[i] = v
    assert tree.total == pytest.approx(sum(vals), rel=1e-12, abs=1e-12)
    if sum(vals) == 0:
        return
    u = data.draw(st.floats(0.0, 1.0, exclude_max=True)) * tree.total
    i = tree.find(u)
    cum = np.cumsum(vals)
    want = int(np.searchsorted(cum, u, side="right"))
    assert vals[i] > 0
    # the same leaf as brute force, up to rounding right at a boundary
    assert i == min(want, len(vals) - 1) or math.isclose(u, cum[min(want, len(vals) - 1)], rel_tol=1e-9) or \
        math.isclose(u, cum[i - 1] if i else 0.0, rel_tol=1e-9)


@given(values)
@settings(max_examples=60, deadline=None)
def test_min_tree_finds_the_minimum(vals):
    tree = MinTree(len(vals))
    for i, v in enumerate(vals):
        tree[i] = v
    assert vals[tree.argmin()] == min(vals)


@given(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=60), st.integers(1, 12))
@settings(max_examples=60, deadline=None)
def test_eviction_keeps_the_highest_priorities(rewards, capacity):
    buf = SurpriseReplay(ReplayConfig(capacity=capacity, surprise_weight=0.0, reward_weight=1.0))
    for k, r in enumerate(rewards):
        buf.add(k, np.zeros(2), r)
    kept = sorted(float(buf.score[s]) for s in range(capacity) if buf.items[s] is not None)
    assert len(buf) == min(capacity, len(rewards))
    assert kept == sorted(rewards)[-len(kept):]


def test_oldest_eviction_keeps_the_newest():
    buf = SurpriseReplay(ReplayConfig(capacity=3, evict="oldest"))
    for k in range(7):
        buf.add(k, np.zeros(1), float(10 - k))
    assert sorted(x for x in buf.items if x is not None) == [4, 5, 6]


@given(st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=2, max_size=30), st.integers(0, 6),
       st.floats(0.0, 1.0))
@settings(max_examples=40, deadline=None)
def test_probabilities_match_a_brute_force_sampler(rewards, ticks, hot_fraction):
    cfg = ReplayConfig(capacity=64, surprise_weight=0.0, hot_fraction=hot_fraction, age_hot=2, temperature=0.7)
    buf = SurpriseReplay(cfg)
    for k, r in enumerate(rewards):
        buf.add(k, np.zeros(1), r)
        if k % 5 == 4:
            buf.tick()
    for _ in range(ticks):
        buf.tick()
    slots = [s for s in range(cfg.capacity) if buf.items[s] is not None]
    hot = [s for s in slots if buf.is_hot[s]]
    cold = [s for s in slots if not buf.is_hot[s]]
    share = (hot_fraction if hot and cold else (1.0 if hot else 0.0))
    for tier, tier_share in ((hot, share), (cold, 1 - share)):
        z = sum(math.exp(buf.score[s] / 0.7) for s in tier)
        for s in tier:
            assert buf.probability(s) == pytest.approx(tier_share * math.exp(buf.score[s] / 0.7) / z, rel=1e-9)
    assert sum(buf.probability(s) for s in slots) == pytest.approx(1.0)


def test_draws_follow_the_probabilities_and_the_hot_share():
    buf = SurpriseReplay(ReplayConfig(capacity=16, surprise_weight=0.0, hot_fraction=0.25, age_hot=1))
    for k in range(6):
        buf.add(k, np.zeros(1), float(k) / 3)
    buf.tick()
    buf.tick()  # the first six are cold now
    for k in range(6, 10):
        buf.add(k, np.zeros(1), 0.5)
    rng = np.random.default_rng(0)
    counts = np.zeros(16)
    hot_draws = 0
    for _ in range(400):
        s = buf.sample(8, rng)
        hot_draws += int(s.hot.sum())
        np.add.at(counts, s.slots, 1)
        assert s.hot.sum() == 2  # round(8 x 0.25) from the hot tier, every batch
        assert np.all(s.weights <= 1.0) and s.weights.max() == 1.0
    freq = counts / counts.sum()
    for slot in range(10):
        assert freq[slot] == pytest.approx(buf.probability(slot), abs=0.02)


def test_surprise_is_scored_before_the_mean_moves():
    buf = SurpriseReplay(ReplayConfig(ema_decay=0.5, reward_weight=2.0))
    buf.add("a", np.array([2.0, 0.0]), reward=1.0)
    assert buf.score[buf.items.index("a")] == pytest.approx(4.0 + 2.0)  # against the zero mean
    assert buf.ema.tolist() == [2.0, 0.0]
    buf.add("b", np.array([0.0, 0.0]), reward=0.0)
    assert buf.score[buf.items.index("b")] == pytest.approx(4.0)  # against [2, 0], before it becomes [1, 0]
    assert buf.ema.tolist() == [1.0, 0.0]


def test_ages_move_items_cold_and_drop_them_and_beta_anneals():
    buf = SurpriseReplay(ReplayConfig(capacity=8, age_hot=1, max_age=3, beta0=0.4, beta_steps=4))
    buf.add("x", np.zeros(1), 1.0)
    assert buf.hot_count() == 1 and buf.beta == pytest.approx(0.4)
    buf.tick()
    assert buf.hot_count() == 1
    buf.tick()
    assert buf.hot_count() == 0 and len(buf) == 1
    buf.tick()
    buf.tick()
    assert len(buf) == 0 and buf.beta == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="capacity"):
        ReplayConfig(capacity=0)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="hot_fraction"):
            ReplayConfig(hot_fraction=bad)
    with pytest.raises(ValueError, match="evict"):
        ReplayConfig(evict="random")
    buf = SurpriseReplay()
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4, np.random.default_rng(0))
    buf.add(0, np.zeros(3), 0.0)
    with pytest.raises(ValueError, match="size 3"):
        buf.add(1, np.zeros(2), 0.0)


def test_uniform_replay_ignores_scores_and_tiers():
    buf = SurpriseReplay(ReplayConfig(capacity=8, prioritized=False, age_hot=0))
    for k in range(5):
        buf.add(k, np.full(2, float(k)), float(k))
    buf.tick()
    buf.add(5, np.zeros(2), 0.0)
    assert all(buf.probability(s) == pytest.approx(1 / 6) for s in range(8) if buf.items[s] is not None)
    s = buf.sample(64, np.random.default_rng(0))
    assert np.all(s.weights == 1.0)
