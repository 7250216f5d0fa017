"""The cooperative planner as a `decide_fn`: a causal LM run through a thrifty technique over the shared context.

Each call tokenises the shared context with `SharedContextTokens` (record by record, never re-tokenised as a
whole, so the tokens are exactly those the planner was trained on and a prefix of every later call's within a
context epoch) and hands ids + spans to `TextPlanner.decide`, which opens a session through the technique
(fresh, or the kept one under `prefix_reuse`), prefills with the technique's hook (token pruning drops context
tokens from the deep layers) and greedily decodes the decision up to the newline. Every call returns
(text, CostRecord); `run_coop_episode` parses the text, counts malformed output and replaces it with `wait`.
With `constrained=True` the decoder can only emit a decision the parser accepts given the team's reports
(`decision_texts` through `thrifty.runtime.constrained.TextSetConstraint`; the model's own choice whenever valid).

Spans handed to the technique: "task" (task + rule lines), "role" (the caller's role line), "own_observation"
(its latest report), "stable_prefix", and the single-agent aliases "mission" / "observation". The coop
pruning configurations protect `COOP_PROTECT` = task, the caller's role and its own latest observation.

Example:
    >>> from thrifty.techniques import build
    >>> planner = CoopPlanner.load(SHIPPED_COOP_PLANNER, build("prefix_reuse", store_bytes=0))  # doctest: +SKIP
    >>> result = run_coop_planner_episode(planner, n_robots=4, seed=1_000_000_000)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from thrifty.agents.coop import CoopConfig, run_coop_episode
from thrifty.agents.coop_context import CoopContext, SharedContextTokens
from thrifty.agents.coop_decision import DEFAULT_DECISION, decision_texts, parse_decision
from thrifty.agents.coop_expert import expert_decision
from thrifty.agents.planner import TextPlanner
from thrifty.cost import CostRecord
from thrifty.envs.babyai_text import EVAL_SEED_BASE
from thrifty.runtime.constrained import TextSetConstraint
from thrifty.techniques import Technique

SHIPPED_COOP_PLANNER = Path(__file__).resolve().parent.parent / "assets" / "coop_planner"
SHIPPED_COOP_PRUNER = Path(__file__).resolve().parent.parent / "assets" / "coop_pruner" / "model.safetensors"
COOP_PROTECT = ("task", "role", "own_observation")
"""Spans token pruning never drops in a coop call: the task, the caller's role line, its own latest observation."""
EVAL_CONFIG = CoopConfig(max_rounds=20)
"""Evaluation episodes (card and bench-coop) stop after 20 rounds: 1.5x the expert's longest episode (13 rounds
over evaluation seeds 0..39 at K = 2, 4, 8); a planner stuck in a loop would otherwise cost 40 rounds of calls."""
MAX_NEW_TOKENS = 16
"""The longest decision ('goto purple ball | claim: purple ball | drop: room 8' and its newline) is 14 tokens."""


@dataclass
class CallTokens:
    """What `TextPlanner.decide` reads: the call's token ids and spans."""

    ids: list[int]
    spans: dict[str, tuple[int, int]]


