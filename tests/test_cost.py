from pathlib import Path

import pytest

from thrifty.cost import METRICS, CostRecord, LayerWork, ModelShape, PeakRSS, forward_flops, layer_flops, time_median


def test_flops_match_a_hand_count():
    # d=8, 2 heads of 4, 1 kv head, d_ff=16, vocab 10; 3 new tokens, no cache, logits for the last one.
    shape = ModelShape(n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16, vocab_size=10)
    q_and_o = 2 * (2 * 3 * 8 * 8)          # 768
    k_and_v = 2 * (2 * 3 * 8 * 4)          # 384
    pairs = 1 + 2 + 3                      # causal
    attention = 2 * 2 * pairs * 2 * 4      # QK^T and AV: 192
    mlp = 3 * 2 * 3 * 8 * 16               # gate, up, down: 2304
    head = 2 * 1 * 8 * 10                  # 160
    assert forward_flops(shape, [LayerWork.causal(3)] * 2, n_logits=1) == 2 * (q_and_o + k_and_v + attention + mlp) + head


def test_causal_pairs_with_cache():
    assert LayerWork.causal(2, cached=5) == LayerWork(2, 2 * 5 + 1 + 2)


def test_pruned_layer_costs_less():
    shape = ModelShape(4, 64, 4, 2, 16, 128, 100)
    assert layer_flops(shape, LayerWork.causal(50)) < layer_flops(shape, LayerWork.causal(100))


def test_bad_shapes_and_too_many_layers():
    with pytest.raises(ValueError, match="n_heads"):
        ModelShape(2, 8, 0, 1, 4, 16, 10)
    shape = ModelShape(1, 8, 2, 1, 4, 16, 10)
    with pytest.raises(ValueError, match="layer records"):
        forward_flops(shape, [LayerWork.causal(1)] * 2, 1)


def test_every_metric_is_defined_once_in_the_docs():
    doc = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    for name in METRICS:
        assert doc.count(f"| `{name}` |") == 1, f"{name} must be defined exactly once in docs/metrics.md"
    assert set(CostRecord().to_dict()) == set(METRICS)


def test_time_median_and_peak_rss():
    calls = []
    out = time_median(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5 and len(out["times_s"]) == 3 and out["threads"] >= 1
    with pytest.raises(ValueError):
        time_median(lambda: None, repeats=0)
    with PeakRSS() as p:
        block = bytearray(64 * 2**20)  # touch 64 MiB
        block[::4096] = b"x" * len(block[::4096])
    if p.available:
        assert p.peak_bytes >= p.start_bytes and p.delta_bytes >= 32 * 2**20
