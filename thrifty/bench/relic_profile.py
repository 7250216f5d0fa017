"""`thrifty profile-relic`: the ReLIC policy's acting throughput and KV-cache size at long contexts.

ReLIC reports 732 actions/s at batch 20 and 8k steps of context on an A40, with a 672 MB KV cache (fp16,
its 4-layer 256-wide model). Here: the policy reads `context` steps of history (random observations, actions and
rewards in darkroom's ranges, episodes of its horizon; the cost of a step does not depend on the values) in chunks
through its `TrialCache`, then `repeats` acting steps of the whole batch are timed (one token per environment,
warm-up discarded, median kept): actions/s = batch / median step time. `long_trial` acts one trial step by step
(batch 1) to 64k steps and records the time, the cache's bytes and the process's peak resident memory.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch


def _random_steps(policy, batch: int, steps: int, horizon: int, offset: int, generator: torch.Generator):
    """Inputs for `steps` steps starting at trial step `offset` -> (obs, prev_action, prev_reward, episode_start)."""
    c = policy.config
    low, span = policy.obs_low, policy.obs_span
    obs = low + torch.rand(batch, steps, c.obs_dim, generator=generator) * span
    prev_action = torch.randint(0, c.n_actions, (batch, steps), generator=generator)
    prev_reward = (torch.rand(batch, steps, generator=generator) < 0.1).float()
    t = torch.arange(offset, offset + steps)
    start = (t % horizon == 0).expand(batch, -1).clone()
    return obs.round(), prev_action, prev_reward, start


@torch.inference_mode()
def acting_throughput(policy, batch: int = 20, context: int = 8192, repeats: int = 50, warmup: int = 5,
                      horizon: int = 100, chunk: int = 256, seed: int = 0) -> dict:
    """Actions per second of `batch` environments acting at `context` steps of history -> a row."""
    policy.eval()
    g = torch.Generator().manual_seed(seed)
    state = policy.start(batch)
    t0 = time.perf_counter()
    for offset in range(0, context, chunk):
        policy.step(state, *_random_steps(policy, batch, min(chunk, context - offset), horizon, offset, g))
    prefill = time.perf_counter() - t0
    kv = state.cache.nbytes()
    times = []
    for r in range(warmup + repeats):
        x = _random_steps(policy, batch, 1, horizon, context + r, g)
        t0 = time.perf_counter()
        policy.step(state, *x)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[warmup:])
    return {"batch": batch, "context_steps": context, "step_median_s": step, "actions_per_s": batch / step,
            "kv_bytes": kv, "kv_dtype": str(state.cache.keys[0].buf.dtype),
            "prefill_s": prefill, "threads": torch.get_num_threads(), "repeats": repeats}


@torch.inference_mode()
def long_trial(policy, steps: int = 65536, horizon: int = 100, seed: int = 0, progress=None) -> dict:
    """Act one trial of `steps` steps one step at a time (batch 1) -> time, steps/s, KV bytes, peak RSS."""
    policy.eval()
    g = torch.Generator().manual_seed(seed)
    state = policy.start(1)
    t0 = time.perf_counter()
    block = 1024
    for offset in range(0, steps, block):
        x = _random_steps(policy, 1, min(block, steps - offset), horizon, offset, g)
        for i in range(x[0].shape[1]):
            policy.step(state, *[v[:, i:i + 1] for v in x])
        if progress:
            progress(x[0].shape[1])
    wall = time.perf_counter() - t0
    return {"steps": steps, "wall_s": wall, "steps_per_s": steps / wall, "kv_bytes": state.cache.nbytes(),
            "kv_reserved_bytes": state.cache.reserved_bytes(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "threads": torch.get_num_threads()}
