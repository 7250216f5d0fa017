"""Bandwidth-aware, cache-affine scheduling of jobs over workers that each keep their own prefix cache.

EchoRL ranks work by its value over its bandwidth cost (NoakLiu/Echo-RL, `core/bandwidth.py`; its engine builds
that queue and never reads it, research notes B2/B8). Here the queue is consumed, and the cost is priced against
what each worker holds, as a cache-aware router (SGLang) would:

    priority(j, w) = value_j / (w_b * b_eff(j, w) + w_q * wait(w) + eps)

- b_eff(j, w) = b(t) - b(t'), in seconds: t = the job's known prompt (an episode's first decision context), t' =
  the longest prefix of it that worker w's cache holds (capped at t - 1: the last token is always recomputed),
  b(t) = t (t + 1) / 2 attention pairs, priced at `sec_per_pair` (measured: fitted on finished decisions).
- wait(w) = seconds until worker w can start the job: 0 if it is free, else the expected remainder of the job it
  runs (EchoRL's stand-in is queue length x 0.1 s). Not the time a job has already waited: with that term in the
  denominator, the longer a job waited the further back it would go.

Dispatch (a worker w became free): a job is *routed* to w when no other worker gives it a higher priority (a busy
worker holding a longer prefix wins only if its cached tokens save more than its remaining work costs); w takes
its highest-priority routed job. With nothing routed to it, w *steals* the job that is cheapest for it (work
conserving: a worker never idles while the queue is non-empty). `fifo` takes the oldest job and `random` a uniform
one (seeded): both ignore the caches, which is what stateless Ray tasks do.

Jobs with the same prefix key (same namespace and prompt) are interchangeable for every term above, so the queue
keeps one FIFO per key and a decision costs O(keys x holders), not O(jobs x workers): the simulator drives this
same class over 1,024 workers.

The scheduler does not touch caches: a `Holdings` answers how much of a key each worker holds (the real run
mirrors each worker's store from the digest it returns; the simulator asks its simulated caches).

Example:
    >>> class Nothing:
    ...     def cached(self, worker, key): return 0
    ...     def deeper(self, key, than): return ()
    >>> s = Scheduler(ScheduleConfig("fifo"), Nothing(), n_workers=1)
    >>> for i in range(3): s.submit(SchedJob(i, key=("", (1, 2, 3)), prompt_tokens=3))
    >>> [s.pick(0, now=0.0).job.id for _ in range(3)]
    [0, 1, 2]
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Protocol

from thrifty.cost.bandwidth import effective_bandwidth

__all__ = ["SCHEDULES", "ScheduleConfig", "UnknownScheduleError", "SchedJob", "Holdings", "Pick", "Scheduler",
           "TokenTrie", "priority"]

SCHEDULES = ("bandwidth", "fifo", "random")
"""bandwidth: EchoRL's priority against each worker's cache; fifo: submission order; random: a seeded uniform pick."""


class UnknownScheduleError(ValueError):
    """A schedule name that is not one of `SCHEDULES`."""


@dataclass(frozen=True)
class ScheduleConfig:
    """How jobs are ordered and routed."""

    schedule: str = "bandwidth"
    """one of SCHEDULES"""
    w_b: float = 1.0
    """weight of b_eff (seconds of attention recompute) in the priority's denominator"""
    w_q: float = 1.0
    """weight of wait (seconds until the worker can start the job)"""
    eps: float = 1e-9
    """keeps the priority finite when both terms are 0 (a fully cached job on a free worker)"""
    sec_per_pair: float = 3e-7
    """prior price of one attention (query, key) pair in seconds, until `Scheduler.observe_cost` measured one"""
    job_seconds: float = 1.0
    """prior duration of a job in seconds (the wait term's estimate), until jobs finished"""
    seed: int = 0
    """seed of the `random` schedule"""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UnknownScheduleError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("w_b", "w_q", "eps", "sec_per_pair", "job_seconds"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value != value or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        if self.w_b == 0 and self.w_q == 0 and self.schedule == "bandwidth":
            raise ValueError("w_b and w_q are both 0: every job would have the same priority (use --schedule fifo)")


def priority(value: float, b_eff_s: float, wait_s: float, cfg: ScheduleConfig) -> float:
    """EchoRL's value / (w_b * b_eff + w_q * wait + eps), both costs in seconds."""
    return value / (cfg.w_b * b_eff_s + cfg.w_q * wait_s + cfg.eps)


@dataclass
class SchedJob:
    """One unit of work: `key` = (namespace, prompt token ids or a hash chain), what the caches are matched on."""

    id: Any
    key: Hashable
    prompt_tokens: int
    """t: tokens of the prompt the key stands for (the job's first decision context)"""
    value: float = 1.0
    """the priority's numerator (1 per evaluation episode; an RL rollout could use its expected return)"""
    payload: Any = None
    submitted_at: float = 0.0
    seq: int = 0
    """submission order (set by `Scheduler.submit`), the tie-break everywhere"""


class Holdings(Protocol):
    """What each worker's cache holds, in tokens of a job key's prompt."""

    def cached(self, worker: int, key: Hashable) -> int:
        """Tokens of `key`'s prompt served from `worker`'s cache (its longest cached prefix)."""

    def deeper(self, key: Hashable, than: int) -> Iterable[tuple[int, int]]:
        """(worker, cached tokens) of the workers holding more than `than` tokens of `key`'s prompt."""


@dataclass
class Pick:
    """A dispatch decision: the job, the tokens its worker was expected to serve from cache, and how it was chosen."""

    job: SchedJob
    cached: int
    how: str
    """"routed" (no worker gave it a higher priority), "stolen" (taken from another worker's share), "fifo", "random\""""
    priority: float | None = None


@dataclass
class _Running:
    started: float
    expected_s: float


class Scheduler:
    """The queue: `submit` jobs, then `pick(worker, now)` whenever a worker is free and `finished` when it is done."""

    def __init__(self, cfg: ScheduleConfig, holdings: Holdings, n_workers: int) -> None:
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        self.cfg = cfg
        self.holdings = holdings
        self.n_workers = n_workers
        self._queues: OrderedDict[Hashable, deque[SchedJob]] = OrderedDict()
        self._seq = 0
        self._size = 0
        self._running: dict[int, _Running] = {}
        self._rng = random.Random(cfg.seed)
        self.sec_per_pair = cfg.sec_per_pair
        self._durations: list[float] = []
        self.counts = {"routed": 0, "stolen": 0, "fifo": 0, "random": 0}

    # ------------------------------------------------------------------ queue
    def submit(self, job: SchedJob) -> None:
        if job.prompt_tokens < 1:
            raise ValueError(f"job {job.id!r}: prompt_tokens must be >= 1, got {job.prompt_tokens}")
        if job.value < 0:
            raise ValueError(f"job {job.id!r}: value must be >= 0, got {job.value}")
        job.seq = self._seq
        self._seq += 1
        self._queues.setdefault(job.key, deque()).append(job)
        self._size += 1

    def __len__(self) -> int:
        return self._size

    # ------------------------------------------------------------------ costs
    def b_eff_seconds(self, prompt_tokens: int, cached: int) -> float:
        """Attention recompute of a prompt given a cached prefix (capped at t - 1), in seconds."""
        return effective_bandwidth(prompt_tokens, min(cached, prompt_tokens - 1)) * self.sec_per_pair

    def wait_seconds(self, worker: int, now: float) -> float:
        """Seconds until `worker` can start a new job: the expected remainder of what it runs (0 when free)."""
        run = self._running.get(worker)
        return 0.0 if run is None else max(0.0, run.started + run.expected_s - now)

    def observe_cost(self, sec_per_pair: float) -> None:
        """A measured price of one attention pair (e.g. fitted on finished decisions)."""
        if sec_per_pair > 0:
            self.sec_per_pair = float(sec_per_pair)

    @property
    def expected_job_seconds(self) -> float:
        return sum(self._durations) / len(self._durations) if self._durations else self.cfg.job_seconds

    # ------------------------------------------------------------------ dispatch
    def pick(self, worker: int, now: float) -> Pick | None:
        """The job free `worker` runs next (removed from the queue), or None when the queue is empty."""
        if not self._size:
            return None
        if self.cfg.schedule == "fifo":
            key = min(self._queues, key=lambda k: self._queues[k][0].seq)
            pick = Pick(self._queues[key][0], self.holdings.cached(worker, key), "fifo")
        elif self.cfg.schedule == "random":
            n = self._rng.randrange(self._size)
            for key, q in self._queues.items():
                if n < len(q):
                    break
                n -= len(q)
            pick = Pick(q[n], self.holdings.cached(worker, key), "random")
        else:
            pick = self._pick_bandwidth(worker, now)
        self._remove(pick.job)
        self.counts[pick.how] += 1
        self._running[worker] = _Running(now, self.expected_job_seconds)
        return pick

    def _pick_bandwidth(self, worker: int, now: float) -> Pick:
        best: dict[str, tuple] = {}
        for key, q in self._queues.items():
            head = q[0]
            here = self.holdings.cached(worker, key)
            p_here = priority(head.value, self.b_eff_seconds(head.prompt_tokens, here), 0.0, self.cfg)
            routed = True
            for other, cached in self.holdings.deeper(key, here):
                if other == worker:
                    continue
                p = priority(head.value, self.b_eff_seconds(head.prompt_tokens, cached),
                             self.wait_seconds(other, now), self.cfg)
                if p > p_here:
                    routed = False
                    break
            how = "routed" if routed else "stolen"
            rank = (p_here, -head.seq)
            if how not in best or rank > best[how][0]:
                best[how] = (rank, head, here)
        how = "routed" if "routed" in best else "stolen"
        (p_here, _), job, here = best[how]
        return Pick(job, here, how, p_here)

    def _remove(self, job: SchedJob) -> None:
        q = self._queues[job.key]
        if q[0] is job:
            q.popleft()
        else:
            q.remove(job)
        if not q:
            del self._queues[job.key]
        self._size -= 1

    def finished(self, worker: int, now: float) -> float:
        """`worker` finished its job at `now`; returns the job's duration (which refines the wait estimate)."""
        run = self._running.pop(worker, None)
        if run is None:
            return 0.0
        took = max(0.0, now - run.started)
        self._durations.append(took)
        return took

    def forget(self, worker: int) -> None:
        """`worker` died: it runs nothing any more (its job goes back with `submit`)."""
        self._running.pop(worker, None)


class TokenTrie:
    """Token sequences held by one worker (its store's prefixes, tokens only): the longest match of a prompt.

    Example:
        >>> t = TokenTrie([[1, 2, 3], [1, 2, 9, 9]])
        >>> t.match([1, 2, 9, 5]), t.match([4]), len(t)
        (3, 0, 2)
    """

    def __init__(self, sequences: Iterable[Iterable[int]] = ()) -> None:
        self._root: dict = {}
        self._n = 0
        for s in sequences:
            self.insert(s)

    def insert(self, seq: Iterable[int]) -> None:
        node = self._root
        for t in seq:
            node = node.setdefault(int(t), {})
        self._n += 1

    def match(self, seq: Iterable[int]) -> int:
        node, n = self._root, 0
        for t in seq:
            node = node.get(int(t))
            if node is None:
                break
            n += 1
        return n

    def __len__(self) -> int:
        return self._n


@dataclass
class TrieHoldings:
    """`Holdings` over one `TokenTrie` per (worker, namespace), keys being (namespace, prompt token ids)."""

    n_workers: int
    tries: dict[tuple[int, str], TokenTrie] = field(default_factory=dict)

    def update(self, worker: int, digest: dict[str, list[list[int]]]) -> None:
        """Replace what `worker` holds by its store digest: namespace -> token sequences."""
        for k in [k for k in self.tries if k[0] == worker]:
            del self.tries[k]
        for ns, seqs in digest.items():
            self.tries[(worker, ns)] = TokenTrie(seqs)

    def drop(self, worker: int) -> None:
        self.update(worker, {})

    def cached(self, worker: int, key) -> int:
        ns, ids = key
        trie = self.tries.get((worker, ns))
        return trie.match(ids) if trie is not None else 0

    def deeper(self, key, than: int):
        for w in range(self.n_workers):
            c = self.cached(w, key)
            if c > than:
                yield w, c
