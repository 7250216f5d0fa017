"""A trace-driven simulation of the scheduler over N workers: how hit rate and throughput grow past one machine.

A SIMULATION, not a measurement. Its inputs come from a real run (`thrifty bench SUITE --ray --schedule ...
--trace-out FILE`): every episode's decisions with their context lengths, the prefix hashes of their contexts at
the transcript's segment boundaries (mission, each action, each observation and prompt), and their measured wall
times. From those it fits a per-decision cost, wall = c0 + c_tok * (t - t') + c_pair * (b(t) - b(t')), and replays
the episodes on N simulated workers, each with a prefix cache of the real run's per-worker byte budget (LRU over
segments, in the real model's KV bytes per token), driven by the same `Scheduler` as the real run:

- bandwidth, fifo, random: per-worker caches; the scheduler sees each worker's cache as of its last finished job
  (as the real driver sees the digest a worker returns);
- shared: one cache of N x the budget that every worker reads and writes, jobs in the bandwidth schedule's order
  (the priority against that one cache): the ceiling N partitioned caches can approach.

Within an episode the kept session serves the previous decision's context (as `prefix_reuse` does); a decision
reuses the longer of that and its cache match, at most t - 1 tokens. Hits are segment-aligned (like vLLM's
block-aligned hits), so a partly shared segment counts as a miss. What it leaves out: the time to move digests and
results, worker start-up, and contention between workers of one machine. Deterministic for a seed.

Workload at N workers: max(episodes in the trace, jobs_per_worker x N) jobs, the trace's episodes first and then
ones drawn from it with the seed, submitted in a seeded random order; every schedule gets the same jobs.
"""

from __future__ import annotations

import heapq
import json
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from thrifty.bench.scheduler import SCHEDULES, ScheduleConfig, Scheduler, SchedJob
from thrifty.bench.workers import TRACE_FORMAT
from thrifty.cost.bandwidth import effective_bandwidth

__all__ = ["TraceFormatError", "load_trace", "fit_cost", "simulate", "sweep", "SIM_POLICIES", "plot_sweep"]

SIM_POLICIES = (*SCHEDULES, "shared")

MAX_COMPETITORS = 64
"""Holders of a job's deepest cached level the bandwidth schedule compares a free worker with (the simulator's only
shortcut: at 1,024 workers a popular prefix can live on hundreds of them)."""


class TraceFormatError(ValueError):
    """The file is not a schedule trace (`--trace-out`) of a version this simulator reads."""


@dataclass(frozen=True)
class Episode:
    namespace: str
    cuts: tuple[int, ...]
    hashes: tuple[str, ...]
    contexts: tuple[int, ...]
    """t per decision"""

    def chain(self, t: int) -> list[tuple[int, str]]:
        return [(c, h) for c, h in zip(self.cuts, self.hashes) if c <= t]


def load_trace(path: str | Path) -> dict:
    """The trace, checked: a JSON object with format TRACE_FORMAT, version 1, episodes and kv_bytes_per_token."""
    path = Path(path)
    try:
        text = path.read_text()
        first = text.split("\n", 1)[0]
        if '"kind": "header"' in first and len(text.strip().splitlines()) > 1:
            raise TraceFormatError(f"{path}: a thrifty results file (JSON lines), not a schedule trace: format "
                                   f"expected {TRACE_FORMAT!r}; write a trace with `thrifty bench SUITE --ray "
                                   "--schedule bandwidth --trace-out FILE`")
        doc = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, TraceFormatError):
            raise
        raise TraceFormatError(f"{path}: not a JSON schedule trace ({e}); write one with `thrifty bench SUITE --ray "
                               "--schedule bandwidth --trace-out FILE`") from None
    if not isinstance(doc, dict) or doc.get("format") != TRACE_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise TraceFormatError(f"{path}: format {got!r}, expected {TRACE_FORMAT!r} (a file from `thrifty bench ... "
                               "--trace-out`; a results .jsonl file is not a trace)")
    if doc.get("version") != 1:
        raise TraceFormatError(f"{path}: trace version {doc.get('version')!r}, this simulator reads version 1")
    if not doc.get("episodes") or not doc.get("kv_bytes_per_token"):
        raise TraceFormatError(f"{path}: the trace has no episodes or no kv_bytes_per_token")
    return doc


def _episodes(doc: dict) -> list[Episode]:
    out = []
    for e in doc["episodes"]:
        if not e["decisions"]:
            continue
        cuts, hashes = zip(*e["prefix_hashes"]) if e["prefix_hashes"] else ((), ())
        out.append(Episode(e["namespace"], tuple(cuts), tuple(hashes), tuple(d[0] for d in e["decisions"])))
    return out


