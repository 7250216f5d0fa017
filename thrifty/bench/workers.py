"""Stateful Ray workers and the scheduled run: `thrifty bench SUITE --ray --schedule bandwidth|fifo`.

Stateless Ray tasks (`thrifty.bench.runner`) build every cache from nothing wherever a task lands. Here each worker
is a Ray actor that keeps, across the jobs it runs, its planners (one per configuration), their kept sessions and
their prefix stores, each store with its own byte budget (`store_bytes` per worker). After every job the worker
returns its result and a digest of what its stores hold (their prefixes' token ids, cut at the longest first
prompt of the run), which the driver mirrors (`TrieHoldings`) so the `Scheduler` can price each queued job against
each worker without asking a busy actor.

A job's key is its configuration and its first decision's context (mission, first observation, decision prompt),
computed on the driver by resetting the environment and tokenizing, exactly as `run_episode` builds it.

Faults: a result is appended to the results file as soon as it arrives (fsync'ed); a worker that dies (its actor
is gone: `RayActorError`) is replaced by a fresh one (empty caches) and its job goes back to the queue, up to
`max_attempts` times per job. An episode that raises stops the run as `run_jobs` does: finished results are kept,
a rerun resumes.

Results are the same whatever the schedule: reuse is exact (the cached keys and values are the ones a recompute
gives, to float rounding), so each episode's actions and outcome do not depend on which worker's cache served it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thrifty.bench.results import Job, ResultsFile
from thrifty.bench.scheduler import Scheduler, ScheduleConfig, SchedJob, TrieHoldings
from thrifty.cost.bandwidth import effective_bandwidth

__all__ = ["EpisodeWorker", "ScheduledRun", "first_contexts", "run_scheduled", "with_store_bytes", "run_metrics",
           "TRACE_FORMAT", "OUTCOME_FIELDS"]

TRACE_FORMAT = "thrifty-schedule-trace"
"""The `format` field of a trace file (`--trace-out`), which `thrifty simulate-schedule` checks."""

OUTCOME_FIELDS = ("mission", "episode_key", "success", "reward", "steps", "decisions", "unparseable", "actions")
"""The per-episode fields that must not depend on the schedule (tests/test_scheduler.py)."""


def with_store_bytes(configs: dict[str, dict], store_bytes: int | None) -> dict[str, dict]:
    """The configs with every prefix_reuse store budget (alone or a composed part) set to `store_bytes`."""
    if store_bytes is None:
        return configs
    if store_bytes < 0:
        raise ValueError(f"store_bytes must be >= 0, got {store_bytes}")
    out = {}
    for name, c in configs.items():
        c = json.loads(json.dumps(c))
        if c["technique"] == "prefix_reuse":
            c["settings"]["store_bytes"] = int(store_bytes)
        elif c["technique"] == "composed" and "prefix_reuse" in c["settings"].get("techniques", []):
            c["settings"].setdefault("part_settings", {}).setdefault("prefix_reuse", {})["store_bytes"] = \
                int(store_bytes)
        out[name] = c
    return out


def _stores(technique) -> list:
    return [p.store for p in getattr(technique, "parts", (technique,)) if getattr(p, "store", None) is not None]


def _prefix_hashes(namespace: str, ids: Sequence[int], cuts: Sequence[int]) -> list[list]:
    """[[cut, hash of ids[:cut]], ...]: a chain of prefix hashes (blake2b, 8 bytes) at sorted positions `cuts`."""
    h = hashlib.blake2b(namespace.encode(), digest_size=8)
    out, at = [], 0
    for cut in cuts:
        h.update(b"".join(int(t).to_bytes(4, "little") for t in ids[at:cut]))
        at = cut
        out.append([cut, h.copy().hexdigest()])
    return out


class EpisodeWorker:
    """The body of one Ray actor: plays jobs with planners, sessions and prefix stores it keeps between jobs."""

    def __init__(self, configs: dict[str, dict], model_dir: str, threads: int = 1, max_steps: int | None = None,
                 digest_tokens: int | None = None) -> None:
        import os

        self.configs = configs
        self.model_dir = str(model_dir)
        self.threads = threads
        self.max_steps = max_steps
        self.digest_tokens = digest_tokens
        self.planners: dict[str, tuple[Any, int]] = {}
        self.pid = os.getpid()
        self.jobs_run = 0

    def _planner(self, name: str, level: str):
        from thrifty.agents.planner import TextPlanner, warm_up
        from thrifty.techniques import build

        if name not in self.planners:
            c = self.configs[name]
            planner = TextPlanner.load(self.model_dir, technique=build(c["technique"], **c["settings"]))
            self.planners[name] = planner, warm_up(planner, level)
        return self.planners[name]

    def run(self, job: Job, trace: bool = False) -> dict:
        """Play `job`; returns {"result", "digest" (config -> prefixes), "trace" (when asked), "pid"}."""
        import torch

        from thrifty.agents.planner import EpisodeConfig, run_episode

        torch.set_num_threads(self.threads)
        c = self.configs[job.config]
        planner, warmup = self._planner(job.config, job.level)
        contexts: list[tuple[list[int], dict]] = []
        if trace:  # record each decision's context (an instance attribute: the class is untouched)
            decide = type(planner).decide.__get__(planner)

            def recording(context, *a, **kw):
                contexts.append((list(context.ids), dict(context.spans)))
                return decide(context, *a, **kw)

            planner.decide = recording
        try:
            result = run_episode(planner, job.level, job.seed,
                                 EpisodeConfig(replan=c["replan"], max_steps=self.max_steps))
        finally:
            planner.__dict__.pop("decide", None)
        result["threads"] = self.threads
        result["warmup_decisions"] = warmup
        self.jobs_run += 1
        out = {"result": result, "digest": self.digest(), "pid": self.pid}
        if trace:
            out["trace"] = self._trace(job, contexts, result, planner)
        return out

    def digest(self) -> dict[str, list[list[int]]]:
        """Config name -> the token prefixes its stores hold (cut at `digest_tokens`)."""
        out: dict[str, list[list[int]]] = {}
        for name, (planner, _) in self.planners.items():
            seqs = out.setdefault(name, [])
            for store in _stores(planner.technique):
                for prefixes in store.prefixes(self.digest_tokens).values():
                    seqs += prefixes
        return out

    def _trace(self, job: Job, contexts: list, result: dict, planner) -> dict:
        ids = contexts[-1][0] if contexts else []
        cuts = set()
        for ctx_ids, spans in contexts:
            cuts.add(len(ctx_ids))
            cuts.add(spans.get("mission", (0, 0))[1])
            cuts.add(spans.get("observation", (0, 0))[0])
        per = result["per_decision"]
        return {"job": [job.config, job.level, job.seed], "namespace": job.config,
                "prefix_hashes": _prefix_hashes(job.config, ids, sorted(c for c in cuts if c > 0)),
                "decisions": [[t, r, w] for t, r, w in zip(per["tokens_context"], per["prefix_tokens_reused"],
                                                           per["wall_s"])]}

    def info(self) -> dict:
        """The planner's KV bytes per cached token (keys, values and positions over all layers), for the trace."""
        from thrifty.backbones import HFDecoder

        shape = HFDecoder.load(self.model_dir).shape
        elem = 4
        return {"pid": self.pid, "kv_bytes_per_token": shape.n_layers * (2 * shape.n_kv_heads * shape.head_dim * elem
                                                                          + 8)}

    def ping(self) -> int:
        return self.pid


