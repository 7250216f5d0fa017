"""Tests of the generic benchmark harness: results file, summaries, plot, runner (in-process and Ray)."""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thrifty.bench.report import (
    dodge,
    format_flops,
    latency_note,
    pareto_figure,
    pareto_front,
    pareto_plot,
    print_table,
    summarize,
    wilson_interval,
    write_summary_json,
)
from thrifty.bench.results import (
    IDENTITY_FIELDS,
    Job,
    ResultsCorruptError,
    ResultsFile,
    ResultsFileWarning,
    ResultsMismatchError,
)
from thrifty.bench.runner import run_jobs

# ---------------------------------------------------------------------- strategies
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
result_dicts = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(lambda k: k not in IDENTITY_FIELDS), json_values, max_size=6
)
jobs_st = st.builds(
    Job,
    suite=st.just("s"),
    config=st.sampled_from(["base", "prune", "kv", "exit"]),
    level=st.sampled_from(["easy", "hard", "ünï"]),
    seed=st.integers(0, 10_000),
    episode=st.integers(0, 100),
)
episodes_st = st.lists(st.tuples(jobs_st, result_dicts), min_size=1, max_size=6, unique_by=lambda t: t[0].key)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _expected(job: Job, result: dict) -> dict:
    return {
        "kind": "episode",
        "suite": job.suite,
        "config": job.config,
        "level": job.level,
        "seed": job.seed,
        "episode": job.episode,
        **result,
    }


# ---------------------------------------------------------------------- results file
@SETTINGS
@given(episodes_st)
def test_results_roundtrip_and_done_keys(eps):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.jsonl"
        rf = ResultsFile(path, "s", {"note": "x"})
        for job, res in eps:
            rf.append(job, res)
        expected = [_expected(j, r) for j, r in eps]
        assert rf.episodes() == expected
        again = ResultsFile(path, "s", {"other": "meta"})
        assert again.episodes() == expected
        assert again.done_keys() == {j.key for j, _ in eps}
        assert again.header["suite"] == "s" and again.header["meta"] == {"note": "x"}
        lines = path.read_text().splitlines()
        assert json.loads(lines[0])["kind"] == "header"
        assert len(lines) == len(eps) + 1


@SETTINGS
@given(episodes_st, st.data())
def test_truncated_last_line_is_tolerated_and_repaired(eps, data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.jsonl"
        rf = ResultsFile(path, "s", {})
        for job, res in eps:
            rf.append(job, res)
        raw = path.read_bytes()
        start = raw.rstrip(b"\n").rfind(b"\n") + 1  # first byte of the last line
        cut = data.draw(st.integers(start, len(raw) - 1), label="cut")
        path.write_bytes(raw[:cut])

        expected = [_expected(j, r) for j, r in eps]
        if cut == len(raw) - 1:
            kept = expected  # only the newline was lost: the record itself is complete
        else:
            kept = expected[:-1]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reopened = ResultsFile(path, "s", {})
        garbled = start < cut < len(raw) - 1
        assert any(issubclass(w.category, ResultsFileWarning) for w in caught) == garbled
        assert reopened.episodes() == kept
        assert reopened.done_keys() == {(e["config"], e["level"], e["seed"]) for e in kept}

        extra = Job("s", "late", "easy", 123_456, 0)
        reopened.append(extra, {"success": True})
        final = ResultsFile(path, "s", {})
        assert final.episodes() == kept + [_expected(extra, {"success": True})]
        for line in path.read_text().splitlines():
            json.loads(line)


def test_garbled_middle_line_raises_with_line_number(tmp_path):
    path = tmp_path / "r.jsonl"
    rf = ResultsFile(path, "s", {})
    for seed in range(3):
        rf.append(Job("s", "c", "l", seed, seed), {"success": True})
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:10]  # damage line 3 of 4
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ResultsCorruptError, match="line 3"):
        ResultsFile(path, "s", {})


def test_truncated_header_only_file_is_rewritten(tmp_path):
    path = tmp_path / "r.jsonl"
    ResultsFile(path, "s", {})
    raw = path.read_bytes()
    path.write_bytes(raw[:7])
    with pytest.warns(ResultsFileWarning):
        rf = ResultsFile(path, "s", {})
    assert rf.episodes() == []
    rf.append(Job("s", "c", "l", 1, 0), {"x": 1})
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "header" and json.loads(lines[1])["x"] == 1


