"""Profiling pruned prefill against the full model: measured speedup next to the analytic FLOPs ratio.

The protocol (docs/pruning.md): both arms run through the same `Session` under `torch.inference_mode()`, on the
same input ids (random ids from a fixed seed, so nothing repeats), with logits for the last position only; every
arm is warmed up (discarded) and then timed `repeats` times, interleaved arm by arm so that load on the machine
hits both alike; medians are reported with every sample and the fixed thread count. In end2end mode both arms
then greedily decode exactly `gen_tokens` tokens from the cache the prefill left (no stop token). FLOPs come
from `thrifty.cost.forward_flops` on the per-layer work each arm actually did, plus the scorers for the pruned
arm. Memory: the exact KV-cache bytes each arm leaves after prefill, and the resident-set high-water mark of one
run of each arm in a fresh process (`PeakRSS`; in-process it would mostly measure what the allocator kept from
earlier runs), weights included.

Models: a local Hugging Face directory, or "tiny-LxD" (e.g. "tiny-12x512"), a random-initialised Llama of L
layers and hidden size D (D/64 heads, half as many KV heads, MLP 2.75 D, vocab 4096). Pruned prefill uses the
pruner shipped for the model when there is one, otherwise a random-initialised scorer of the same shape, which
costs the same: timing does not depend on which tokens are kept, only on how many.
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from thrifty.backbones import HFDecoder, tiny_model
from thrifty.cost import PeakRSS, forward_flops, kv_bytes
from thrifty.runtime import Session
from thrifty.techniques import DecisionContext
from thrifty.techniques.pruning_common import default_prune_layers
from thrifty.techniques.token_pruning import PrunerMismatchError, TokenPruning, TokenScorer

MODES = ("prefill", "end2end")


def profile_backbone(model: str) -> HFDecoder:
    """"tiny-LxD" -> a random Llama of L layers and hidden D; anything else: a local model directory."""
    m = re.fullmatch(r"tiny-(\d+)x(\d+)", model)
    if m is None:
        return HFDecoder.load(model)
    layers, d = int(m.group(1)), int(m.group(2))
    if d % 64 or layers < 3:
        raise ValueError(f"{model!r}: the hidden size must be a multiple of 64 and the model at least 3 layers")
    heads = d // 64
    return HFDecoder.from_model(tiny_model(
        "llama", num_hidden_layers=layers, hidden_size=d, intermediate_size=int(round(2.75 * d / 64)) * 64,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=4096,
        max_position_embeddings=32768, initializer_range=0.02))


def _technique(backbone: HFDecoder, keep: float, schedule: str, layers, pruner: str | None) -> tuple[TokenPruning, str]:
    t = TokenPruning(keep_ratio=keep, schedule=schedule, layers=layers, pruner=pruner)
    if keep == 1.0:
        return t, "none (keep_ratio 1.0)"
    try:
        t.bind(backbone)
        return t, str(pruner or "shipped pruner")
    except PrunerMismatchError:
        if pruner is not None:
            raise
    prune_layers = tuple(layers) if layers else default_prune_layers(backbone.n_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        scorer = TokenScorer(backbone.shape.d_model, prune_layers, {"n_layers": backbone.n_layers})
    t = TokenPruning(keep_ratio=keep, schedule=schedule, layers=layers).use_scorer(scorer)
    t.bind(backbone)
    return t, "random-initialised scorer (timing only: cost does not depend on which tokens are kept)"


def _arm(backbone: HFDecoder, ids: torch.Tensor, technique: TokenPruning | None, gen_tokens: int):
    """One run of an arm -> (prefill seconds, decode seconds, prefill works, decode works)."""
    ctx = DecisionContext(ids, {}, seed=0)
    t0 = time.perf_counter()
    if technique is None:
        session = Session(backbone)
        pre = session.extend(ids, logits="last")
    else:
        session, new_from = technique.open_session(backbone, ctx)
        hook = technique.prefill_hook(ctx, backbone.n_layers, new_from)
        pre = session.extend(ids[new_from:], logits="last", layer_hook=hook)
    t1 = time.perf_counter()
    kv = kv_bytes(session.kv_tensors())
    dec = session.decode(gen_tokens, stop_ids=()) if gen_tokens else None
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, pre.works, (dec.works if dec else []), kv


def _fresh_peak(model: str, ids: list[int], keep: float | None, schedule: str, layers, pruner, gen: int,
                threads: int) -> tuple[int, int]:
    """(peak, start) resident bytes of one run of an arm in this (fresh) process; run in a spawned child."""
    torch.set_num_threads(threads)
    backbone = profile_backbone(model)
    tech = None if keep is None else _technique(backbone, keep, schedule, layers, pruner)[0]
    ids_t = torch.tensor(ids)
    with torch.inference_mode(), PeakRSS() as mem:
        _arm(backbone, ids_t, tech, gen)
    return mem.peak_bytes, mem.start_bytes


def _peak_in_child(*args) -> tuple[int, int]:
    """`_fresh_peak(*args)` in a new interpreter (a subprocess, not multiprocessing: no __main__ re-import)."""
    import subprocess
    import sys

    code = ("import json, sys; from thrifty.bench.profile import _fresh_peak; "
            "print(json.dumps(_fresh_peak(*json.loads(sys.stdin.read()))))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(list(args)), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the memory probe's subprocess failed:\n{out.stderr[-2000:]}")
    peak, start = json.loads(out.stdout.strip().splitlines()[-1])
    return int(peak), int(start)


def run_profile(model: str, mode: str = "prefill", lengths=(1024, 2048, 4096), keeps=(0.9, 0.8, 0.7),
                gen_tokens: int = 32, repeats: int = 3, out_json: str | Path | None = None,
                out_png: str | Path | None = None, warmup: int = 1, threads: int = 1, schedule: str = "compound",
                layers=None, pruner: str | None = None, seed: int = 0, fresh_memory: bool = True) -> dict[str, Any]:
    """Profile the full model against pruned prefill at each keep ratio and length; returns the results dict
    (also written to `out_json`, with a plot of speedup and FLOPs ratio against length at `out_png`).
    `fresh_memory`: measure each arm's peak resident memory in a fresh process (False: in this one)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    lengths = [int(x) for x in lengths]
    if not lengths or min(lengths) < 2:
        raise ValueError(f"lengths must be integers >= 2, got {lengths}")
    gen = int(gen_tokens) if mode == "end2end" else 0
    torch.set_num_threads(threads)
    backbone = profile_backbone(model)
    shape = backbone.shape
    limit = getattr(backbone.config, "max_position_embeddings", None)
    if limit and max(lengths) + gen > limit:
        raise ValueError(f"length {max(lengths)} + {gen} generated tokens exceeds the model's {limit} positions")
    arms = [(k, *_technique(backbone, float(k), schedule, layers, pruner)) for k in keeps]
    results: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(seed)
    total = len(lengths) * (1 + len(arms)) * (warmup + repeats + 1)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar, \
            torch.inference_mode():
        task = bar.add_task(f"profile {mode}", total=total)
        for length in lengths:
            ids = torch.randint(0, shape.vocab_size, (length,), generator=g)
            named = [("full", None)] + [(f"keep {k}", t) for k, t, _ in arms]
            times: dict[str, list[tuple[float, float]]] = {n: [] for n, _ in named}
            for r in range(warmup + repeats):  # interleaved: every arm once per round
                for name, tech in named:
                    bar.update(task, description=f"profile {mode} L={length} {name}")
                    pre_s, dec_s, _, _, _ = _arm(backbone, ids, tech, gen)
                    if r >= warmup:
                        times[name].append((pre_s, dec_s))
                    bar.advance(task)
            arm_stats = {}
            keep_of = {"full": None, **{f"keep {k}": float(k) for k, _, _ in arms}}
            for name, tech in named:
                _, _, works, dec_works, kv = _arm(backbone, ids, tech, gen)
                if fresh_memory:
                    peak, start = _peak_in_child(model, ids.tolist(), keep_of[name], schedule, layers, pruner, gen,
                                                 threads)
                else:
                    with PeakRSS() as mem:
                        _arm(backbone, ids, tech, gen)
                    peak, start = mem.peak_bytes, mem.start_bytes
                bar.advance(task)
                tokens = [w.queries for w in works]
                pre_flops = forward_flops(shape, works, 1) + _scorer_flops(tech, tokens)
                dec_flops = sum(forward_flops(shape, w, 1) for w in dec_works)
                pre_t = [t[0] for t in times[name]]
                tot_t = [t[0] + t[1] for t in times[name]]
                arm_stats[name] = {
                    "prefill_median_s": statistics.median(pre_t), "prefill_times_s": pre_t,
                    "decode_median_s": statistics.median([t[1] for t in times[name]]),
                    "total_median_s": statistics.median(tot_t),
                    "prefill_flops": pre_flops, "decode_flops": dec_flops,
                    "tokens_per_layer": tokens, "kv_per_layer_after_prefill": tokens, "kv_bytes_after_prefill": kv,
                    "peak_rss_bytes": peak, "delta_rss_bytes": max(0, peak - start),
                }
            full = arm_stats["full"]
            for k, tech, scorer_desc in arms:
                a = arm_stats[f"keep {k}"]
                key = "prefill" if mode == "prefill" else "total"
                speedup = full[f"{key}_median_s"] / a[f"{key}_median_s"]
                f_full = full["prefill_flops"] + full["decode_flops"]
                f_pruned = a["prefill_flops"] + a["decode_flops"]
                flops_ratio = f_full / f_pruned if mode == "end2end" else full["prefill_flops"] / a["prefill_flops"]
                row = {"length": length, "keep_ratio": k, "schedule": schedule,
                       "speedup": round(speedup, 4), "flops_ratio": round(flops_ratio, 4),
                       "efficiency": round(speedup / flops_ratio, 4),
                       "prefill_speedup": round(full["prefill_median_s"] / a["prefill_median_s"], 4),
                       "prefill_flops_ratio": round(full["prefill_flops"] / a["prefill_flops"], 4),
                       "full": full, "pruned": a}
                if mode == "end2end":
                    row["decode_speedup"] = round(full["decode_median_s"] / a["decode_median_s"], 4)
                    row["decode_flops_ratio"] = round(full["decode_flops"] / max(1, a["decode_flops"]), 4)
                results.append(row)
    out = {
        "model": model, "shape": shape.__dict__, "mode": mode, "gen_tokens": gen, "repeats": repeats,
        "warmup": warmup, "threads": torch.get_num_threads(), "schedule": schedule,
        "memory": "fresh process per arm" if fresh_memory else "in process (allocator reuse hides deltas)",
        "prune_layers": arms[0][1].report().get("prune_layers") if arms else None,
        "scorer": arms[0][2] if arms else None, "input": f"uniform random token ids, torch seed {seed}",
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "attention": getattr(backbone.config, "_attn_implementation", None),
        "speedup_definition": ("median full time / median pruned time (prefill in prefill mode, prefill + "
                               f"{gen} decoded tokens in end2end); flops_ratio = full FLOPs / pruned FLOPs; "
                               "efficiency = speedup / flops_ratio"),
        "results": results,
    }
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(out, indent=2) + "\n")
    if out_png:
        plot_profile(out, out_png)
    return out