def first_contexts(jobs: Sequence[Job], model_dir: str | Path, max_steps: int | None = None) -> dict:
    """Job key -> the token ids of its first decision's context (env reset and tokenizer only, no model)."""
    from transformers import AutoTokenizer

    from thrifty.agents.planner import PlannerContext
    from thrifty.envs.babyai_text import BabyAITextEnv

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    out, envs, seen = {}, {}, {}
    for job in jobs:
        if (job.level, job.seed) not in seen:
            env = envs.get(job.level) or envs.setdefault(job.level, BabyAITextEnv(job.level, max_steps=max_steps))
            obs, info = env.reset(seed=job.seed)
            ctx = PlannerContext(tok)
            ctx.start(info["mission"])
            ctx.add_observation(obs)
            seen[(job.level, job.seed)] = tuple(ctx.ids)
        out[job.key] = seen[(job.level, job.seed)]
    for env in envs.values():
        env.close()
    return out


@dataclass
class ScheduledRun:
    """What `run_scheduled` returns: the episode records in job order and the run's metrics."""

    records: list[dict]
    metrics: dict
    trace: dict | None = None


def _fit_sec_per_pair(samples: list[tuple[float, float]]) -> float | None:
    """Least squares wall = a + s * pairs over (pairs, wall) decisions; s, or None when not identifiable."""
    if len(samples) < 8:
        return None
    n = len(samples)
    mx = sum(p for p, _ in samples) / n
    my = sum(w for _, w in samples) / n
    sxx = sum((p - mx) ** 2 for p, _ in samples)
    if sxx <= 0:
        return None
    s = sum((p - mx) * (w - my) for p, w in samples) / sxx
    return s if s > 0 else None