def test_other_suite_raises_and_leaves_file_untouched(tmp_path):
    path = tmp_path / "r.jsonl"
    rf = ResultsFile(path, "minigrid", {"a": 1})
    rf.append(Job("minigrid", "c", "l", 0, 0), {"success": False})
    before = path.read_bytes()
    with pytest.raises(ResultsMismatchError) as info:
        ResultsFile(path, "planner", {})
    msg = str(info.value)
    assert "minigrid" in msg and "planner" in msg and "--out" in msg
    assert isinstance(info.value, ValueError)
    assert path.read_bytes() == before


def test_numpy_values_and_conflicting_fields(tmp_path):
    rf = ResultsFile(tmp_path / "r.jsonl", "s", {})
    rec = rf.append(Job("s", "c", "l", 0, 0), {"steps": np.int64(7), "r": np.float32(0.5), "v": np.arange(3)})
    assert rec["steps"] == 7 and rec["r"] == 0.5 and rec["v"] == [0, 1, 2]
    with pytest.raises(ValueError):
        rf.append(Job("s", "c", "l", 1, 0), {"config": "other"})
    assert len(rf.episodes()) == 1


# ---------------------------------------------------------------------- runner
def test_run_jobs_resumes_after_interrupt(tmp_path):
    jobs = [Job("s", f"c{i % 2}", "l", i, i) for i in range(5)]
    calls: list[Job] = []

    def flaky(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt  # simulated Ctrl-C during the third episode
        return {"success": job.seed % 2 == 0, "steps": job.seed}

    path = tmp_path / "r.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, flaky, ResultsFile(path, "s", {}), progress=False)
    assert ResultsFile(path, "s", {}).done_keys() == {jobs[0].key, jobs[1].key}

    calls.clear()

    def fine(job):
        calls.append(job)
        return {"success": job.seed % 2 == 0, "steps": job.seed}

    out = run_jobs(jobs, fine, ResultsFile(path, "s", {}), progress=True)
    assert calls == jobs[2:]
    assert [(r["seed"], r["steps"]) for r in out] == [(i, i) for i in range(5)]
    assert len(ResultsFile(path, "s", {}).episodes()) == 5
    calls.clear()
    assert run_jobs(jobs, fine, ResultsFile(path, "s", {}), progress=False) == out
    assert calls == []


def test_run_jobs_rejects_duplicate_keys_and_foreign_suite(tmp_path):
    rf = ResultsFile(tmp_path / "r.jsonl", "s", {})
    with pytest.raises(ValueError):
        run_jobs([Job("s", "c", "l", 1, 0), Job("s", "c", "l", 1, 1)], dict, rf, progress=False)
    with pytest.raises(ValueError):
        run_jobs([Job("t", "c", "l", 1, 0)], dict, rf, progress=False)


def seeded_episode(job: Job) -> dict:
    """Deterministic fake episode (top level so Ray can ship it)."""
    rng = np.random.default_rng([job.seed, job.episode, zlib.crc32(f"{job.config}/{job.level}".encode())])
    x = rng.standard_normal(256)
    decisions = int(rng.integers(1, 20))
    return {
        "success": bool(x.mean() > 0),
        "steps": int(rng.integers(1, 200)),
        "decisions": decisions,
        "flops_total": float(np.abs(x).sum() * 1e9),
        "score": float(x @ x),
        "trace": [round(float(v), 6) for v in x[:4]],
    }


def failing_episode(job: Job) -> dict:
    if job.seed == 3:
        raise RuntimeError("episode 3 exploded")
    return seeded_episode(job)


@pytest.mark.own_process
def test_run_jobs_on_ray_matches_in_process(tmp_path):
    ray = pytest.importorskip("ray")
    import ray.cloudpickle

    jobs = [Job("s", cfg, lvl, seed, seed) for cfg in ("a", "b") for lvl in ("easy", "hard") for seed in range(3)]
    local = run_jobs(jobs, seeded_episode, ResultsFile(tmp_path / "local.jsonl", "s", {}), progress=False)

    module = sys.modules[__name__]
    ray.cloudpickle.register_pickle_by_value(module)  # the test module is not importable on workers
    try:
        remote_file = ResultsFile(tmp_path / "ray.jsonl", "s", {})
        remote = run_jobs(jobs, seeded_episode, remote_file, use_ray=True, progress=False)
        assert remote == local
        on_disk = sorted(ResultsFile(tmp_path / "ray.jsonl", "s", {}).episodes(), key=lambda r: (r["config"], r["level"], r["seed"]))
        assert on_disk == sorted(local, key=lambda r: (r["config"], r["level"], r["seed"]))

        # A failing episode propagates; finished ones are kept and a rerun completes the rest.
        fjobs = [Job("s", "f", "easy", seed, seed) for seed in range(6)]
        fpath = tmp_path / "fail.jsonl"
        with pytest.raises(RuntimeError, match="exploded"):
            run_jobs(fjobs, failing_episode, ResultsFile(fpath, "s", {}), use_ray=True, progress=False)
        assert fjobs[3].key not in ResultsFile(fpath, "s", {}).done_keys()
        rest = run_jobs(fjobs, seeded_episode, ResultsFile(fpath, "s", {}), progress=False)
        assert rest == [_expected(j, seeded_episode(j)) for j in fjobs]
        assert len(ResultsFile(fpath, "s", {}).episodes()) == 6
    finally:
        ray.cloudpickle.unregister_pickle_by_value(module)
        ray.shutdown()


# ---------------------------------------------------------------------- report
def test_wilson_interval_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=5e-4) and hi == pytest.approx(0.9433, abs=5e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=5e-4)
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=5e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


