"""EchoRL's bandwidth cost model and the prefix hit rate, checked against hand counts."""

import pytest

from thrifty.cost import (BANDWIDTH_METRICS, CostRecord, ModelShape, PrefixHitCounter, attention_flops_per_pair,
                          bandwidth, bandwidth_efficiency, effective_bandwidth, episode_bandwidth)

SHAPE = ModelShape(n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16, vocab_size=10)


def test_bandwidth_is_the_causal_pair_count():
    assert [bandwidth(t) for t in range(5)] == [0, 1, 3, 6, 10]
    assert bandwidth(-3) == 0 and bandwidth(4, scale=2.5) == 25
    # b(t) - b(t') = the pairs of queries t'+1..t, each seeing every key up to itself
    for t in range(8):
        for r in range(t + 1):
            assert effective_bandwidth(t, r) == sum(range(r + 1, t + 1))
    assert effective_bandwidth(5, 9) == 0 and effective_bandwidth(5, -2) == bandwidth(5)
    # EchoRL's demo figure: a 96-token reused prefix of 128 saves 1 - b_eff/b = 56.4%
    assert 1 - effective_bandwidth(128, 96) / bandwidth(128) == pytest.approx(0.564, abs=1e-3)


def test_attention_cost_per_pair_matches_the_flops_convention():
    assert attention_flops_per_pair(SHAPE) == 4 * 2 * 4 * 2  # QK^T + AV, 2 FLOPs per multiply-add, all layers


def test_efficiency():
    assert bandwidth_efficiency(1.0, 3.0, 1.0) == 0.25
    with pytest.raises(ValueError, match="undefined"):
        bandwidth_efficiency(1.0, 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        bandwidth_efficiency(1.0, -1.0)


def test_hit_rate_accounting_matches_a_hand_made_sequence():
    """A replanning episode by hand: contexts of 10, 25, 40 and 55 tokens; each decision reuses the previous
    context plus the generated action when it was kept (not at decision 3, where it was replaced)."""
    contexts, reused = [10, 25, 40, 55], [0, 12, 27, 40]
    c = PrefixHitCounter()
    for t, r in zip(contexts, reused):
        c.add(t, r)
    assert (c.queries, c.hits) == (130, 79) and c.hit_rate == pytest.approx(79 / 130)
    with pytest.raises(ValueError):
        c.add(5, 6)
    assert PrefixHitCounter().hit_rate == 0.0

    records = [CostRecord(tokens_context=t, prefix_tokens_reused=r) for t, r in zip(contexts, reused)]
    m = episode_bandwidth(records, SHAPE, total_return=0.5)
    scale = attention_flops_per_pair(SHAPE)
    full = sum(t * (t + 1) / 2 for t in contexts) * scale
    eff = sum((t * (t + 1) - r * (r + 1)) / 2 for t, r in zip(contexts, reused)) * scale
    assert m["prefix_hit_rate"] == pytest.approx(79 / 130)
    assert (m["prompt_tokens_total"], m["cached_tokens_total"]) == (130, 79)
    assert m["bw_full"] == full and m["bw_eff"] == eff
    assert m["eta_bw"] == pytest.approx(0.5 / (eff / 1e9))
    assert episode_bandwidth(records, SHAPE, 0.5, learner_cost=eff)["eta_bw"] == pytest.approx(0.5 / (2 * eff / 1e9))
    assert set(m) == set(BANDWIDTH_METRICS)