def fit_cost(doc: dict) -> dict:
    """Least squares wall = c0 + c_tok * new tokens + c_pair * b_eff pairs over the trace's decisions (negative
    coefficients set to 0 and the rest refitted)."""
    import numpy as np

    rows = [(1.0, t - r, effective_bandwidth(t, r), w) for e in doc["episodes"] for t, r, w in e["decisions"]]
    a = np.array([r[:3] for r in rows], dtype=float)
    y = np.array([r[3] for r in rows], dtype=float)
    active = [0, 1, 2]
    while True:
        coef, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            break
        active = [c for c, k in zip(active, coef) if k >= 0] or [0]
    full = [0.0, 0.0, 0.0]
    for c, k in zip(active, coef):
        full[c] = max(float(k), 0.0)
    pred = a @ np.array(full)
    return {"c0_s": full[0], "c_tok_s": full[1], "c_pair_s": full[2], "decisions": len(rows),
            "mean_wall_s": float(y.mean()), "mean_abs_error_s": float(np.abs(pred - y).mean())}


class _Cache:
    """LRU over prefix segments (keyed by the hash of the prefix they end), capacity in tokens."""

    def __init__(self, capacity_tokens: float) -> None:
        self.capacity = capacity_tokens
        self.entries: OrderedDict[str, int] = OrderedDict()
        self.tokens = 0
        self.evicted: list[str] = []

    def match(self, chain: list[tuple[int, str]]) -> int:
        n = 0
        for cut, h in chain:
            if h not in self.entries:
                break
            self.entries.move_to_end(h)
            n = cut
        return n

    def insert(self, chain: list[tuple[int, str]]) -> None:
        prev = 0
        for cut, h in chain:
            if h in self.entries:
                self.entries.move_to_end(h)
            else:
                self.entries[h] = cut - prev
                self.tokens += cut - prev
            prev = cut
        while self.tokens > self.capacity and self.entries:
            h, n = self.entries.popitem(last=False)
            self.tokens -= n
            self.evicted.append(h)


class _SimHoldings:
    """The scheduler's view: each worker's cached hashes as of its last finished job, with an inverted index."""

    def __init__(self, n_workers: int) -> None:
        self.held: list[set[str]] = [set() for _ in range(n_workers)]
        self.index: dict[str, set[int]] = {}

    def snapshot(self, worker: int, hashes: set[str]) -> None:
        old = self.held[worker]
        for h in old - hashes:
            s = self.index[h]
            s.discard(worker)
            if not s:
                del self.index[h]
        for h in hashes - old:
            self.index.setdefault(h, set()).add(worker)
        self.held[worker] = hashes

    def cached(self, worker: int, key) -> int:
        held, n = self.held[worker], 0
        for cut, h in key[1]:
            if h not in held:
                break
            n = cut
        return n

    def deeper(self, key, than: int):
        chain = key[1]
        for i in range(len(chain) - 1, -1, -1):  # the deepest level anyone holds, deeper than `than`
            cut, h = chain[i]
            if cut <= than:
                return
            holders = self.index.get(h)
            if holders:
                for w in sorted(holders)[:MAX_COMPETITORS]:
                    c = self.cached(w, key)
                    if c > than:
                        yield w, c
                return


class _SharedHoldings:
    """One cache every worker reads: the same cached length everywhere, so no worker holds more than another."""

    def __init__(self, cache: _Cache) -> None:
        self.cache = cache

    def cached(self, worker: int, key) -> int:
        n = 0
        for cut, h in key[1]:
            if h not in self.cache.entries:
                break
            n = cut
        return n

    def deeper(self, key, than: int):
        return ()


