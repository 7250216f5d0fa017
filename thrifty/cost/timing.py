"""Timers with an honest protocol: fixed thread count, warm-up discarded, medians over repeats."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


class Stopwatch:
    """`with Stopwatch() as sw: ...; sw.seconds` (perf_counter, one call)."""

    def __enter__(self) -> "Stopwatch":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0


def time_median(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> dict:
    """Run `fn` `warmup` times (discarded) then `repeats` times; return median, all times and threads."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times, "threads": torch.get_num_threads()}
