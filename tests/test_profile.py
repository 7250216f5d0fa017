"""Profiling: the JSON and plot are produced, both arms see the same work definitions, no timing is asserted."""

import json

import pytest

from thrifty.bench.profile import profile_backbone, run_profile


@pytest.mark.parametrize("mode", ["prefill", "end2end"])
def test_run_profile(tmp_path, mode):
    out = run_profile("tiny-4x64", mode=mode, lengths=[48, 96], keeps=[0.9, 0.5], gen_tokens=5, repeats=1,
                      warmup=0, out_json=tmp_path / "p.json", out_png=tmp_path / "p.png",
                      fresh_memory=False)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["mode"] == mode and saved["threads"] == 1 and saved["prune_layers"] == [1]
    assert (tmp_path / "p.png").stat().st_size > 0
    assert len(saved["results"]) == 4
    for r in saved["results"]:
        full, pruned = r["full"], r["pruned"]
        assert full["tokens_per_layer"] == [r["length"]] * 4
        assert pruned["tokens_per_layer"][:2] == [r["length"]] * 2 and pruned["tokens_per_layer"][2] < r["length"]
        assert r["flops_ratio"] > 1 and r["speedup"] > 0 and len(pruned["prefill_times_s"]) == 1
        assert pruned["prefill_flops"] < full["prefill_flops"]
        assert pruned["kv_bytes_after_prefill"] < full["kv_bytes_after_prefill"]
        assert full["peak_rss_bytes"] > 0 and pruned["peak_rss_bytes"] > 0
        if mode == "end2end":
            assert full["decode_flops"] > pruned["decode_flops"] > 0  # exactly 5 tokens decoded in both arms
        else:
            assert full["decode_flops"] == pruned["decode_flops"] == 0
    lower = {r["length"]: r["flops_ratio"] for r in saved["results"] if r["keep_ratio"] == 0.5}
    upper = {r["length"]: r["flops_ratio"] for r in saved["results"] if r["keep_ratio"] == 0.9}
    assert all(lower[n] > upper[n] for n in lower)


def test_fresh_process_memory_probe():
    """What the spawned child runs (called here in-process: spawning is slow on a busy machine)."""
    from thrifty.bench.profile import _fresh_peak

    peak, start = _fresh_peak("tiny-4x64", list(range(40)), 0.5, "compound", None, None, 3, 1)
    assert peak >= start > 0


def test_bad_profile_inputs():
    with pytest.raises(ValueError, match="mode"):
        run_profile("tiny-4x64", mode="decode", lengths=[8])
    with pytest.raises(ValueError, match="keep_ratio"):
        run_profile("tiny-4x64", lengths=[32], keeps=[1.5], repeats=1, warmup=0)
    with pytest.raises(ValueError, match="exceeds"):
        run_profile("tiny-4x64", lengths=[10**6], keeps=[0.5], repeats=1, warmup=0)
    with pytest.raises(ValueError, match="multiple of 64"):
        profile_backbone("tiny-4x100")


def test_memory_probe_subprocess():
    from thrifty.bench.profile import _peak_in_child

    peak, start = _peak_in_child("tiny-4x64", list(range(20)), None, "compound", None, None, 0, 1)
    assert peak >= start > 0