def _scorer_flops(technique: TokenPruning | None, tokens_per_layer: list[int]) -> int:
    """Scorer FLOPs: each prune layer scores at most the tokens that reached it (an upper bound)."""
    if technique is None or technique.scorer is None:
        return 0
    layers = technique.report().get("prune_layers", [])
    return technique.scorer.flops_per_token() * sum(tokens_per_layer[l] for l in layers)


def plot_profile(profile: dict[str, Any], path: str | Path) -> Path:
    """Measured speedup (solid) and analytic FLOPs ratio (dashed) against context length, one colour per keep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    keeps = sorted({r["keep_ratio"] for r in profile["results"]}, reverse=True)
    for i, k in enumerate(keeps):
        rows = sorted((r for r in profile["results"] if r["keep_ratio"] == k), key=lambda r: r["length"])
        xs = [r["length"] for r in rows]
        c = f"C{i}"
        ax.plot(xs, [r["speedup"] for r in rows], "o-", color=c, label=f"keep {k}: measured")
        ax.plot(xs, [r["flops_ratio"] for r in rows], "s--", color=c, alpha=0.7, label=f"keep {k}: FLOPs ratio")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("full / pruned")
    ax.set_title(f"{profile['model']} {profile['mode']} ({profile['threads']} thread"
                 f"{'s' if profile['threads'] != 1 else ''}, {profile['schedule']} schedule)")
    top = max(max(r["speedup"], r["flops_ratio"]) for r in profile["results"])
    ax.set_ylim(0.9, top * 1.3)  # room for the legend above the curves
    ax.legend(fontsize=7, loc="upper left", ncol=min(3, len(keeps)))
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def print_profile(profile: dict[str, Any], console: Any = None) -> None:
    """A table of the profile: per length and keep ratio, medians, speedup, FLOPs ratio and efficiency."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"thrifty profile {profile['model']} {profile['mode']} ({profile['threads']} thread(s), "
                    f"{profile['repeats']} repeats, prune layers {profile['prune_layers']})")
    for col in ("length", "keep", "full s", "pruned s", "speedup", "FLOPs ratio", "efficiency", "work", "last layer"):
        t.add_column(col, justify="right")
    key = "prefill" if profile["mode"] == "prefill" else "total"
    for r in profile["results"]:
        tokens = r["pruned"]["tokens_per_layer"]
        t.add_row(str(r["length"]), f"{r['keep_ratio']:g}", f"{r['full'][f'{key}_median_s']:.3f}",
                  f"{r['pruned'][f'{key}_median_s']:.3f}", f"{r['speedup']:.2f}x", f"{r['flops_ratio']:.2f}x",
                  f"{r['efficiency']:.2f}", f"{sum(tokens) / (len(tokens) * r['length']):.3f}", str(tokens[-1]))
    console.print(t)