MB = 2**20
HAND = [
    dict(config="A", level="easy", success=True, steps=10, decisions=2, tokens_context_mean=100,
         flops_total=2e9, wall_median_s=0.01, peak_rss_bytes=100 * MB, kv_bytes_max=2 * MB),
    dict(config="A", level="hard", success=False, steps=20, decisions=6, tokens_context_mean=200,
         flops_total=4e9, wall_median_s=0.03, peak_rss_bytes=300 * MB, kv_bytes_max=4 * MB),
    dict(config="A", level="hard", success=True, steps=30, decisions=4, tokens_context_mean=300,
         flops_total=6e9, wall_median_s=0.02, peak_rss_bytes=200 * MB, kv_bytes_max=6 * MB),
    dict(config="B", level="easy", success=True, tokens_context_mean=None),
]


def test_summarize_exact_means():
    rows = summarize(HAND)
    assert [r["config"] for r in rows] == ["A", "B"]
    a, b = rows
    assert a["level"] == "all" and a["episodes"] == 3
    assert a["success"] == pytest.approx(2 / 3)
    assert (a["success_lo"], a["success_hi"]) == pytest.approx(wilson_interval(2, 3))
    assert a["steps"] == 20 and a["decisions"] == 4 and a["tokens_per_decision"] == 200
    assert a["flops_per_decision"] == pytest.approx(1e9)
    assert a["latency_median_s"] == pytest.approx(0.02)
    assert a["peak_rss_mb"] == 300 and a["kv_mb"] == 4
    assert b["episodes"] == 1 and b["success"] == 1.0
    for field in ("steps", "decisions", "tokens_per_decision", "flops_per_decision",
                  "latency_median_s", "peak_rss_mb", "kv_mb"):
        assert b[field] is None

    by_level = summarize(HAND, by_level=True)
    assert [(r["config"], r["level"], r["episodes"]) for r in by_level] == [
        ("A", "easy", 1), ("A", "hard", 2), ("B", "easy", 1)]
    hard = by_level[1]
    assert hard["flops_per_decision"] == pytest.approx(1e9) and hard["steps"] == 25
    assert summarize([]) == []
    assert summarize([{}])[0]["success"] is None


def test_latency_note_says_whether_warm_up_is_left_out():
    assert "warm-up left out (3 untimed decisions" in latency_note([{"warmup_decisions": 3}] * 4)
    assert "1 of 2 episodes ran without a warm-up" in latency_note([{"warmup_decisions": 3}, {}])
    assert "warm-up" not in latency_note([])