class CoopPlanner:
    """A `decide_fn(context, agent) -> (text, CostRecord)` over one model and one technique.

    Call `reset()` at the start of every episode (it starts a new token buffer and resets the technique).
    """

    def __init__(self, backbone, tokenizer, technique: Technique | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS, constrained: bool = False):
        from thrifty.techniques.composed import has_exit_hook

        if technique is not None and any(has_exit_hook(p) for p in getattr(technique, "parts", (technique,))):
            raise ValueError(f"{technique.name}: early exit answers with its head's action words (BabyAI's), but "
                             "the cooperative planner's decisions are structured reports and goals in another "
                             "language; early exit is not supported on the coop planner")
        self.planner = TextPlanner(backbone, tokenizer, technique, max_new_tokens=max_new_tokens)
        self.constrained = constrained
        self._constraints: dict[tuple, TextSetConstraint] = {}
        self.tokenizer = tokenizer
        self.tokens = SharedContextTokens(tokenizer)
        self.seed = 0
        self.calls = 0
        self.reports: list[dict] = []

    @classmethod
    def load(cls, model_dir: str | Path, technique: Technique | None = None, **kw) -> "CoopPlanner":
        from transformers import AutoTokenizer

        from thrifty.backbones import HFDecoder

        backbone = HFDecoder.load(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        return cls(backbone, tokenizer, technique, **kw)

    @property
    def technique(self) -> Technique:
        return self.planner.technique

    @property
    def backbone(self):
        return self.planner.backbone

    def reset(self, seed: int = 0) -> None:
        self.planner.reset()
        self.tokens = SharedContextTokens(self.tokenizer)
        self.seed, self.calls, self.reports = seed, 0, []

    def constraint(self, context: CoopContext) -> TextSetConstraint:
        """The decoding constraint of a call: the decisions `parse_decision` accepts given the team's reports
        (`decision_texts`), each as the planner writes it after 'do:' (a leading space, closed by a newline)."""
        state = context.state()
        key = (frozenset(state.objects), state.n_rooms)
        if key not in self._constraints:
            if len(self._constraints) > 64:
                self._constraints.clear()
            texts = [" " + t for t in decision_texts(state.objects, state.n_rooms)]
            self._constraints[key] = TextSetConstraint(self.tokenizer, texts, end="\n")
        return self._constraints[key]

    def __call__(self, context: CoopContext, agent: int) -> tuple[str, CostRecord]:
        ids, spans = self.tokens.call(context, agent)
        constraint = self.constraint(context) if self.constrained else None
        text, record = self.planner.decide(CallTokens(ids, spans), seed=self.seed * 10_000 + self.calls,
                                           choose=constraint and constraint.choose,
                                           max_new_tokens=constraint and constraint.max_tokens)
        self.calls += 1
        self.reports.append(self.planner.last_report)
        return text, record


def run_coop_planner_episode(planner: CoopPlanner, n_robots: int, seed: int,
                             config: CoopConfig | None = None) -> dict:
    """One episode with `planner` deciding for every robot; the result dict of `run_coop_episode` with its
    `CostRecord`s folded into per-episode metrics (JSON-ready):

    flops_total, flops_per_call, flops_per_round (mean over rounds of the summed FLOPs of the round's K calls),
    tokens_context_mean (= tokens per call), tokens_per_round_mean, wall_median_s (latency per call),
    tokens_per_layer_mean (query tokens per layer, averaged over calls), per_call series.
    """
    planner.reset(seed)
    result = run_coop_episode(planner, n_robots, seed, config, tokenizer=planner.tokenizer)
    records: list[CostRecord] = result.pop("costs")
    rounds = result["per_call"]["round"]
    per_round: dict[int, float] = {}
    for r, rec in zip(rounds, records):
        per_round[r] = per_round.get(r, 0) + rec.flops
    n = max(1, len(records))
    walls = [r.wall_s for r in records]
    layers = len(records[0].tokens_per_layer) if records else 0
    result.pop("final_context", None)
    result.update({
        "decisions": len(records),
        "flops_total": sum(r.flops for r in records),
        "prefill_flops_total": sum(r.prefill_flops for r in records),
        "flops_per_call": sum(r.flops for r in records) / n,
        "flops_per_round": statistics.fmean(per_round.values()) if per_round else 0.0,
        "tokens_context_mean": statistics.fmean(r.tokens_context for r in records) if records else 0.0,
        "tokens_in_total": sum(r.tokens_in for r in records),
        "prefix_tokens_reused_total": sum(r.prefix_tokens_reused for r in records),
        "tokens_per_layer_mean": [statistics.fmean(r.tokens_per_layer[l] for r in records) for l in range(layers)],
        "wall_median_s": statistics.median(walls) if walls else 0.0,
        "wall_total_s": sum(walls),
        "peak_rss_bytes": max((r.peak_rss_bytes for r in records), default=0),
        "kv_bytes_max": max((r.kv_bytes for r in records), default=0),
        "technique": planner.technique.name,
        "technique_reports": planner.reports[:3],
    })
    result["per_call"].update(flops=[r.flops for r in records], wall_s=[round(r.wall_s, 6) for r in records])
    return result


def measure_coop_planner(model_dir: str | Path, team_sizes=(2, 4, 8), episodes: int = 30, threads: int = 1,
                         config: CoopConfig | None = None, write_card: bool = True) -> dict:
    """Closed-loop success per team size of the planner (through exact prefix reuse: same outputs as the full
    model, tests/test_prefix_reuse.py) and of the expert, on evaluation seeds 1e9 + 0..episodes-1; written into
    the model's card.json under "success"."""
    import torch

    from thrifty.agents.coop_expert import expert_decide
    from thrifty.techniques import build

    torch.set_num_threads(threads)
    config = config or EVAL_CONFIG
    planner = CoopPlanner.load(model_dir, build("prefix_reuse", store_bytes=0))
    out = {}
    for k in team_sizes:
        seeds = [EVAL_SEED_BASE + i for i in range(episodes)]
        runs = [run_coop_planner_episode(planner, k, s, config) for s in seeds]
        expert = [run_coop_episode(expert_decide, k, s, config)["success"] for s in seeds]
        out[str(k)] = {"planner": round(sum(r["success"] for r in runs) / episodes, 3),
                       "expert": round(sum(expert) / episodes, 3), "episodes": episodes,
                       "malformed_per_call": round(sum(r["malformed"] for r in runs)
                                                   / max(1, sum(r["calls"] for r in runs)), 4),
                       "rounds_mean": round(statistics.fmean(r["rounds"] for r in runs), 2)}
    if write_card:
        card_path = Path(model_dir) / "card.json"
        card = json.loads(card_path.read_text()) if card_path.is_file() else {}
        card["success"] = out
        card["success_protocol"] = (f"evaluation seeds {EVAL_SEED_BASE} + 0..{episodes - 1} per team size, greedy "
                                    "decoding through prefix_reuse (exact), CoopConfig(max_rounds="
                                    f"{config.max_rounds}); expert on the same seeds")
        card_path.write_text(json.dumps(card, indent=2) + "\n")
    return out


def collect_planner_transcript(planner: CoopPlanner, n_robots: int, seed: int,
                               config: CoopConfig | None = None) -> dict:
    """One closed-loop episode of `planner` in the record format of `collect_expert_transcript` (without epochs):
    per call, `taken` = the planner's decision as the parser read it (canonical; `wait` when malformed) and
    `label` = the expert's decision on the same context. Replaying the `taken` decisions reproduces the episode,
    so these records are Stage 1 data of the coop pruner from the contexts the planner itself produces (its own
    plans, at the team sizes where the expert transcripts' contexts differ most from closed-loop ones)."""
    planner.reset(seed)
    calls: list[dict] = []

    def decide(ctx: CoopContext, agent: int) -> str:
        state = ctx.state()
        label = expert_decision(state, agent).text()
        text, _ = planner(ctx, agent)
        decision, _error = parse_decision(text, state.objects.keys(), state.n_rooms)
        taken = (decision or DEFAULT_DECISION).text()
        calls.append({"agent": agent, "round": ctx.round, "label": label, "taken": taken})
        return " " + taken

    result = run_coop_episode(decide, n_robots, seed, config)
    return {"n_robots": n_robots, "seed": seed, "success": result["success"], "mission": result["mission"],
            "source": "planner", "calls": calls}
