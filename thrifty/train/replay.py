"""Surprise-prioritized hot/cold replay (EchoRL, issue 19, part 2), in thrifty's own code.

EchoRL scores an experience by how far its latent plan is from the running (EMA) plan, plus a reward term, and
keeps recent experiences in a hot tier sampled at a fixed share of every batch. Its code updated the mean before
scoring, evicted the *most* surprising experience and never normalised the importance weights
(../shared/research/seed-erecap-echorl.md, B3; the corrected formulas in B8). Here:

- **Score**, before the mean moves: s = w_s ||z - z_ema||^2 + w_r |r|, then z_ema <- d z_ema + (1 - d) z. The
  first experience is scored against a zero mean.
- **Tiers by age**: age = learner updates (`tick()`) since the experience was added; hot while age <= age_hot,
  then cold (no way back), dropped past `max_age` (None: never).
- **Sampling**: within a tier, P(i) proportional to exp(s_i / T) (a softmax), with replacement; a batch of B takes
  round(B h) from the hot tier and the rest from the cold one (all from one tier when the other is empty). The
  probability of an item is its tier's share times its share in the tier; importance weights
  w_i = (N P(i))^-beta divided by the batch's largest, so they are at most 1; beta is annealed linearly to 1 over
  `beta_steps` ticks.
- **Eviction** when full: the lowest score among the stored items and the new one (`evict="priority"`: a new
  item below all of them is not stored), or the oldest (`"oldest"`).
- Every add, move, evict and draw is O(log N): a sum tree per tier over the softmax weights and a min tree over
  the scores (`SumTree`, `MinTree`, arrays of 2N).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

EVICTION = ("priority", "oldest")
EXP_CAP = 60.0
"""s / T is capped here before exp (float64 overflows near 709); scores this far apart are all sampled ~greedily"""


class SumTree:
    """Values v[0..n-1] >= 0 with O(log n) set, total and prefix search."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.size = 1 << max(0, (n - 1).bit_length())
        self.t = np.zeros(2 * self.size)

    def __setitem__(self, i: int, v: float) -> None:
        if v < 0 or not math.isfinite(v):
            raise ValueError(f"sum-tree values must be finite and >= 0, got {v}")
        j = i + self.size
        self.t[j] = v
        j //= 2
        while j:
            self.t[j] = self.t[2 * j] + self.t[2 * j + 1]
            j //= 2

    def __getitem__(self, i: int) -> float:
        return float(self.t[i + self.size])

    @property
    def total(self) -> float:
        return float(self.t[1])

    def find(self, u: float) -> int:
        """The index i with prefix(i) <= u < prefix(i + 1) (prefix(i) = v[0] + ... + v[i-1]), for 0 <= u < total;
        skips zero entries."""
        j = 1
        while j < self.size:
            left = self.t[2 * j]
            if u < left or self.t[2 * j + 1] <= 0.0:  # (the second: rounding at the very end of the range)
                j = 2 * j
            else:
                u -= left
                j = 2 * j + 1
        i = j - self.size
        return min(i, self.n - 1)


class MinTree:
    """Values over n slots (inf = empty) with O(log n) set and arg-min."""

    def __init__(self, n: int) -> None:
        self.size = 1 << max(0, (n - 1).bit_length())
        self.t = np.full(2 * self.size, np.inf)

    def __setitem__(self, i: int, v: float) -> None:
        j = i + self.size
        self.t[j] = v
        j //= 2
        while j:
            self.t[j] = min(self.t[2 * j], self.t[2 * j + 1])
            j //= 2

    def argmin(self) -> int:
        j = 1
        while j < self.size:
            j = 2 * j if self.t[2 * j] <= self.t[2 * j + 1] else 2 * j + 1
        return j - self.size


