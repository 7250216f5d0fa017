"""`thrifty profile-action-models`: per-step latency and memory of LRAM's action models against context length.

For each architecture and context length L (environment steps already seen), the model first reads L steps of
history (random states and rewards: the cost of a step does not depend on the values), then `repeats` further
steps are timed (the first `warmup` discarded, the median kept), each followed by `spacing` untimed steps: on this
shared 2-core machine, slow spells of some tens of milliseconds come and go (measured: one 25-step block in six or
seven runs up to 2x slower, at any context), and spacing the timed steps keeps one spell from moving the median. Recurrent models read the history step by step
(their state is all they keep); the transformer reads it in chunks through its KV cache (the whole history, or
the last `window` steps). An arm stops growing L once a step exceeds `time_limit_s` or its state/KV exceeds
`memory_limit_mb`, and the table says so. Batch size B emulates LRAM's batched inference (B rows stepped at once).
An arm `xlstm-compiled` / `mamba-compiled` steps through torch.compile (`compile_step()`); its compilation happens
in the warm-up steps, whose time is in `warmup_s`.
Rows: arch, batch, context_steps (where the timed steps start), latency_median_s, flops_per_step (analytic,
backbone matmuls + attention, at context_steps), state_bytes (recurrent state or KV cache at context_steps),
prefill_s (time to read the history), warmup_s, stopped (a reason, or None), pass.
Several passes (`--passes`) measure every arm again from a fresh state, the arms interleaved, so a slow spell of
the machine lands on one pass of one arm; `combine_passes` keeps the median per context over the passes and the
spread (min, max) beside it. The flatness of a curve is read off those medians.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from thrifty.agents.action_model import TOKENS_PER_STEP, ActionModel
from thrifty.backbones.recurrent import state_bytes


@dataclass
class ProfileLimits:
    time_limit_s: float = 0.5
    """an arm stops at the first context whose median step takes longer than this"""
    memory_limit_mb: float = 2048.0
    """... or whose state/KV cache is larger than this"""
    prefill_limit_s: float = 300.0
    """... or whose history took longer than this to read"""


class _Stepper:
    """Feeds tokens (B, n, d) to a model after what it has seen; keeps the state or KV cache."""

    def __init__(self, model: ActionModel, window: int | None) -> None:
        self.m, self.window, self.state, self.pos = model, window, None, 0
        if model.cfg.arch == "dt":
            from transformers import DynamicCache

            self.state = DynamicCache()

    def feed(self, x: torch.Tensor, chunk: int = 1) -> torch.Tensor:
        m = self.m
        if m.cfg.arch != "dt":
            for i in range(x.shape[1]):
                y, self.state = m.backbone.step(x[:, i:i + 1], self.state)
            return y
        for start in range(0, x.shape[1], chunk):
            part = x[:, start:start + chunk]
            pos = torch.arange(self.pos, self.pos + part.shape[1]).expand(x.shape[0], -1)
            self.pos += part.shape[1]
            out = m.backbone(inputs_embeds=part, position_ids=pos, use_cache=True, **{m._cache_arg: self.state})
            self.state = getattr(out, "cache", None) or out.past_key_values
            if self.window:
                keep = TOKENS_PER_STEP * self.window
                for layer in self.state.layers:
                    if layer.keys.shape[-2] > keep:
                        layer.keys, layer.values = layer.keys[..., -keep:, :], layer.values[..., -keep:, :]
        return out.last_hidden_state

    def kv_tokens(self) -> int:
        if self.m.cfg.arch != "dt":
            return 0
        return int(self.state.layers[0].keys.shape[-2]) if self.state.layers else 0


@torch.inference_mode()
def profile_arm(model: ActionModel, contexts: list[int], batch: int = 1, window: int | None = None,
                repeats: int = 25, warmup: int = 5, limits: ProfileLimits | None = None, progress=None,
                label: str | None = None, spacing: int = 9, min_warmup_s: float = 3.0,
                pass_index: int = 0) -> list[dict]:
    """Rows for one architecture and batch size over increasing context lengths (in environment steps).

    Before the first context, steps on a throwaway state warm the process up (first calls, allocator; at least 30
    steps and `min_warmup_s` seconds: eager xLSTM steps measured 2x slower over the first seconds of an arm), so
    the shortest context is not charged for them."""
    limits = limits or ProfileLimits()
    d = model.cfg.d_model
    spare = _Stepper(model, window)
    t0, n = time.perf_counter(), 0
    while warmup and (n < 30 or time.perf_counter() - t0 < min_warmup_s):
        spare.feed(torch.zeros(batch, TOKENS_PER_STEP, d), chunk=TOKENS_PER_STEP)
        n += 1
    warmup_s = time.perf_counter() - t0
    stepper, seen, rows = _Stepper(model, window), 0, []
    g = torch.Generator().manual_seed(0)
    for L in sorted(contexts):
        t0, todo = time.perf_counter(), max(0, L - seen)
        while (todo > 0 and time.perf_counter() - t0 <= limits.prefill_limit_s  # read the history in pieces
               and state_bytes(stepper.state) / 2**20 <= limits.memory_limit_mb):
            piece = min(todo, 1024)
            stepper.feed(torch.randn(batch, TOKENS_PER_STEP * piece, d, generator=g), chunk=1024)
            todo, seen = todo - piece, seen + piece
        prefill = time.perf_counter() - t0
        if todo > 0:
            rows.append({"arch": label or model.cfg.arch + (f"-window{window}" if window else ""), "batch": batch,
                         "context_steps": L, "latency_median_s": None, "flops_per_step": None,
                         "state_bytes": state_bytes(stepper.state), "prefill_s": prefill, "warmup_s": warmup_s,
                         "stopped": f"history of {L} steps not read within {limits.prefill_limit_s:.0f} s and "
                                    f"{limits.memory_limit_mb:.0f} MB (reached {seen})",
                         "threads": torch.get_num_threads(), "pass": pass_index})
            if progress:
                progress(rows[-1])
            break
        seen = max(L, seen)  # the context the timed steps start from (>= L when contexts are close together)
        nbytes, kv_start = state_bytes(stepper.state), stepper.kv_tokens()  # at that context
        times = []
        for r in range(warmup + repeats):
            x = torch.randn(batch, TOKENS_PER_STEP, d, generator=g)
            t0 = time.perf_counter()
            stepper.feed(x, chunk=TOKENS_PER_STEP)
            times.append(time.perf_counter() - t0)
            for _ in range(spacing if r >= warmup else 0):
                stepper.feed(torch.randn(batch, TOKENS_PER_STEP, d, generator=g), chunk=TOKENS_PER_STEP)
        latency = statistics.median(times[warmup:])
        flops = batch * sum(model.flops_per_token(kv_start + i + 1) for i in range(TOKENS_PER_STEP))
        stopped = None
        if latency > limits.time_limit_s:
            stopped = f"step {latency:.2f} s > {limits.time_limit_s} s"
        elif nbytes / 2**20 > limits.memory_limit_mb:
            stopped = f"state {nbytes / 2**20:.0f} MB > {limits.memory_limit_mb:.0f} MB"
        elif prefill > limits.prefill_limit_s:
            stopped = f"history read in {prefill:.0f} s > {limits.prefill_limit_s:.0f} s"
        rows.append({"arch": label or model.cfg.arch + (f"-window{window}" if window else ""), "batch": batch,
                     "context_steps": seen, "latency_median_s": latency, "flops_per_step": flops,
                     "state_bytes": nbytes, "prefill_s": prefill, "warmup_s": warmup_s, "stopped": stopped,
                     "spacing": spacing, "threads": torch.get_num_threads(), "pass": pass_index})
        if progress:
            progress(rows[-1])
        if stopped:
            break
        seen += warmup + repeats * (1 + spacing)  # the context the next length starts from
    return rows


@dataclass
class Arm:
    """One arm of an interleaved profile: a label, its model, and for the transformer an optional window."""

    label: str
    model: ActionModel
    window: int | None = None


@torch.inference_mode()
def profile_interleaved(arms: list[Arm], contexts: list[int], batch: int = 1, repeats: int = 25, warmup: int = 5,
                        limits: ProfileLimits | None = None, progress=None, min_warmup_s: float = 3.0,
                        pass_index: int = 0) -> list[dict]:
    """Rows of several arms with every (arm, context) timed in turn: each arm reads its history once up to its
    longest context, a copy of its state (recurrent state, or KV cache) kept at each context; then round after
    round, one timed step at every (arm, context), in a new random order each round. A slow spell of the machine, or a
    drift over the minutes a pass lasts, lands on every arm and context alike, so the ratios between contexts
    (flatness) and between arms (the transformer against xLSTM) compare steps measured over the same seconds.
    An arm stops growing its contexts at the prefill or memory limit (a row says so); the time limit applies to
    the medians. Rows as `profile_arm`'s, with `interleaved: True`."""
    import copy

    limits = limits or ProfileLimits()
    g = torch.Generator().manual_seed(0)
    kept: list[tuple] = []  # (arm, context, stepper at that context, prefill s, its state bytes, KV tokens)
    rows: list[dict] = []
    warm: dict[str, float] = {}
    for arm in arms:
        d = arm.model.cfg.d_model
        spare, t0, n = _Stepper(arm.model, arm.window), time.perf_counter(), 0
        while warmup and (n < 30 or time.perf_counter() - t0 < min_warmup_s):
            spare.feed(torch.zeros(batch, TOKENS_PER_STEP, d), chunk=TOKENS_PER_STEP)
            n += 1
        warm[arm.label] = time.perf_counter() - t0
        stepper, seen = _Stepper(arm.model, arm.window), 0
        for L in sorted(contexts):
            t0 = time.perf_counter()
            while (seen < L and time.perf_counter() - t0 <= limits.prefill_limit_s
                   and state_bytes(stepper.state) / 2**20 <= limits.memory_limit_mb):
                piece = min(L - seen, 1024)
                stepper.feed(torch.randn(batch, TOKENS_PER_STEP * piece, d, generator=g), chunk=1024)
                seen += piece
            if seen < L:
                rows.append({"arch": arm.label, "batch": batch, "context_steps": L, "latency_median_s": None,
                             "flops_per_step": None, "state_bytes": state_bytes(stepper.state),
                             "prefill_s": time.perf_counter() - t0, "warmup_s": warm[arm.label],
                             "stopped": f"history of {L} steps not read within {limits.prefill_limit_s:.0f} s and "
                                        f"{limits.memory_limit_mb:.0f} MB (reached {seen})",
                             "interleaved": True, "threads": torch.get_num_threads(), "pass": pass_index})
                break
            kept.append((arm, L, copy.deepcopy(stepper), time.perf_counter() - t0, state_bytes(stepper.state),
                         stepper.kv_tokens()))
            if state_bytes(stepper.state) / 2**20 > limits.memory_limit_mb:
                break
        del stepper
    times: list[list[float]] = [[] for _ in kept]
    shuffle = torch.Generator().manual_seed(1)
    for r in range(warmup + repeats):
        # a new random order each round: a fixed rotation would always put the same (arm, context) right after
        # another arm's step, with that model's weights out of the caches (measured: the first context of every
        # arm 10-80% slower under a rotation)
        for i in torch.randperm(len(kept), generator=shuffle).tolist():
            arm, stepper = kept[i][0], kept[i][2]
            x = torch.randn(batch, TOKENS_PER_STEP, arm.model.cfg.d_model, generator=g)
            t0 = time.perf_counter()
            stepper.feed(x, chunk=TOKENS_PER_STEP)
            times[i].append(time.perf_counter() - t0)
    for (arm, L, _, prefill, nbytes, kv_start), t in zip(kept, times):
        latency = statistics.median(t[warmup:])
        stopped = None
        if latency > limits.time_limit_s:
            stopped = f"step {latency:.2f} s > {limits.time_limit_s} s"
        elif nbytes / 2**20 > limits.memory_limit_mb:
            stopped = f"state {nbytes / 2**20:.0f} MB > {limits.memory_limit_mb:.0f} MB"
        rows.append({"arch": arm.label, "batch": batch, "context_steps": L, "latency_median_s": latency,
                     "flops_per_step": batch * sum(arm.model.flops_per_token(kv_start + i + 1)
                                                   for i in range(TOKENS_PER_STEP)),
                     "state_bytes": nbytes, "prefill_s": prefill, "warmup_s": warm[arm.label], "stopped": stopped,
                     "interleaved": True, "threads": torch.get_num_threads(), "pass": pass_index})
    order = {a.label: k for k, a in enumerate(arms)}
    rows.sort(key=lambda r: (order[r["arch"]], r["context_steps"]))
    for row in rows:
        if progress:
            progress(row)
    return rows