def test_print_table_and_units():
    buf = io.StringIO()
    from rich.console import Console

    print_table(summarize(HAND), console=Console(file=buf, width=220), title="demo")
    out = buf.getvalue()
    assert "0.67 [0.21, 0.94]" in out and "1.00 GFLOPs" in out and "20.0 ms" in out and "demo" in out
    assert format_flops(2.5e6) == "2.50 MFLOPs" and format_flops(None) == "–"


def test_pareto_plot_and_summary_json(tmp_path):
    rows = summarize(HAND) + [
        dict(config="C", level="all", episodes=5, success=0.6, success_lo=0.2, success_hi=0.9,
             flops_per_decision=5e8),
        dict(config="D", level="all", episodes=5, success=0.5, success_lo=0.1, success_hi=0.9,
             flops_per_decision=2e9),
    ]
    png = pareto_plot(rows, tmp_path / "plots" / "pareto.png", "demo")
    data = Path(png).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert pareto_front([(5e8, 0.6), (1e9, 2 / 3), (2e9, 0.5), (1e9, 0.1)]) == [(5e8, 0.6), (1e9, 2 / 3)]
    empty = pareto_plot([], tmp_path / "empty.png", "none")
    assert os.path.getsize(empty) > 0

    out = write_summary_json(rows, tmp_path / "summary.json")
    loaded = json.loads(Path(out).read_text())
    assert [r["config"] for r in loaded] == ["A", "B", "C", "D"]
    assert math.isclose(loaded[0]["flops_per_decision"], 1e9)


def _row(config, level, success, flops):
    return dict(config=config, level=level, episodes=4, success=success, success_lo=max(0, success - 0.3),
                success_hi=min(1, success + 0.3), flops_per_decision=flops)


def test_pareto_figure_has_a_panel_per_level_and_a_legend_entry_per_config():
    configs = ["full", "reuse", "prune", "random", "recency"]
    rows = [_row(c, lv, 0.5, f) for lv in ("GoToLocal", "PickupLoc", "all")
            for c, f in zip(configs, (9e9, 4e8, 4.7e9, 4.8e9, 4.9e9))]
    rows.append(dict(config="no-flops", level="GoToLocal", success=1.0, flops_per_decision=None))  # left out
    fig = pareto_figure(rows, "t")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["GoToLocal", "PickupLoc", "all levels"]
    assert all(not ax.texts for ax in panels)  # no text labels over the points
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == configs + ["Pareto front"]
    for ax in panels:  # one marker per configuration, each at its own place
        points = [tuple(line.get_xydata()[0]) for line in ax.lines
                  if line.get_marker() not in ("None", "", None, "_") and len(line.get_xydata()) == 1]  # "_": caps
        assert len(points) == len(configs) and len(set(points)) == len(configs)


def test_dodge_spreads_coinciding_points_only():
    xs, ys = [4.7e9, 4.8e9, 4.9e9, 4e8, 9e9], [0.5, 0.5, 0.5, 0.5, 0.5]
    shown = dodge(xs, ys)
    assert shown[3] == 0.5 and shown[4] == 0.5  # alone: true success
    assert sorted(shown[:3]) == shown[:3] and len(set(shown[:3])) == 3
    assert math.isclose(sum(shown[:3]) / 3, 0.5) and max(abs(y - 0.5) for y in shown) < 0.1
    assert dodge([1e9, 1e9], [0.5, 1.0]) == [0.5, 1.0]  # same FLOPs, other success: apart already



def test_the_table_reports_speedup_over_the_flops_ratio_against_full():
    from thrifty.bench.report import summarize

    def ep(config, level, wall, flops):
        return {"config": config, "level": level, "success": True, "steps": 4, "decisions": 4, "flops_total": flops,
                "wall_median_s": wall, "episode_key": f"{level}-{config}"}

    rows = {(r["config"], r["level"]): r for r in summarize(
        [ep("full", "A", 0.8, 4e9), ep("reuse", "A", 0.1, 4e8), ep("reuse", "B", 0.1, 4e8)], by_level=True)}
    # 8x faster for 10x fewer FLOPs: 0.8 of the FLOPs limit
    assert rows[("reuse", "A")]["efficiency_vs_full"] == pytest.approx(0.8)
    assert rows[("full", "A")]["efficiency_vs_full"] == pytest.approx(1.0)
    assert rows[("reuse", "B")]["efficiency_vs_full"] is None  # no full row on that level
