"""The planner loop: build the context, call the planner through a session, parse the action, step the env.

One decision = one call of the model: prefill of the context (or of its new part, when a technique keeps the
cache) and a bounded greedy decode of the action. Every decision yields a `CostRecord`; every episode a result
dict that the bench harness writes as one JSON line.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thrifty.agents.transcript import ACT_PROMPT, action_segment, mission_segment, observation_segment
from thrifty.backbones import HFDecoder
from thrifty.cost import CostRecord, PeakRSS, Stopwatch, forward_flops, kv_bytes
from thrifty.cost.flops import kv_projection_flops
from thrifty.cost.bandwidth import episode_bandwidth
from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv
from thrifty.envs.seeds import train_seed
from thrifty.runtime import Session
from thrifty.runtime.session import DecodeResult
from thrifty.techniques import DecisionContext, Full, Technique

DEFAULT_ACTION = "left"
"""What an unparseable planner output is replaced by: turning never changes the world, so it is always safe."""

REPLAN_TRIGGERS = ("every_step", "on_change")

WARMUP_DECISIONS = 3
"""Untimed decisions `warm_up` makes before a process times its first one: the first calls of a process pay one-off
costs (allocations, lazily faulted-in library code, a pruner's first load), up to ~1 s each on a cold or busy
machine against ~20 ms warm."""


def parse_action(text: str) -> str | None:
    """The action word at the start of the planner's output, or None when there is none. Never raises."""
    if not isinstance(text, str):
        return None
    words = text.strip().split()
    if not words:
        return None
    word = words[0].strip(".,;:!").lower()
    return word if word in ACTIONS else None


@dataclass
class PlannerContext:
    """The append-only token context of one episode, with its spans in token positions.

    spans: "mission" (the mission line), "observation" (the current observation and the decision prompt),
    "stable_prefix" (everything before the current observation: what later decisions share).
    """

    tokenizer: Any
    ids: list[int] = field(default_factory=list)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    def _append(self, text: str) -> tuple[int, int]:
        start = len(self.ids)
        self.ids += self.tokenizer.encode(text, add_special_tokens=False)
        return start, len(self.ids)

    def start(self, mission: str) -> None:
        self.ids = [self.tokenizer.bos_token_id]
        self.spans = {"mission": self._append(mission_segment(mission))}

    def add_observation(self, observation: str) -> None:
        start, _ = self._append(observation_segment(observation))
        _, end = self._append(ACT_PROMPT)
        self.spans["stable_prefix"] = (0, start)
        self.spans["observation"] = (start, end)

    def add_action(self, action: str) -> None:
        self._append(action_segment(action))


class TextPlanner:
    """A causal LM used as a planner: `decide(context)` returns the generated text and a `CostRecord`."""

    def __init__(self, backbone: HFDecoder, tokenizer, technique: Technique | None = None,
                 max_new_tokens: int = 3):
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.technique = technique or Full()
        self.max_new_tokens = max_new_tokens
        self.stop_ids = tuple(tokenizer.encode("\n", add_special_tokens=False))
        self.last_report: dict = {}
        self.draft = True
        """speculate on each decision's first token, fed with the prefill as alternatives (one decode pass less
        when one is right, the same output always; `Session.extend_with_draft`)"""
        self.draft_width = 3
        """how many alternatives: the first tokens of the planner's most recent distinct decisions"""
        self._recent_first: list[int] = []

    @classmethod
    def load(cls, model_dir: str | Path, technique: Technique | None = None, **kw) -> "TextPlanner":
        from transformers import AutoTokenizer

        backbone = HFDecoder.load(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        return cls(backbone, tokenizer, technique, **kw)

    def reset(self) -> None:
        self.technique.reset()
        self._recent_first = []

    def decide(self, context: PlannerContext, seed: int = 0, choose=None,
               max_new_tokens: int | None = None) -> tuple[str, CostRecord]:
        """One planner call: the technique picks the session (fresh, or a kept prefix) and the prefill hook.
        `choose` replaces greedy argmax in decoding (`Session.decode`; e.g. a `TextSetConstraint.choose`),
        `max_new_tokens` the planner's own limit."""
        ids = torch.tensor(context.ids, dtype=torch.long)
        ctx = DecisionContext(token_ids=ids, spans=dict(context.spans), seed=seed)
        shape = self.backbone.shape
        with PeakRSS() as mem, Stopwatch() as sw:
            session, new_from = self.technique.open_session(self.backbone, ctx)
            hook = self.technique.prefill_hook(ctx, shape.n_layers, new_from)
            exit_hook = self.technique.exit_hook(self.backbone, ctx)
            if exit_hook is not None and choose is not None:
                raise ValueError(f"{self.technique.name}: an early exit chooses among its head's action words, but "
                                 "this decision is constrained to another language (`choose`, e.g. the coop "
                                 "planner's structured decisions); early exit is not supported there")
            drafts = self._recent_first[:self.draft_width] if self.draft and hook is None and exit_hook is None else []
            if not drafts:
                pre = session.extend(ids[new_from:], logits="last", layer_hook=hook, exit_hook=exit_hook,
                                     propagate_on_exit=self.technique.propagates_on_exit())
            else:
                pre = session.extend_with_draft(ids[new_from:], drafts, choose=choose)
            decode_from = session.next_position - int(bool(pre.draft_accepted))
            if pre.exited_after is not None:  # early exit: the technique's head chose the output, no decode
                out, text = DecodeResult(), self.technique.exit_text()
            else:
                out = session.decode(max_new_tokens or self.max_new_tokens, stop_ids=self.stop_ids, choose=choose)
                first = out.token_ids[0] if out.token_ids else None
                if first is not None and first not in self.stop_ids:
                    self._recent_first = [first] + [t for t in self._recent_first if t != first][:7]
                text = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
            self.technique.close_session(session, ctx, decode_from)
        exited = pre.exited_after is not None
        prefill_flops = forward_flops(shape, pre.works, n_logits=0 if exited else 1 + pre.draft_rows)
        decode_flops = sum(forward_flops(shape, w, n_logits=1) for w in out.works)
        prefill_flops += kv_projection_flops(shape, pre.propagated)  # early exit's state propagation, if any
        record = CostRecord(
            tokens_in=len(context.ids) - new_from, tokens_context=len(context.ids), tokens_out=len(out.token_ids),
            tokens_per_layer=[w.queries for w in pre.works], kv_per_layer=session.kv_lengths(),
            prefix_tokens_reused=new_from, flops=prefill_flops + decode_flops + self.technique.own_flops(),
            prefill_flops=prefill_flops, wall_s=sw.seconds, peak_rss_bytes=mem.peak_bytes,
            kv_bytes=kv_bytes(session.kv_tensors()),
            exit_layer=pre.exited_after + 1 if exited else shape.n_layers, decode_passes=len(out.works))
        self.last_report = self.technique.report()
        return text, record


@dataclass
class EpisodeConfig:
    replan: str = "every_step"
    """every_step: call the planner at every step; on_change: only when the observation text changed
    (otherwise the previous action is repeated and no decision is made)"""
    max_steps: int | None = None
    """cap on environment steps (default: the level's own max_steps)"""

    def __post_init__(self) -> None:
        if self.replan not in REPLAN_TRIGGERS:
            raise ValueError(f"replan must be one of {REPLAN_TRIGGERS}, got {self.replan!r}")


def run_episode(planner: TextPlanner, level: str, seed: int, config: EpisodeConfig | None = None) -> dict:
    """Play one episode of `level` from `seed` with the planner; returns the per-episode result dict."""
    config = config or EpisodeConfig()
    env = BabyAITextEnv(level, max_steps=config.max_steps)
    obs, info = env.reset(seed=seed)
    planner.reset()
    context = PlannerContext(planner.tokenizer)
    context.start(info["mission"])
    records: list[CostRecord] = []
    actions: list[str] = []
    reports: list[dict] = []
    unparseable = 0
    prev_obs, prev_action = None, None
    reward, done, steps = 0.0, False, 0
    while not done:
        context.add_observation(obs)
        if config.replan == "on_change" and obs == prev_obs and prev_action is not None:
            action = prev_action
        else:
            text, record = planner.decide(context, seed=seed * 1000 + steps)
            records.append(record)
            reports.append(planner.last_report)
            action = parse_action(text)
            if action is None:
                unparseable += 1
                action = DEFAULT_ACTION
        context.add_action(action)
        actions.append(action)
        prev_obs, prev_action = obs, action
        obs, reward, terminated, truncated, _ = env.step(ACTIONS.index(action))
        steps += 1
        done = terminated or truncated
    env.close()
    walls = [r.wall_s for r in records]
    return {
        "mission": info["mission"],
        "episode_key": env.episode_key,  # which episode the seed gave (thrifty.envs.seeds.episode_key)
        "success": bool(reward > 0),
        "reward": reward,
        "steps": steps,
        "decisions": len(records),
        "unparseable": unparseable,
        "actions": actions,
        "tokens_context_mean": statistics.fmean(r.tokens_context for r in records) if records else 0.0,
        "tokens_context_max": max((r.tokens_context for r in records), default=0),
        "flops_total": sum(r.flops for r in records),
        "prefill_flops_total": sum(r.prefill_flops for r in records),
        "wall_median_s": statistics.median(walls) if walls else 0.0,
        "wall_total_s": sum(walls),
        "peak_rss_bytes": max((r.peak_rss_bytes for r in records), default=0),
        "kv_bytes_max": max((r.kv_bytes for r in records), default=0),
        "technique": planner.technique.name,
        "technique_reports": reports if any(reports) else [],
        "exit_layer_mean": statistics.fmean(r.exit_layer for r in records) if records else 0.0,
        "prefix_tokens_reused_total": sum(r.prefix_tokens_reused for r in records),
        "decode_passes_total": sum(r.decode_passes for r in records),
        "tokens_in_total": sum(r.tokens_in for r in records),
        **episode_bandwidth(records, planner.backbone.shape, reward),
        "per_decision": {  # compact per-decision series for plots
            "tokens_context": [r.tokens_context for r in records],
            "tokens_in": [r.tokens_in for r in records],
            "prefix_tokens_reused": [r.prefix_tokens_reused for r in records],
            "tokens_per_layer": [r.tokens_per_layer for r in records],
            "flops": [r.flops for r in records],
            "exit_layer": [r.exit_layer for r in records],
            "wall_s": [round(r.wall_s, 6) for r in records],
        },
    }


def warm_up(planner: TextPlanner, level: str, decisions: int = WARMUP_DECISIONS) -> int:
    """Make `decisions` untimed decisions (the first steps of episodes of `level` on training seeds) through the
    planner's backbone with a copy of its technique, so that the next, timed decisions of this process pay no
    one-off cost while the technique's own state (kept session, prefix store) stays untouched. Returns the
    decisions made. Call it before the first timed episode; the bench does, once per configuration and process,
    and says so under its table."""
    if decisions <= 0:
        return 0
    for part in getattr(planner.technique, "parts", (planner.technique,)):
        if hasattr(part, "bind"):  # load and check a pruner now, not inside the first timed decision
            part.bind(planner.backbone)
    twin = TextPlanner(planner.backbone, planner.tokenizer, copy.deepcopy(planner.technique),
                       planner.max_new_tokens)
    made = 0
    for i in range(decisions):  # an episode may end sooner: go on with the next training seed
        made += run_episode(twin, level, train_seed(i), EpisodeConfig(max_steps=decisions - made))["decisions"]
        if made >= decisions:
            break
    return made