def simulate(doc: dict, n_workers: int, policy: str, seed: int = 0, jobs_per_worker: int = 8,
             budget_bytes: int | None = None, w_b: float = 1.0, w_q: float = 1.0, cost: dict | None = None) -> dict:
    """Replay the trace's episodes on `n_workers` under `policy` (one of SIM_POLICIES); returns the run's figures."""
    if policy not in SIM_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(SIM_POLICIES)}")
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    cost = cost or fit_cost(doc)
    episodes = _episodes(doc)
    budget = doc.get("store_budget_bytes") if budget_bytes is None else budget_bytes
    capacity = budget / doc["kv_bytes_per_token"]
    rng = random.Random(seed)
    n_jobs = max(len(episodes), jobs_per_worker * n_workers)
    picks = list(range(len(episodes))) + [rng.randrange(len(episodes)) for _ in range(n_jobs - len(episodes))]
    rng.shuffle(picks)

    shared = _Cache(capacity * n_workers) if policy == "shared" else None
    holdings = _SharedHoldings(shared) if shared else _SimHoldings(n_workers)
    cfg = ScheduleConfig("bandwidth" if policy == "shared" else policy, w_b=w_b, w_q=w_q, seed=seed,
                         sec_per_pair=max(cost["c_pair_s"], 1e-12),
                         job_seconds=cost["mean_wall_s"] * max(len(e.contexts) for e in episodes))
    sched = Scheduler(cfg, holdings, n_workers)
    for i, e_idx in enumerate(picks):
        e = episodes[e_idx]
        key = (e.namespace, tuple(e.chain(e.contexts[0])))
        sched.submit(SchedJob(i, key=key, prompt_tokens=e.contexts[0], payload=e))
    caches = [shared] * n_workers if shared else [_Cache(capacity) for _ in range(n_workers)]

    prompt = cached_total = decisions = 0
    busy = [0.0] * n_workers
    events: list[tuple[float, int]] = []
    free = list(range(n_workers))
    now = 0.0
    while True:
        for w in free:
            pick = sched.pick(w, now)
            if pick is None:
                break
            e: Episode = pick.job.payload
            took, kept = 0.0, 0
            for t in e.contexts:  # the whole episode on w's cache
                chain = e.chain(t)
                reused = min(max(kept, caches[w].match(chain)), t - 1)
                took += cost["c0_s"] + cost["c_tok_s"] * (t - reused) + cost["c_pair_s"] * effective_bandwidth(t, reused)
                caches[w].insert(chain)
                prompt += t
                cached_total += reused
                kept = t
            decisions += len(e.contexts)
            busy[w] += took
            heapq.heappush(events, (now + took, w))
        if not events:
            break
        now, w = heapq.heappop(events)
        finished = [w]
        while events and events[0][0] == now:
            finished.append(heapq.heappop(events)[1])
        free = sorted(finished)  # the batch has no arrivals: a worker left idle by an empty queue stays idle
        for w in free:
            sched.finished(w, now)
            if shared is None:
                holdings.snapshot(w, set(caches[w].entries))
    makespan = now
    return {"policy": policy, "workers": n_workers, "jobs": n_jobs, "decisions": decisions,
            "prefix_hit_rate": cached_total / prompt if prompt else 0.0, "makespan_s": makespan,
            "decisions_per_s": decisions / makespan if makespan > 0 else 0.0,
            "utilization": sum(busy) / (makespan * n_workers) if makespan > 0 else 0.0,
            "picks": dict(sched.counts), "budget_bytes_per_worker": budget, "seed": seed}


def sweep(doc: dict, workers: list[int], policies=SIM_POLICIES, seed: int = 0, jobs_per_worker: int = 8,
          budget_bytes: int | None = None, w_b: float = 1.0, w_q: float = 1.0) -> dict:
    cost = fit_cost(doc)
    rows = [simulate(doc, n, p, seed=seed, jobs_per_worker=jobs_per_worker, budget_bytes=budget_bytes, w_b=w_b,
                     w_q=w_q, cost=cost) for n in workers for p in policies]
    return {"kind": "simulation", "note": "SIMULATED from a recorded trace of a real run (thrifty.bench.schedule_sim)",
            "trace": {"suite": doc.get("suite"), "schedule": doc.get("schedule"), "workers": doc.get("workers"),
                      "episodes": len(doc["episodes"]), "kv_bytes_per_token": doc["kv_bytes_per_token"],
                      "store_budget_bytes": doc.get("store_budget_bytes")},
            "cost_model": cost, "seed": seed, "jobs_per_worker": jobs_per_worker, "rows": rows}


def plot_sweep(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for p in SIM_POLICIES:
        rows = [r for r in result["rows"] if r["policy"] == p]
        if not rows:
            continue
        ns = [r["workers"] for r in rows]
        axes[0].plot(ns, [r["prefix_hit_rate"] for r in rows], marker="o", label=p)
        axes[1].plot(ns, [r["decisions_per_s"] / r["workers"] for r in rows], marker="o", label=p)
    for ax, label in zip(axes, ("prefix hit rate (tokens)", "decisions / s per worker (simulated)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    t = result["trace"]
    fig.suptitle(f"SIMULATION from a recorded trace ({t['suite']}, {t['episodes']} real episodes; "
                 f"{t['store_budget_bytes'] / 2**20:.0f} MiB store per worker)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
