"""The cooperative episode loop: rounds of structured decisions over the shared context, executed on CoopGrid.

One round:
1. every robot in turn (r0, r1, ...) gets a call: its role line is appended and `decide_fn(context, agent)` returns
   the continuation of `rN do:`; the output is parsed against what the team knows (`parse_decision`); malformed
   output is counted and replaced by `DEFAULT_DECISION` (wait); the decision is appended to the context;
2. the env steps all robots with the low-level controller until a robot finishes its sub-goal, a target is seen
   for the first time, the episode ends, or `ticks_per_round` steps pass;
3. each robot's observation of the round (its room, the objects it saw with their rooms) and the events (targets
   reached, rooms explored) are appended.

`decide_fn(context: CoopContext, agent: int) -> str | (str, cost)` is any callable: the expert (`expert_decide`),
or an LLM planner that tokenizes the context with `SharedContextTokens` and runs it through a thrifty technique;
a returned cost (e.g. a `CostRecord`) is kept per call.

Example:
    >>> from thrifty.agents.coop_expert import expert_decide
    >>> result = run_coop_episode(expert_decide, n_robots=2, seed=0)
    >>> result["success"], result["malformed"]
    (True, 0)
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Any, Callable

from thrifty.agents.coop_context import CoopContext, SharedContextTokens, render_records
from thrifty.agents.coop_decision import DEFAULT_DECISION, Decision, parse_decision
from thrifty.agents.coop_expert import expert_decision
from thrifty.envs.coop_grid import CoopGridEnv, Subgoal, low_level_action, subgoal_done

DecideFn = Callable[[CoopContext, int], Any]


@dataclass
class CoopConfig:
    rows: int = 3
    """room layout rows (rooms are numbered row by row)"""
    cols: int = 3
    n_targets: int | None = None
    """targets per mission (1..4); None: sampled per seed"""
    n_distractors: int = 3
    """non-target objects in the world"""
    ticks_per_round: int = 12
    """low-level steps a round runs at most"""
    max_rounds: int = 40
    """rounds after which the episode stops (unsuccessful)"""
    max_steps: int | None = None
    """low-level step limit (default: the env's, 60 per room)"""
    max_records: int | None = 400
    """context size policy: compact into a `known` record when a round starts above this many records"""

    def __post_init__(self) -> None:
        if self.ticks_per_round < 1 or self.max_rounds < 1:
            raise ValueError("ticks_per_round and max_rounds must be >= 1")

    def make_env(self, n_robots: int) -> CoopGridEnv:
        return CoopGridEnv(n_robots=n_robots, rows=self.rows, cols=self.cols, n_targets=self.n_targets,
                           n_distractors=self.n_distractors, max_steps=self.max_steps)


def _object_rooms(env: CoopGridEnv, names: list[str]) -> dict[str, int]:
    rooms = {o.name: o.room for o in env.objects}
    return {n: rooms[n] for n in names}


def run_coop_episode(decide_fn: DecideFn, n_robots: int, seed: int, config: CoopConfig | None = None,
                     tokenizer=None) -> dict:
    """Play one episode with `decide_fn` deciding for every robot; returns the per-episode result dict.

    With a `tokenizer`, the context of every call is also measured in tokens (`SharedContextTokens`).
    """
    config = config or CoopConfig()
    env = config.make_env(n_robots)
    obs, infos = env.reset(seed=seed)
    key = env.episode_key()
    agents = list(env.possible_agents)
    ctx = CoopContext.start(env.mission, n_robots, config.rows, config.cols, config.max_records)
    tokens = SharedContextTokens(tokenizer) if tokenizer is not None else None
    ctx.start_round()
    for i, a in enumerate(agents):
        ctx.add_observation(i, infos[a]["room"], _object_rooms(env, infos[a]["seen"]))
    for room in sorted(env.explored):  # rooms the first views already cover
        ctx.add_event(f"explored room {room}")
    ctx.add_plan()

    calls: list[dict] = []
    malformed_errors: list[str] = []
    round_tokens: list[int] = []
    done = False
    while True:
        goals: dict[str, Subgoal] = {}
        n_tokens = 0
        for i, a in enumerate(agents):  # 1. decisions, in turn, over the shared context
            prompt = ctx.begin_call(i)
            call = {"round": ctx.round, "agent": i, "context_chars": len(prompt)}
            if tokens is not None:
                ids, spans = tokens.call(ctx, i)
                call["context_tokens"] = len(ids)
                call["stable_prefix_tokens"] = spans["stable_prefix"][1]
                n_tokens += len(ids)
            out = decide_fn(ctx, i)
            text, cost = out if isinstance(out, tuple) else (out, None)
            state = ctx.state()
            decision, error = parse_decision(text, state.objects.keys(), state.n_rooms)
            if decision is None:
                malformed_errors.append(error)
                decision = DEFAULT_DECISION
            ctx.add_decision(i, decision)
            goals[a] = decision.action
            call.update(output=text, decision=decision.text(), malformed=error is not None, cost=cost)
            calls.append(call)
        round_tokens.append(n_tokens)

        # 2. execution: low-level steps until something worth replanning for happens
        active = {a for a in agents if not subgoal_done(env, a, goals[a])}
        seen: dict[str, dict[str, None]] = {a: {} for a in agents}  # ordered sets of names seen this round
        reached: list[tuple[int, str]] = []
        explored_before = set(env.explored)
        known_before = set(env.known_objects())
        for _ in range(config.ticks_per_round):
            actions = {a: low_level_action(env, a, goals[a]) for a in env.agents}
            obs, rewards, terms, truncs, infos = env.step(actions)
            for i, a in enumerate(agents):
                seen[a].update(dict.fromkeys(infos[a]["seen"]))
                reached += [(i, name) for name in infos[a]["reached"]]
            done = not env.agents
            finished = any(subgoal_done(env, a, goals[a]) for a in active)
            new_target = any(t not in known_before for t in env.known_objects() if t in env.targets)
            if done or finished or new_target:
                break

        # 3. reports
        for i, a in enumerate(agents):
            ctx.add_observation(i, env.room_of(*env.pos[a]), _object_rooms(env, list(seen[a])))
        for i, name in reached:
            ctx.add_event(f"reached {name}", i)
        for room in sorted(env.explored - explored_before):
            ctx.add_event(f"explored room {room}")
        if done or ctx.started_rounds >= config.max_rounds:
            break
        ctx.start_round()

    env.close()
    n_calls = len(calls)
    token_counts = [c["context_tokens"] for c in calls if "context_tokens" in c]
    return {
        "n_robots": n_robots,
        "seed": seed,
        "episode_key": key,  # which episode the seed gave (CoopGridEnv.episode_key)
        "mission": env.mission,
        "success": env.success,
        "targets": len(env.targets),
        "targets_reached": len(env.reached),
        "rounds": ctx.started_rounds,
        "calls": n_calls,
        "ticks": env.steps,
        "malformed": len(malformed_errors),
        "malformed_errors": malformed_errors[:5],
        "conflicts": sum(r.kind == "conflict" for r in ctx.records),
        "compactions": ctx.epoch,
        "decisions": [c["decision"] for c in calls],
        "context_chars_max": max((c["context_chars"] for c in calls), default=0),
        "context_tokens_mean": statistics.fmean(token_counts) if token_counts else None,
        "context_tokens_max": max(token_counts, default=None),
        "tokens_per_round_mean": statistics.fmean(round_tokens) if token_counts else None,
        "costs": [c["cost"] for c in calls] if any(c["cost"] is not None for c in calls) else [],
        "per_call": {
            "round": [c["round"] for c in calls],
            "agent": [c["agent"] for c in calls],
            "context_chars": [c["context_chars"] for c in calls],
            "context_tokens": [c.get("context_tokens") for c in calls] if token_counts else [],
            "stable_prefix_tokens": [c.get("stable_prefix_tokens") for c in calls] if token_counts else [],
        },
        "tokens_per_round": round_tokens if token_counts else [],
        "final_context": ctx.render(),
    }


# ---------------------------------------------------------------------------------------------- expert data

def random_decision(context: CoopContext, rng: random.Random) -> Decision:
    """A uniformly random valid decision (goto a reported object, explore a room, or wait)."""
    state = context.state()
    options = ([Subgoal("goto", n) for n in state.objects] + [Subgoal("explore", r) for r in range(state.n_rooms)]
               + [Subgoal("wait")])
    return Decision(rng.choice(options))


def collect_expert_transcript(n_robots: int, seed: int, config: CoopConfig | None = None, noise: float = 0.0,
                              rng: random.Random | None = None) -> dict:
    """One expert episode as behaviour-cloning data.

    With probability `noise` per call a random valid decision is *taken* (DART-style, so the data shows how to
    recover) while the label stays the expert's. Returns
    {"n_robots", "seed", "success", "epochs": [text], "calls": [{"agent", "round", "epoch", "prompt_end",
    "label", "taken"}]}: the context of a call is `epochs[epoch][:prompt_end]` (it ends with 'rN do:'), the target
    is `" " + label + "\\n"`; within an epoch every call's context is a prefix of the epoch text, so one epoch
    text is one training sequence with a label after each prompt.
    """
    rng = rng or random.Random(seed)
    calls: list[dict] = []

    def decide(ctx: CoopContext, agent: int) -> str:
        label = expert_decision(ctx.state(), agent).text()
        taken = random_decision(ctx, rng).text() if noise and rng.random() < noise else label
        calls.append({"agent": agent, "round": ctx.round, "epoch": ctx.epoch,
                      "prompt_end": len(ctx.render()) + len(f"r{agent} do:"), "label": label, "taken": taken})
        return " " + taken

    contexts: list[CoopContext] = []
    result = run_coop_episode(_remember_context(decide, contexts), n_robots, seed, config)
    ctx = contexts[0]
    epochs = [render_records(ctx.records[:2] + ctx.records[start:end])
              for start, end in zip(ctx.epoch_starts, ctx.epoch_starts[1:] + [len(ctx.records)])]
    return {"n_robots": n_robots, "seed": seed, "success": result["success"], "mission": result["mission"],
            "epochs": epochs, "calls": calls}


def _remember_context(decide: DecideFn, out: list[CoopContext]) -> DecideFn:
    def wrapped(ctx: CoopContext, agent: int):
        if not out:
            out.append(ctx)
        return decide(ctx, agent)
    return wrapped


def collect_expert_transcripts(n_robots: int, seeds: list[int], config: CoopConfig | None = None,
                               noise: float = 0.0, seed: int = 0) -> list[dict]:
    """`collect_expert_transcript` over `seeds` (one shared noise RNG seeded with `seed`)."""
    rng = random.Random(seed)
    return [collect_expert_transcript(n_robots, s, config, noise, rng) for s in seeds]
