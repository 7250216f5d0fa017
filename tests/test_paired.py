"""Paired success comparison (thrifty.bench.paired): hand-made tables and interval properties."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.bench.paired import paired_difference, paired_rows


def _ep(config, level, seed, success):
    return {"config": config, "level": level, "seed": seed, "success": success}


def test_rows_count_pairs_by_level_and_seed():
    full = [True, True, False, False, True]
    other = [True, False, True, False, True]
    eps = [_ep("full", "A", s, v) for s, v in enumerate(full)] + [_ep("x", "A", s, v) for s, v in enumerate(other)]
    eps += [_ep("x", "B", 0, True)]  # no partner in `full`: left out
    eps += [_ep("full", "B", 1, None)]  # not finished: left out
    (row,) = paired_rows(eps)
    assert (row["pairs"], row["both"], row["reference_only"], row["config_only"]) == (5, 2, 1, 1)
    assert row["difference"] == 0.0
    assert row["difference_lo"] < 0 < row["difference_hi"]


def test_no_reference_gives_no_rows():
    assert paired_rows([_ep("x", "A", 0, True)]) == []


def test_identical_outcomes_narrow_with_more_pairs():
    _, lo20, hi20 = paired_difference(10, 0, 0, 10)
    _, lo200, hi200 = paired_difference(100, 0, 0, 100)
    assert lo20 < lo200 < 0 < hi200 < hi20


def test_clear_loss_excludes_zero():
    d, lo, hi = paired_difference(both=5, ref_only=20, cfg_only=0, neither=35)
    assert d == pytest.approx(-20 / 60)
    assert hi < 0


def test_negative_counts_are_rejected():
    with pytest.raises(ValueError, match=">= 0"):
        paired_difference(1, -1, 0, 0)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40), st.integers(0, 40))
def test_interval_contains_the_estimate_and_mirrors(a, b, c, d):
    diff, lo, hi = paired_difference(a, b, c, d)
    assert -1.0 <= lo <= diff <= hi <= 1.0
    mdiff, mlo, mhi = paired_difference(a, c, b, d)  # swap which side wins the discordant pairs
    assert mdiff == pytest.approx(-diff, abs=1e-12)
    assert (mlo, mhi) == pytest.approx((-hi, -lo), abs=1e-9)