def combine_passes(rows: list[dict]) -> list[dict]:
    """One row per (arch, batch, context): the median of the passes' latencies (`latency_median_s`), their min and
    max, and how many passes measured it; a context any pass stopped at keeps that pass's reason. Rows of one pass
    come back unchanged apart from those fields."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["batch"], r["context_steps"]), []).append(r)
    out = []
    for group in groups.values():
        lat = [r["latency_median_s"] for r in group if r["latency_median_s"] is not None]
        row = dict(group[0])
        row.pop("pass", None)
        row.update(latency_median_s=statistics.median(lat) if lat else None,
                   latency_min_s=min(lat) if lat else None, latency_max_s=max(lat) if lat else None,
                   passes=len(lat), stopped=next((r["stopped"] for r in group if r["stopped"]), None))
        out.append(row)
    return out


def flatness(rows: list[dict], arch: str, batch: int = 1) -> float | None:
    """max / min of an arm's (pass-combined) median latency over the contexts it measured; None below 2 contexts."""
    lat = [r["latency_median_s"] for r in combine_passes(rows)
           if (r["arch"], r["batch"]) == (arch, batch) and r["latency_median_s"] is not None]
    return max(lat) / min(lat) if len(lat) >= 2 else None


def profile_plot(rows: list[dict], path, title: str = "thrifty profile-action-models"):
    """Per-step latency and state/KV bytes against context length (log-log), one line per arch and batch."""
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = combine_passes(rows)
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_t, ax_m = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    arms = list(dict.fromkeys((r["arch"], r["batch"]) for r in rows))
    for i, (arch, batch) in enumerate(arms):
        pts = [r for r in rows if (r["arch"], r["batch"]) == (arch, batch) and r["latency_median_s"] is not None]
        if not pts:
            continue
        xs = [r["context_steps"] for r in pts]
        stopped = any(r["stopped"] for r in rows if (r["arch"], r["batch"]) == (arch, batch))
        label = f"{arch}, batch {batch}" + (" (stopped)" if stopped else "")
        mid = [r["latency_median_s"] * 1e3 for r in pts]
        spread = [[m - r["latency_min_s"] * 1e3 for m, r in zip(mid, pts)],
                  [r["latency_max_s"] * 1e3 - m for m, r in zip(mid, pts)]]  # min..max over the passes
        ax_t.errorbar(xs, mid, yerr=spread, marker="o", color=f"C{i % 10}", label=label, capsize=2)
        ax_m.plot(xs, [max(r["state_bytes"], 1) / 2**20 for r in pts], marker="o", color=f"C{i % 10}", label=label)
    for ax, name in ((ax_t, "latency per step (ms, median; bars: passes' range)"), (ax_m, "state / KV cache (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("context (environment steps already seen)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def print_profile_table(rows: list[dict], console) -> None:
    """One line per (arm, batch): the median step latency at each context (over the passes), max/min of those
    medians over the contexts (flatness), the state/KV bytes at the last measured context, analytic FLOPs per
    step there, and why the arm stopped (if it did)."""
    from rich import box
    from rich.table import Table

    passes = max((r.get("pass", 0) for r in rows), default=0) + 1
    rows = combine_passes(rows)
    contexts = sorted({r["context_steps"] for r in rows})
    title = "thrifty profile-action-models: ms per step (median" + (f" of {passes} passes)" if passes > 1 else ")")
    table = Table(title=title, box=box.SIMPLE_HEAVY)
    for c in ("arm", "batch", *map(str, contexts), "max/min", "state/KV (last)", "FLOPs/step (last)", "stopped"):
        table.add_column(c, justify="left" if c in ("arm", "stopped") else "right", no_wrap=c != "stopped")
    for arm, batch in dict.fromkeys((r["arch"], r["batch"]) for r in rows):
        pts = {r["context_steps"]: r for r in rows if (r["arch"], r["batch"]) == (arm, batch)}
        done = [r for r in pts.values() if r["latency_median_s"] is not None]
        last = max(done, key=lambda r: r["context_steps"]) if done else None
        stop = next((r["stopped"] for r in pts.values() if r["stopped"]), "")
        cells = [f"{pts[c]['latency_median_s'] * 1e3:.2f}" if c in pts and pts[c]["latency_median_s"] is not None
                 else "–" for c in contexts]
        lat = [r["latency_median_s"] for r in done]
        ratio = f"{max(lat) / min(lat):.2f}x" if len(lat) >= 2 else "–"
        table.add_row(arm, str(batch), *cells, ratio, f"{last['state_bytes'] / 2**20:.2f} MiB" if last else "–",
                      f"{last['flops_per_step'] / 1e6:.1f} M" if last else "–", stop)
    console.print(table)
