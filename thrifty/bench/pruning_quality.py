"""Secondary diagnostics of token pruning: next-action agreement and KL with the full model on held-out contexts.

Closed-loop success (the `pruning` suite) is the quality truth; this measures, per decision, how far a pruned
prefill moves the planner's next-token distribution. Held-out contexts come from expert episodes on *evaluation*
seeds (disjoint from the planner's and the pruner's training seeds), cut at every step where the context has
something to prune; every technique is compared with the full model on the same contexts, at the same keep
settings, so the baselines are token-count-matched.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from thrifty.agents.planner import PlannerContext
from thrifty.backbones import HFDecoder
from thrifty.envs.babyai_text import LEVELS, eval_seed
from thrifty.techniques import DecisionContext, build
from thrifty.techniques.pruning_common import protected_mask
from thrifty.train.pruner import compare_to_full

TECHNIQUES = ("token_pruning", "random_pruning", "recency_pruning", "sink_window")


def heldout_contexts(tokenizer, levels=tuple(LEVELS), episodes_per_level: int = 10, per_level: int = 40,
                     seed: int = 0, first_episode: int = 5000,
                     min_prunable: int = 1) -> list[tuple[str, DecisionContext]]:
    """(level, context) pairs: expert episodes on evaluation seeds eval_seed(first_episode + i), cut at steps
    whose context has at least `min_prunable` prunable tokens (default protection), at most `per_level` per
    level drawn uniformly. first_episode=5000 keeps them apart from the closed-loop seeds eval_seed(0..)."""
    from thrifty.train.planner import collect_episode

    rng = random.Random(seed)
    out: list[tuple[str, DecisionContext]] = []
    for level in levels:
        cands = []
        for i in range(episodes_per_level):
            ep = collect_episode(level, eval_seed(first_episode + i), 0.0, rng)
            ctx = PlannerContext(tokenizer)
            ctx.start(ep["mission"])
            for step, obs in enumerate(ep["observations"]):
                ctx.add_observation(obs)
                ids = torch.tensor(ctx.ids)
                prot = protected_mask(torch.arange(len(ids)), ctx.spans, ("mission", "observation"), 4, 16, len(ids))
                if int((~prot).sum()) >= min_prunable:
                    cands.append(DecisionContext(ids, dict(ctx.spans), seed=eval_seed(first_episode + i) + step))
                ctx.add_action(ep["taken"][step])
        rng.shuffle(cands)
        out += [(level, c) for c in cands[:per_level]]
    return out


def run_pruning_quality(model_dir: str | Path | None = None, keeps=(0.9, 0.8, 0.7, 0.6),
                        techniques=TECHNIQUES, settings: dict[str, Any] | None = None, episodes_per_level: int = 10,
                        per_level: int = 40, seed: int = 0, out_json: str | Path | None = None,
                        threads: int = 1) -> dict[str, Any]:
    """Agreement and KL with the full model for each technique x keep ratio, per level and overall.

    `settings`: extra settings for every technique (e.g. {"layers": (1, 2, 3)} or {"pruner": PATH} reaches
    token_pruning only). Returns (and writes to `out_json`) {"rows": [...], ...}; a row has technique, keep_ratio,
    level ("all" for the pooled contexts), agreement, kl, work, flops_fraction (pruned / full prefill FLOPs), contexts.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoTokenizer

    from thrifty.bench.suites import SHIPPED_PLANNER

    torch.set_num_threads(threads)
    model_dir = Path(model_dir) if model_dir else SHIPPED_PLANNER
    backbone = HFDecoder.load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    contexts = heldout_contexts(tokenizer, episodes_per_level=episodes_per_level, per_level=per_level, seed=seed)
    levels = sorted({lv for lv, _ in contexts})
    rows = []
    full_cache: dict = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("pruning quality", total=len(contexts) * len(keeps) * len(techniques))
        for keep in keeps:
            for name in techniques:
                extra = dict(settings or {})
                if name != "token_pruning":
                    extra.pop("pruner", None)
                tech = build(name, keep_ratio=keep, **extra)
                bar.update(task, description=f"pruning quality {name} keep {keep}")
                pooled = []
                for level in levels:
                    ctxs = [c for lv, c in contexts if lv == level]
                    m = compare_to_full(backbone, ctxs, tech, lambda: bar.advance(task), full_cache)
                    rows.append({"technique": name, "keep_ratio": keep, "level": level, **m})
                    pooled.append(m)
                n = sum(m["contexts"] for m in pooled)
                rows.append({"technique": name, "keep_ratio": keep, "level": "all", "contexts": n, **{
                    k: sum(m[k] * m["contexts"] for m in pooled) / max(1, n)
                    for k in ("agreement", "kl", "work", "flops_fraction")}})
    out = {"model": str(model_dir), "contexts": len(contexts), "episodes_per_level": episodes_per_level,
           "seeds": f"expert episodes on eval_seed(5000 + i), i < {episodes_per_level}", "settings": settings or {},
           "rows": rows}
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(out, indent=2, default=list) + "\n")
    return out


def print_quality(result: dict[str, Any], console: Any = None) -> None:
    """A table of the pooled rows: technique x keep ratio, agreement, KL, work and FLOPs fractions."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"next-action agreement and KL with the full model ({result['contexts']} held-out contexts)")
    for col in ("technique", "keep", "agreement", "KL (nats)", "work", "prefill FLOPs"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        if r["level"] == "all":
            t.add_row(r["technique"], f"{r['keep_ratio']:g}", f"{r['agreement']:.3f}", f"{r['kl']:.4f}",
                      f"{r['work']:.3f}", f"{r['flops_fraction']:.3f}")
    console.print(t)
