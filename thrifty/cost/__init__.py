"""Cost accounting: analytic FLOPs from shapes, honest timers, memory probes, the per-decision `CostRecord`.

The metric names are fixed here and defined once in docs/metrics.md.
"""

from thrifty.cost.flops import ModelShape, LayerWork, forward_flops, layer_flops, head_flops
from thrifty.cost.memory import kv_bytes, PeakRSS
from thrifty.cost.record import CostRecord, METRICS
from thrifty.cost.timing import Stopwatch, time_median
from thrifty.cost.bandwidth import (BANDWIDTH_METRICS, PrefixHitCounter, attention_flops_per_pair, bandwidth,
                                    bandwidth_efficiency, effective_bandwidth, episode_bandwidth)

__all__ = [
    "ModelShape", "LayerWork", "forward_flops", "layer_flops", "head_flops",
    "kv_bytes", "PeakRSS", "CostRecord", "METRICS", "Stopwatch", "time_median",
    "BANDWIDTH_METRICS", "PrefixHitCounter", "attention_flops_per_pair", "bandwidth", "bandwidth_efficiency",
    "effective_bandwidth", "episode_bandwidth",
]
