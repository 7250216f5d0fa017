"""EchoRL's attention-bandwidth cost model, and the prefix hit rate in serving engines' units.

EchoRL (NoakLiu/Echo-RL, `echo_rl/kernels`) prices a model call over a sequence of t tokens by its causal
attention "bandwidth", the number of (query, key) pairs:

    b(t) = t (t + 1) / 2                        (times a per-pair cost; EchoRL uses scale 1)
    b_eff(t, t') = b(t) - b(t')                 with t' in [0, t] the length of a prefix served from cache
    eta_bw = return / (sum over calls of b_eff + learner cost)

Here the scale is the model's own attention cost per pair, `attention_flops_per_pair(shape)` = 4 * heads *
head_dim * layers FLOPs (QK^T and softmax(.)V, as in `thrifty.cost.flops`), so b is in FLOPs and eta_bw in
return per attention GFLOP. Unlike EchoRL, t' is measured (the tokens a real cache actually served), not assumed.

What the model leaves out, on purpose (it is EchoRL's): projections and MLP (linear in new tokens), decoding, and
token pruning, which removes pairs it does not see. `CostRecord.flops` counts all of those exactly; compare both.

Prefix hit rate, as vLLM (`prefix_cache_hits / prefix_cache_queries`, both in tokens) and SGLang
(cached prompt tokens / prompt tokens) report it: tokens of the prompt whose KV came from a cache, over prompt tokens.
At most (t - 1) / t per call here as in vLLM: the last prompt token is always recomputed to get its logits.

Example:
    >>> bandwidth(4), effective_bandwidth(4, 3)
    (10.0, 4.0)
    >>> c = PrefixHitCounter(); c.add(10, 0); c.add(30, 25); round(c.hit_rate, 3)
    0.625
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from thrifty.cost.flops import ModelShape

BANDWIDTH_METRICS: dict[str, str] = {
    "prefix_hit_rate": "prompt tokens served from a cache / prompt tokens, summed over decisions (vLLM/SGLang units)",
    "prompt_tokens_total": "prompt (context) tokens over all decisions: the hit rate's denominator",
    "cached_tokens_total": "prompt tokens served from a cache over all decisions: the hit rate's numerator",
    "bw_full": "EchoRL attention bandwidth without reuse, sum of b(t) over decisions, in attention FLOPs",
    "bw_eff": "EchoRL effective bandwidth, sum of b(t) - b(t') over decisions (t' = tokens reused), attention FLOPs",
    "eta_bw": "EchoRL bandwidth efficiency: return / (bw_eff + learner cost), in return per attention GFLOP",
}
"""Metric name -> definition (the per-episode bandwidth fields; docs/prefix_reuse.md and docs/metrics.md)."""


def attention_flops_per_pair(shape: ModelShape) -> int:
    """FLOPs one (query, key) pair costs over all layers: 2 * heads * head_dim for QK^T, as much for the values."""
    return 4 * shape.n_heads * shape.head_dim * shape.n_layers


def bandwidth(t: int, scale: float = 1.0) -> float:
    """b(t) = scale * t (t + 1) / 2: causal (query, key) pairs of a t-token call; 0 for t <= 0."""
    return scale * t * (t + 1) / 2 if t > 0 else 0.0


def effective_bandwidth(t: int, reused: int = 0, scale: float = 1.0) -> float:
    """b_eff = b(t) - b(t'), t' = `reused` clipped to [0, t]: the pairs left to compute given a cached prefix."""
    reused = min(max(reused, 0), max(t, 0))
    return bandwidth(t, scale) - bandwidth(reused, scale)


def bandwidth_efficiency(total_return: float, rollout_cost: float, learner_cost: float = 0.0) -> float:
    """eta_bw = return / (rollout cost + learner cost). Costs must be >= 0 and not both 0."""
    if rollout_cost < 0 or learner_cost < 0:
        raise ValueError(f"costs must be >= 0, got rollout {rollout_cost}, learner {learner_cost}")
    if rollout_cost + learner_cost == 0:
        raise ValueError("eta_bw is undefined when nothing was spent (rollout and learner costs are both 0)")
    return total_return / (rollout_cost + learner_cost)


@dataclass
class PrefixHitCounter:
    """Token counters like vLLM's: `queries` = prompt tokens, `hits` = those served from a cache."""

    queries: int = 0
    hits: int = 0

    def add(self, prompt_tokens: int, cached_tokens: int) -> None:
        if not 0 <= cached_tokens <= prompt_tokens:
            raise ValueError(f"cached tokens {cached_tokens} must be in [0, prompt tokens {prompt_tokens}]")
        self.queries += prompt_tokens
        self.hits += cached_tokens

    @property
    def hit_rate(self) -> float:
        """hits / queries (0.0 before any query)."""
        return self.hits / self.queries if self.queries else 0.0


def episode_bandwidth(records: Iterable, shape: ModelShape, total_return: float,
                      learner_cost: float = 0.0) -> dict[str, float]:
    """The `BANDWIDTH_METRICS` of one episode from its decisions' `CostRecord`s (tokens_context = t,
    prefix_tokens_reused = t'). `learner_cost` in attention FLOPs (0 for evaluation: no learner runs)."""
    scale = attention_flops_per_pair(shape)
    counter = PrefixHitCounter()
    full = eff = 0.0
    for r in records:
        counter.add(r.tokens_context, r.prefix_tokens_reused)
        full += bandwidth(r.tokens_context, scale)
        eff += effective_bandwidth(r.tokens_context, r.prefix_tokens_reused, scale)
    spent = eff + learner_cost
    return {
        "prefix_hit_rate": counter.hit_rate,
        "prompt_tokens_total": counter.queries,
        "cached_tokens_total": counter.hits,
        "bw_full": full,
        "bw_eff": eff,
        "eta_bw": bandwidth_efficiency(total_return, spent / 1e9) if spent > 0 else 0.0,
    }
