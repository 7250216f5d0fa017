"""Paired comparison of each configuration with a reference (default `full`) on the same episodes.

Every configuration of a suite plays the same (level, seed) episodes, so a success difference is best judged pair
by pair: pairs where both configurations succeed (or both fail) say nothing about the difference; only the
discordant ones do. For n pairs with b = reference-only and c = config-only successes, the difference is
d = (c - b) / n and its 95% interval is Tango's score interval (Tango, 1998, Statistics in Medicine 17:891):
every difference the paired score test does not reject. It stays inside [-1, 1] and keeps a positive width when
b = c = 0 (Wald intervals, and Newcombe's method 10 with its phi = 1, collapse to a point there).

Pairs are counted over distinct episodes (issue 23, `thrifty.bench.report`): the pairs whose episodes share an
`episode_key` are one pair, whose four cells are the fractions of its seed pairs in each (a deterministic pair of
configurations puts all of it in one cell). So n is the number of distinct paired episodes (`distinct_pairs`),
never the number of seeds (`pairs`); records without `episode_key` are each their own episode, as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


__all__ = ["paired_difference", "paired_rows", "print_paired"]


def _tango_score(b: int, c: int, n: int, delta: float) -> float:
    """Score statistic for H0: difference = delta (config minus reference); decreasing in delta.

    The nuisance p_ref_only is its maximum-likelihood value under H0, the positive root of
    2n p^2 + (-(b + c) + (2n - c + b) delta) p - b delta (1 - delta) = 0."""
    qa = 2 * n
    qb = -(b + c) + (2 * n - c + b) * delta
    qc = -b * delta * (1 - delta)
    p = (-qb + math.sqrt(max(0.0, qb * qb - 4 * qa * qc))) / (2 * qa)
    num = c - b - n * delta
    var = n * (2 * p + delta * (1 - delta))
    if var <= 1e-15:
        return 0.0 if abs(num) < 1e-12 else math.copysign(math.inf, num)
    return num / math.sqrt(var)


def paired_difference(both: int, ref_only: int, cfg_only: int, neither: int,
                      z: float = 1.96) -> tuple[float, float, float]:
    """(difference config - reference, lo, hi) for a 2x2 table of paired successes (Tango's score interval)."""
    counts = (both, ref_only, cfg_only, neither)
    if any(x < 0 for x in counts):
        raise ValueError(f"paired counts must be >= 0, got {counts}")
    n = sum(counts)
    if n == 0:
        return 0.0, -1.0, 1.0
    d = (cfg_only - ref_only) / n

    def bound(lo: float, hi: float, target: float) -> float:
        """The delta in [lo, hi] where the score crosses `target` (bisection; the score decreases in delta)."""
        for _ in range(60):
            mid = (lo + hi) / 2
            if _tango_score(ref_only, cfg_only, n, mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    lower = -1.0 if _tango_score(ref_only, cfg_only, n, -1.0) <= z else bound(-1.0, d, z)
    upper = 1.0 if _tango_score(ref_only, cfg_only, n, 1.0) >= -z else bound(d, 1.0, -z)
    return d, min(lower, d), max(upper, d)


def paired_rows(episodes: Iterable[Mapping[str, Any]], reference: str = "full") -> list[dict[str, Any]]:
    """One row per configuration other than `reference`: pairs, the 2x2 counts and the difference with its CI.

    Episodes pair on (level, seed); an episode without a partner is left out. The 2x2 counts are over distinct
    episodes (module doc): integers when every distinct episode's seed pairs agree, fractions otherwise.
    Returns [] without a reference."""
    outcome: dict[str, dict[tuple[Any, Any], bool]] = {}
    episode: dict[tuple[Any, Any], Any] = {}  # (level, seed) -> episode_key, when a record has one
    for ep in episodes:
        if ep.get("success") is None:
            continue
        where = (ep.get("level"), ep.get("seed"))
        outcome.setdefault(str(ep.get("config")), {})[where] = bool(ep["success"])
        if ep.get("episode_key") is not None:
            episode.setdefault(where, ep["episode_key"])
    ref = outcome.get(reference)
    if not ref:
        return []
    rows = []
    for config, results in outcome.items():
        if config == reference:
            continue
        keys = [k for k in results if k in ref]
        groups: dict[Any, list[tuple[bool, bool]]] = {}
        for k in keys:
            groups.setdefault(("key", episode[k]) if k in episode else ("pair", k), []).append((ref[k], results[k]))
        cells = [0.0, 0.0, 0.0, 0.0]  # both, reference only, config only, neither
        for pairs in groups.values():
            for r, c in pairs:
                cells[(0 if c else 1) if r else (2 if c else 3)] += 1 / len(pairs)
        both, ref_only, cfg_only, neither = (_count(x) for x in cells)
        d, lo, hi = paired_difference(both, ref_only, cfg_only, neither)
        rows.append({"config": config, "reference": reference, "pairs": len(keys), "distinct_pairs": len(groups),
                     "both": both, "reference_only": ref_only, "config_only": cfg_only, "difference": d,
                     "difference_lo": lo, "difference_hi": hi})
    return rows


def _count(x: float) -> float | int:
    """A cell count: an int when whole (up to rounding), else the fraction."""
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def print_paired(rows: Sequence[Mapping[str, Any]], console: Any, title: str) -> None:
    """The paired rows as a rich table (nothing when there are none)."""
    if not rows:
        return
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAVY)
    for name in ("config", "pairs", "distinct", "both succeed", f"only {rows[0]['reference']}", "only config",
                 "success difference [95% CI]"):
        table.add_column(name, justify="left" if name == "config" else "right", no_wrap=True)
    for r in rows:
        table.add_row(str(r["config"]), str(r["pairs"]), str(r.get("distinct_pairs", r["pairs"])),
                      f"{r['both']:g}", f"{r['reference_only']:g}", f"{r['config_only']:g}",
                      f"{r['difference']:+.3f} [{r['difference_lo']:+.3f}, {r['difference_hi']:+.3f}]")
    console.print(table)