@dataclass(frozen=True)
class ReplayConfig:
    capacity: int = 256
    hot_fraction: float = 0.7
    age_hot: int = 4
    """learner updates an experience stays hot"""
    max_age: int | None = None
    temperature: float = 1.0
    surprise_weight: float = 1.0
    reward_weight: float = 1.0
    ema_decay: float = 0.99
    beta0: float = 0.4
    beta_steps: int = 100
    evict: str = "priority"
    prioritized: bool = True
    """False: the uniform-replay ablation (every stored item equally likely, tiers ignored, weights 1); the scores
    still decide eviction"""

    def __post_init__(self) -> None:
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise ValueError(f"replay capacity must be an integer >= 1, got {self.capacity!r}")
        if not 0.0 <= self.hot_fraction <= 1.0:
            raise ValueError(f"hot_fraction must be in [0, 1] (the hot tier's share of every batch), got "
                             f"{self.hot_fraction}")
        if self.age_hot < 0 or (self.max_age is not None and self.max_age < self.age_hot):
            raise ValueError(f"need age_hot >= 0 and max_age >= age_hot, got {self.age_hot}, {self.max_age}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0.0 <= self.beta0 <= 1.0 or self.beta_steps < 1:
            raise ValueError(f"need 0 <= beta0 <= 1 and beta_steps >= 1, got {self.beta0}, {self.beta_steps}")
        if self.evict not in EVICTION:
            raise ValueError(f"evict must be one of {EVICTION}, got {self.evict!r}")


@dataclass
class Sample:
    items: list[Any]
    slots: np.ndarray
    probs: np.ndarray
    """P(i) of each draw (tier share x share in the tier)"""
    weights: np.ndarray
    """importance weights (N P)^-beta / max, in (0, 1]"""
    hot: np.ndarray
    """bool per draw: drawn from the hot tier"""


class SurpriseReplay:
    """The replay buffer: `add(item, plan, reward)`, `sample(batch, rng)`, `tick()` once per learner update."""

    def __init__(self, cfg: ReplayConfig | None = None) -> None:
        self.cfg = cfg = cfg or ReplayConfig()
        n = cfg.capacity
        self.items: list[Any] = [None] * n
        self.score = np.full(n, np.nan)
        self.born = np.zeros(n, dtype=np.int64)  # tick at which the slot's item was added
        self.serial = np.zeros(n, dtype=np.int64)  # insertion order (for "oldest")
        self.is_hot = np.zeros(n, dtype=bool)
        self.trees = {True: SumTree(n), False: SumTree(n)}
        self.by_score, self.by_age = MinTree(n), MinTree(n)
        self.free = list(range(n - 1, -1, -1))
        self.hot_queue: deque[tuple[int, int, int]] = deque()  # (born, serial, slot) of items added as hot
        self.ema: np.ndarray | None = None
        self.ticks = 0
        self._serial = 0

    # ------------------------------------------------------------------ scores
    def surprise(self, plan: np.ndarray, reward: float) -> float:
        """w_s ||z - z_ema||^2 + w_r |r| against the current mean (which `add` updates only afterwards)."""
        z = np.asarray(plan, np.float64).reshape(-1)
        mean = np.zeros_like(z) if self.ema is None else self.ema
        if mean.shape != z.shape:
            raise ValueError(f"plan of size {z.size}, but earlier plans had size {mean.size}")
        return float(self.cfg.surprise_weight * np.sum((z - mean) ** 2) + self.cfg.reward_weight * abs(reward))

    def _weight(self, s: float) -> float:
        return math.exp(min(s / self.cfg.temperature, EXP_CAP)) if self.cfg.prioritized else 1.0

    def __len__(self) -> int:
        return self.cfg.capacity - len(self.free)

    @property
    def beta(self) -> float:
        c = self.cfg
        return min(1.0, c.beta0 + (1.0 - c.beta0) * self.ticks / c.beta_steps)

    def hot_count(self) -> int:
        return int(self.is_hot.sum())

    # ------------------------------------------------------------------ changes
    def add(self, item: Any, plan: np.ndarray, reward: float) -> int:
        """Score the item against the running plan mean, then update the mean; store it hot. Returns its slot, or
        -1 when the buffer is full and evicting by priority and the new item scores below every stored one."""
        s = self.surprise(plan, reward)
        z = np.asarray(plan, np.float64).reshape(-1)
        d = self.cfg.ema_decay
        self.ema = z.copy() if self.ema is None else d * self.ema + (1 - d) * z
        if not self.free:
            if self.cfg.evict == "priority":
                lowest = self.by_score.argmin()
                if s < self.score[lowest]:
                    return -1  # the new item is the lowest of all: it is the one not kept
                self._remove(lowest)
            else:
                self._remove(self.by_age.argmin())
        slot = self.free.pop()
        self.items[slot], self.score[slot], self.born[slot] = item, s, self.ticks
        self.serial[slot], self._serial = self._serial, self._serial + 1
        self.by_score[slot], self.by_age[slot] = s, float(self.serial[slot])
        self._place(slot, hot=True)
        self.hot_queue.append((self.ticks, int(self.serial[slot]), slot))
        return slot

    def update_score(self, slot: int, score: float) -> None:
        """Re-score a stored item (e.g. after a learner pass); its tier is unchanged."""
        if self.items[slot] is None:
            raise KeyError(f"slot {slot} is empty")
        self.score[slot] = score
        self.by_score[slot] = score
        self.trees[bool(self.is_hot[slot])][slot] = self._weight(score)

    def tick(self) -> None:
        """One learner update: ages advance, items past age_hot go cold, past max_age are dropped."""
        self.ticks += 1
        while self.hot_queue and self.ticks - self.hot_queue[0][0] > self.cfg.age_hot:
            _, serial, slot = self.hot_queue.popleft()
            if self.items[slot] is not None and self.serial[slot] == serial and self.is_hot[slot]:
                self.trees[True][slot] = 0.0
                self._place(slot, hot=False)
        if self.cfg.max_age is not None:
            while len(self) and (self.ticks - self.born[self.by_age.argmin()]) > self.cfg.max_age:
                self._remove(self.by_age.argmin())

    def _place(self, slot: int, hot: bool) -> None:
        self.is_hot[slot] = hot
        self.trees[hot][slot] = self._weight(float(self.score[slot]))
        self.trees[not hot][slot] = 0.0

    def _remove(self, slot: int) -> None:
        self.trees[True][slot] = 0.0
        self.trees[False][slot] = 0.0
        self.by_score[slot] = np.inf
        self.by_age[slot] = np.inf
        self.items[slot], self.score[slot], self.is_hot[slot] = None, np.nan, False
        self.free.append(slot)

    # ------------------------------------------------------------------ sampling
    def tier_shares(self) -> dict[bool, float]:
        """Each tier's share of a batch (all to one tier when the other is empty)."""
        hot_n, cold_n = self.hot_count(), len(self) - self.hot_count()
        if not self.cfg.prioritized and len(self):  # uniform: each tier in proportion to what it holds
            return {True: hot_n / len(self), False: cold_n / len(self)}
        if hot_n == 0:
            return {True: 0.0, False: 1.0}
        if cold_n == 0:
            return {True: 1.0, False: 0.0}
        return {True: self.cfg.hot_fraction, False: 1.0 - self.cfg.hot_fraction}

    def probability(self, slot: int) -> float:
        """P(slot) of one draw: its tier's share x its softmax share within the tier."""
        hot = bool(self.is_hot[slot])
        tree = self.trees[hot]
        return self.tier_shares()[hot] * tree[slot] / tree.total

    def sample(self, batch: int, rng: np.random.Generator) -> Sample:
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        shares = self.tier_shares()
        if self.cfg.prioritized:
            n_hot = int(round(batch * shares[True]))
        else:  # uniform: how many fall in the hot tier is itself random
            n_hot = int(rng.binomial(batch, shares[True]))
        slots, hot = [], []
        for tier, k in ((True, n_hot), (False, batch - n_hot)):
            tree = self.trees[tier]
            for u in rng.random(k):
                slots.append(tree.find(u * tree.total))
                hot.append(tier)
        slots_a = np.asarray(slots, dtype=np.int64)
        probs = np.asarray([self.probability(int(s)) for s in slots_a])
        w = (len(self) * probs) ** (-self.beta)
        return Sample([self.items[s] for s in slots_a], slots_a, probs, w / w.max(), np.asarray(hot))