def run_scheduled(
    jobs: Sequence[Job],
    configs: dict[str, dict],
    model_dir: str | Path,
    results: ResultsFile,
    *,
    cfg: ScheduleConfig,
    n_workers: int = 2,
    threads: int = 1,
    max_steps: int | None = None,
    trace: bool = False,
    ray_address: str | None = None,
    max_attempts: int = 3,
    progress: bool = True,
    on_dispatch: Callable[[list, dict], None] | None = None,
) -> ScheduledRun:
    """Run the jobs not yet in `results` on `n_workers` stateful actors in the order `cfg` gives.

    `on_dispatch(actors, inflight)` is called after each round of dispatching (tests use it to kill an actor).
    Returns the records in job order (including the ones already in the file) and this run's metrics, which are
    also appended to the file as a "schedule_run" line.
    """
    import ray
    from ray.exceptions import RayActorError

    from thrifty.bench.runner import _progress, ensure_ray

    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    jobs = list(jobs)
    if len({j.key for j in jobs}) != len(jobs):
        raise ValueError("two jobs share the key (config, level, seed)")
    by_key = {(r.get("config"), r.get("level"), r.get("seed")): r for r in results.episodes()}
    todo = [j for j in jobs if j.key not in by_key]
    prompts = first_contexts(todo, model_dir, max_steps) if todo else {}
    digest_tokens = max((len(p) for p in prompts.values()), default=1)

    ensure_ray(ray_address)
    Actor = ray.remote(num_cpus=1, max_restarts=0)(EpisodeWorker)

    def spawn():
        return Actor.remote(configs, str(model_dir), threads, max_steps, digest_tokens)

    actors = [spawn() for _ in range(n_workers)]
    holdings = TrieHoldings(n_workers)
    sched = Scheduler(cfg, holdings, n_workers)
    for job in todo:
        sched.submit(SchedJob(job.key, key=(job.config, prompts[job.key]), prompt_tokens=len(prompts[job.key]),
                              payload=job))
    attempts: dict[tuple, int] = {}
    inflight: dict[Any, tuple[int, Any, float]] = {}
    free = deque(range(n_workers))
    pairs_walls: list[tuple[float, float]] = []
    run_records: list[dict] = []
    trace_episodes: list[dict] = []
    busy_s = [0.0] * n_workers
    deaths = 0
    info = ray.get(actors[0].info.remote()) if trace and todo else {}

    bar, task_id = _progress(progress, f"{results.suite} ({cfg.schedule}, {n_workers} workers)", len(todo))
    t0 = time.perf_counter()
    try:
        with bar:
            while len(sched) or inflight:
                now = time.perf_counter() - t0
                while free and len(sched):
                    w = free.popleft()
                    pick = sched.pick(w, now)
                    job = pick.job.payload
                    attempts[job.key] = attempts.get(job.key, 0) + 1
                    inflight[actors[w].run.remote(job, trace)] = (w, pick, now)
                if on_dispatch is not None:
                    on_dispatch(actors, inflight)
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    w, pick, dispatched = inflight.pop(ref)
                    job = pick.job.payload
                    now = time.perf_counter() - t0
                    try:
                        out = ray.get(ref)
                    except RayActorError:
                        deaths += 1
                        if attempts[job.key] >= max_attempts:
                            raise RuntimeError(f"job {job.key} lost its worker {attempts[job.key]} times; giving up")
                        sched.forget(w)
                        holdings.drop(w)
                        with contextlib.suppress(Exception):
                            ray.kill(actors[w])
                        actors[w] = spawn()  # a fresh worker: empty caches
                        sched.submit(SchedJob(job.key, key=pick.job.key, prompt_tokens=pick.job.prompt_tokens,
                                              payload=job))
                        free.append(w)
                        continue
                    took = sched.finished(w, now)
                    busy_s[w] += took
                    holdings.update(w, out["digest"])
                    result = out["result"]
                    result["schedule"] = {"policy": cfg.schedule, "worker": w, "pid": out["pid"],
                                          "wait_s": round(dispatched, 4), "took_s": round(took, 4),
                                          "how": pick.how, "expected_cached": pick.cached,
                                          "prompt_tokens": pick.job.prompt_tokens, "attempt": attempts[job.key]}
                    by_key[job.key] = rec = results.append(job, result)
                    run_records.append(rec)
                    if trace:
                        trace_episodes.append(out["trace"])
                    per = result["per_decision"]
                    pairs_walls += [(effective_bandwidth(t, r), s) for t, r, s in
                                    zip(per["tokens_context"], per["prefix_tokens_reused"], per["wall_s"])]
                    fitted = _fit_sec_per_pair(pairs_walls)
                    if fitted is not None:
                        sched.observe_cost(fitted)
                    free.append(w)
                    bar.advance(task_id)
    finally:
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
    makespan = time.perf_counter() - t0
    metrics = run_metrics(run_records, n_workers, makespan)
    metrics.update({"schedule": cfg.schedule, "w_b": cfg.w_b, "w_q": cfg.w_q, "workers": n_workers,
                    "picks": dict(sched.counts), "worker_deaths": deaths,
                    "sec_per_pair_fitted": sched.sec_per_pair, "busy_s": [round(b, 3) for b in busy_s]})
    if run_records:
        results.append_record("schedule_run", metrics)
    trace_doc = None
    if trace:
        trace_doc = {"format": TRACE_FORMAT, "version": 1, "suite": results.suite, "schedule": cfg.schedule,
                     "workers": n_workers, "kv_bytes_per_token": info.get("kv_bytes_per_token"),
                     "store_budget_bytes": _store_budget(configs), "episodes": trace_episodes}
    return ScheduledRun([by_key[j.key] for j in jobs], metrics, trace_doc)


