"""The scheduler (issue 20): priority order, cache-affine routing, stealing, stateful Ray workers that survive a
dead actor with the same results as in-process, the trace-driven simulator, and the errors of bad inputs."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from thrifty.bench.scheduler import (Scheduler, ScheduleConfig, SchedJob, TokenTrie, TrieHoldings,
                                     UnknownScheduleError, priority)
from thrifty.cost.bandwidth import effective_bandwidth


class Table:
    """Holdings from a hand-made table: (worker, key) -> cached tokens."""

    def __init__(self, cached: dict, n_workers: int = 1):
        self.table, self.n = cached, n_workers

    def cached(self, worker, key):
        return self.table.get((worker, key), 0)

    def deeper(self, key, than):
        return [(w, self.cached(w, key)) for w in range(self.n) if self.cached(w, key) > than]


def test_priority_order_matches_a_hand_made_queue():
    # worker 0 holds 90 of a's 100 tokens, 10 of b's 100, nothing of c (50) or d (20); value 2 for d
    cfg = ScheduleConfig("bandwidth", sec_per_pair=1e-3)
    s = Scheduler(cfg, Table({(0, "a"): 90, (0, "b"): 10}), 1)
    for name, t, v in (("b", 100, 1.0), ("c", 50, 1.0), ("a", 100, 1.0), ("d", 20, 2.0)):
        s.submit(SchedJob(name, key=name, prompt_tokens=t, value=v))
    # b_eff pairs: a 5050-4095=955, b 5050-55=4995, c 1275, d 210 (value 2): priorities d > a > c > b
    by_hand = sorted(["a", "b", "c", "d"], key=lambda j: -{"a": 1 / 955, "b": 1 / 4995, "c": 1 / 1275,
                                                            "d": 2 / 210}[j])
    assert by_hand == ["d", "a", "c", "b"]
    assert [s.pick(0, 0.0).job.id for _ in range(4)] == by_hand
    assert s.pick(0, 0.0) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 400), st.integers(0, 400), st.floats(0.0, 5.0)), min_size=1, max_size=12))
def test_single_worker_pops_in_priority_order(jobs):
    cfg = ScheduleConfig("bandwidth", sec_per_pair=1e-6)
    table = {(0, i): c for i, (_, c, _) in enumerate(jobs)}
    s = Scheduler(cfg, Table(table), 1)
    for i, (t, _, v) in enumerate(jobs):
        s.submit(SchedJob(i, key=i, prompt_tokens=t, value=v))

    def prio(i):
        t, c, v = jobs[i]
        return priority(v, effective_bandwidth(t, min(c, t - 1)) * 1e-6, 0.0, cfg)

    expected = sorted(range(len(jobs)), key=lambda i: (-prio(i), i))  # ties: submission order
    assert [s.pick(0, 0.0).job.id for _ in jobs] == expected
    assert len(s) == 0


def test_fifo_and_random_ignore_the_caches_and_random_is_seeded():
    table = Table({(0, 3): 99}, 1)
    fifo = Scheduler(ScheduleConfig("fifo"), table, 1)
    for i in range(5):
        fifo.submit(SchedJob(i, key=i, prompt_tokens=100))
    assert [fifo.pick(0, 0.0).job.id for _ in range(5)] == [0, 1, 2, 3, 4]
    orders = []
    for _ in range(2):
        r = Scheduler(ScheduleConfig("random", seed=7), table, 1)
        for i in range(8):
            r.submit(SchedJob(i, key=i % 3, prompt_tokens=100))
        orders.append([r.pick(0, 0.0).job.id for _ in range(8)])
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(8))


def test_routing_picks_the_worker_with_the_longest_cached_prefix():
    h = TrieHoldings(2)
    h.update(0, {"cfg": [[1, 2, 3, 4, 5, 6]]})
    h.update(1, {"cfg": [[1, 2, 3, 9, 9, 9, 9, 9]]})
    assert h.cached(0, ("cfg", (1, 2, 3, 4, 5, 6, 7))) == 6 and h.cached(1, ("cfg", (1, 2, 3, 4))) == 3
    assert h.cached(0, ("other", (1, 2, 3))) == 0  # namespaces (configurations) never mix
    s = Scheduler(ScheduleConfig("bandwidth"), h, 2)
    s.submit(SchedJob("on0", key=("cfg", (1, 2, 3, 4, 5, 6, 7)), prompt_tokens=7))
    s.submit(SchedJob("on1", key=("cfg", (1, 2, 3, 9, 9, 9, 9, 9, 8)), prompt_tokens=9))
    first = s.pick(1, 0.0)  # worker 1 free first: it takes the job whose prefix it holds, not the oldest
    assert (first.job.id, first.how, first.cached) == ("on1", "routed", 8)
    second = s.pick(0, 0.0)
    assert (second.job.id, second.how, second.cached) == ("on0", "routed", 6)


def _busy_holder(job_seconds, with_plain):
    """Worker 1 holds 199 of the long job's 200 tokens and is busy (an expected `job_seconds` job since t=0);
    recomputing the long job on worker 0 costs b(200) * 1e-4 = 2.01 s, on worker 1 0.02 s."""
    key = ("cfg", tuple(range(200)))
    cfg = ScheduleConfig("bandwidth", sec_per_pair=1e-4, job_seconds=job_seconds)
    s = Scheduler(cfg, Table({(1, key): 199}, 2), 2)
    s.submit(SchedJob("filler", key=("cfg", (9,)), prompt_tokens=1))
    assert s.pick(1, 0.0).job.id == "filler"
    s.submit(SchedJob("long", key=key, prompt_tokens=200))
    if with_plain:
        s.submit(SchedJob("plain", key=("cfg", (7,) * 10), prompt_tokens=10))
    return s


def test_a_busy_holder_keeps_its_job_unless_its_wait_costs_more_than_the_recompute():
    # worker 1 free again in ~0.4 s: waiting for it (0.42 s) beats recomputing here (2.01 s)
    s = _busy_holder(0.5, with_plain=True)
    got = s.pick(0, 0.1)
    assert (got.job.id, got.how) == ("plain", "routed")
    s = _busy_holder(0.5, with_plain=False)
    got = s.pick(0, 0.1)
    assert (got.job.id, got.how) == ("long", "stolen")  # nothing routed to worker 0: it steals rather than idle
    # worker 1 busy for ~9 more seconds: the long job is better off recomputed on free worker 0
    s = _busy_holder(10.0, with_plain=False)
    got = s.pick(0, 1.0)
    assert (got.job.id, got.how, got.cached) == ("long", "routed", 0)


def test_token_trie_and_store_digest(tiny_planner_dir):
    from thrifty.backbones import HFDecoder
    from thrifty.runtime import Session
    from thrifty.runtime.prefix_store import PrefixStore

    bb = HFDecoder.load(tiny_planner_dir)
    store = PrefixStore(1 << 22)
    for ids in ([1, 2, 3, 4, 5], [1, 2, 3, 7, 8, 9]):
        s = Session(bb)
        s.extend(ids)
        store.insert(s)
    assert store.prefixes() == {"": [[1, 2, 3, 4, 5], [1, 2, 3, 7, 8, 9]]}
    assert store.prefixes(4) == {"": [[1, 2, 3, 4], [1, 2, 3, 7]]}
    t = TokenTrie(store.prefixes()[""])
    assert t.match([1, 2, 3, 7, 8, 0]) == 5


# ---------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(UnknownScheduleError, match="unknown schedule 'lifo'.*bandwidth, fifo, random"):
        ScheduleConfig("lifo")
    with pytest.raises(ValueError, match="w_b must be a number >= 0"):
        ScheduleConfig("bandwidth", w_b=-1.0)
    with pytest.raises(ValueError, match="w_q must be a number >= 0"):
        ScheduleConfig("bandwidth", w_q=-0.5)
    from thrifty.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["bench", "sched", "--ray", "--schedule", "lifo", "--out", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "unknown schedule 'lifo'" in r.output
    r = runner.invoke(app, ["bench", "sched", "--ray", "--schedule", "bandwidth", "--w-b", "-1",
                            "--out", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "--w-b must be a number >= 0" in r.output
    r = runner.invoke(app, ["bench", "sched", "--schedule", "fifo", "--out", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "need --ray" in r.output

    from thrifty.bench.results import Job, ResultsFile
    from thrifty.bench.schedule_sim import TraceFormatError, load_trace

    results = tmp_path / "run.jsonl"
    ResultsFile(results, "sched").append(Job("sched", "c", "GoToLocal", 1, 0), {"success": True})
    with pytest.raises(TraceFormatError, match="a thrifty results file .*expected 'thrifty-schedule-trace'"):
        load_trace(results)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "chrome-trace", "traceEvents": []}))
    with pytest.raises(TraceFormatError, match="format 'chrome-trace'"):
        load_trace(other)
    r = runner.invoke(app, ["simulate-schedule", "--trace", str(results)])
    assert r.exit_code == 2 and "not a schedule trace" in r.output


# ---------------------------------------------------------------------- simulator
def _synthetic_trace(episodes=30, seed=0):
    import random

    from thrifty.bench.workers import TRACE_FORMAT

    rng = random.Random(seed)
    eps = []
    for e in range(episodes):
        family = rng.randrange(4)  # 4 families of episodes share their first observations
        cuts, hashes, ctx, t = [], [], [], 10
        decisions = []
        for k in range(rng.randrange(3, 8)):
            t += 20
            cuts.append(t)
            shared = k < 3
            hashes.append(f"f{family}-{k}" if shared else f"e{e}-{k}")
            decisions.append([t, 0 if k == 0 else t - 20, 0.002 + 1e-5 * 20 + 1e-9 * t * 20])
        eps.append({"job": ["c", "L", e], "namespace": "c", "prefix_hashes": [list(x) for x in zip(cuts, hashes)],
                    "decisions": decisions})
    return {"format": TRACE_FORMAT, "version": 1, "suite": "synthetic", "schedule": "fifo", "workers": 2,
            "kv_bytes_per_token": 1000, "store_budget_bytes": 200_000, "episodes": eps}


def test_the_simulator_replays_a_trace_deterministically(tmp_path):
    from thrifty.bench.schedule_sim import load_trace, simulate, sweep

    path = tmp_path / "trace.json"
    path.write_text(json.dumps(_synthetic_trace()))
    doc = load_trace(path)
    a = sweep(doc, [2, 8], seed=3, jobs_per_worker=6)
    b = sweep(load_trace(path), [2, 8], seed=3, jobs_per_worker=6)
    assert a == b
    assert {(r["workers"], r["policy"]) for r in a["rows"]} == {(n, p) for n in (2, 8)
                                                              for p in ("bandwidth", "fifo", "random", "shared")}
    for r in a["rows"]:
        assert 0.0 <= r["prefix_hit_rate"] < 1.0 and r["decisions_per_s"] > 0
        assert r["jobs"] == max(30, 6 * r["workers"])
    with pytest.raises(ValueError, match="unknown policy"):
        simulate(doc, 2, "lifo")


# ---------------------------------------------------------------------- Ray: stateful workers, a dead actor
@pytest.mark.own_process
def test_scheduled_ray_run_matches_in_process_and_survives_a_dead_worker(tiny_planner_dir, tmp_path):
    ray = pytest.importorskip("ray")
    from thrifty.bench.results import Job, ResultsFile
    from thrifty.bench.suites import BenchConfig, run_job
    from thrifty.bench.workers import OUTCOME_FIELDS, run_scheduled, with_store_bytes

    configs = with_store_bytes({"prefix_reuse": BenchConfig("prefix_reuse", "prefix_reuse").as_dict()}, 1 << 20)
    jobs = [Job("t", "prefix_reuse", "GoToLocal", seed, i) for i, seed in enumerate((5, 6, 5 + 10**6, 7, 8, 9))]
    local = {j.key: run_job(j, configs, str(tiny_planner_dir), threads=1, max_steps=6) for j in jobs}

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        for schedule in ("bandwidth", "fifo"):
            res = ResultsFile(tmp_path / f"{schedule}.jsonl", "t")
            killed = []

            def kill_once(actors, inflight):
                if not killed and any(w == 0 for w, _, _ in inflight.values()):
                    killed.append(True)
                    ray.kill(actors[0])

            run = run_scheduled(jobs, configs, tiny_planner_dir, res, cfg=ScheduleConfig(schedule), n_workers=2,
                                max_steps=6, progress=False, on_dispatch=kill_once, trace=True)
            assert run.metrics["worker_deaths"] >= 1
            on_disk = ResultsFile(tmp_path / f"{schedule}.jsonl", "t").episodes()
            assert sorted((r["config"], r["level"], r["seed"]) for r in on_disk) == sorted(j.key for j in jobs)
            for rec in run.records:
                want = local[(rec["config"], rec["level"], rec["seed"])]
                assert {f: rec[f] for f in OUTCOME_FIELDS} == {f: want[f] for f in OUTCOME_FIELDS}
            assert any(r["schedule"]["attempt"] == 2 for r in run.records)  # the killed job ran again
            m = ResultsFile(tmp_path / f"{schedule}.jsonl", "t").records("schedule_run")[-1]
            assert m["schedule"] == schedule and len(m["per_worker"]) == 2 and 0 < m["prefix_hit_rate"] < 1
            assert len(run.trace["episodes"]) == len(jobs) and run.trace["kv_bytes_per_token"] > 0
            # a rerun on the finished file runs nothing and returns the same records
            again = run_scheduled(jobs, configs, tiny_planner_dir, res, cfg=ScheduleConfig(schedule), n_workers=2,
                                  max_steps=6, progress=False)
            assert again.records == run.records and again.metrics["episodes"] == 0
    finally:
        ray.shutdown()


def test_docstring_examples_run():
    import doctest

    from thrifty.bench import scheduler

    assert doctest.testmod(scheduler, raise_on_error=True).failed == 0