def _store_budget(configs: dict[str, dict]) -> int | None:
    for c in configs.values():
        if c["technique"] == "prefix_reuse":
            return c["settings"].get("store_bytes", 64 * 2**20)
        if c["technique"] == "composed":
            part = c["settings"].get("part_settings", {}).get("prefix_reuse")
            if part is not None:
                return part.get("store_bytes", 64 * 2**20)
    return None


def run_metrics(records: Sequence[dict], n_workers: int, makespan_s: float) -> dict:
    """Prefix hit rate per worker and overall (tokens, vLLM's units), b_eff served from cache and recomputed
    (attention FLOPs, EchoRL's cost), queue wait, decisions per second over the run's makespan, and eta_bw."""

    def block(recs: Sequence[dict]) -> dict:
        prompt = sum(r.get("prompt_tokens_total", 0) for r in recs)
        cached = sum(r.get("cached_tokens_total", 0) for r in recs)
        full = sum(r.get("bw_full", 0.0) for r in recs)
        eff = sum(r.get("bw_eff", 0.0) for r in recs)
        decisions = sum(r.get("decisions", 0) for r in recs)
        return {"episodes": len(recs), "decisions": decisions, "prompt_tokens": prompt, "cached_tokens": cached,
                "prefix_hit_rate": cached / prompt if prompt else 0.0,
                "bw_served": full - eff, "bw_recomputed": eff,
                "success": sum(bool(r.get("success")) for r in recs) / len(recs) if recs else 0.0}

    overall = block(records)
    waits = [r["schedule"]["wait_s"] for r in records if "schedule" in r]
    ret = sum(float(r.get("reward", 0.0)) for r in records)
    overall.update({
        "makespan_s": makespan_s,
        "decisions_per_s": overall["decisions"] / makespan_s if makespan_s > 0 else 0.0,
        "queue_wait_mean_s": statistics.fmean(waits) if waits else 0.0,
        "queue_wait_median_s": statistics.median(waits) if waits else 0.0,
        "queue_wait_max_s": max(waits, default=0.0),
        "return": ret,
        "eta_bw": ret / (overall["bw_recomputed"] / 1e9) if overall["bw_recomputed"] > 0 else 0.0,
        "per_worker": [block([r for r in records if r.get("schedule", {}).get("worker") == w])
                       for w in range(n_workers)],
    })
    return overall

