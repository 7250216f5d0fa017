"""DAgger rounds for the cooperative planner (Ross et al., 2011): the planner decides for every robot, the expert
labels every call it makes.

Behaviour cloning sees only the expert's contexts. At K = 8 the cloned planner makes one wrong `wait` (say, a robot
standing in the room of a free target) and from then on reads its own earlier `wait` in the shared context and
copies it, round after round. A DAgger round plays the *current* planner on fresh training seeds and records, at
each call, the expert's decision on the same team state (`expert_decision` reads only the context).

Each recorded call becomes one training row in the phase-1 window form (`thrifty.train.sequences`): the task lines
+ the last `window_tokens` tokens of the call's context (at their true positions), then the expert's decision
tokens, which carry the decision label. Every call the planner got wrong is kept; of the calls it got right, one in
`keep_agreeing`. Rounds are appended to a JSON-lines file one episode at a time, so an interrupted round resumes
(`load_rollouts` drops a torn last line).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from thrifty.agents.coop import CoopConfig, run_coop_episode
from thrifty.agents.coop_expert import expert_decision
from thrifty.train.dagger import load_rollouts

COOP_DAGGER_SEED_BASE = 500_000
"""Round r plays seeds COOP_DAGGER_SEED_BASE + r * 10_000 + i: disjoint from the expert data's (0..n-1) and from
evaluation seeds (>= 1e9)."""


def coop_dagger_seed(round_idx: int, i: int) -> int:
    return COOP_DAGGER_SEED_BASE + round_idx * 10_000 + i


def dagger_row(ids: list[int], prefix: int, label_ids: list[int], window_tokens: int) -> dict:
    """The task lines + the last `window_tokens` tokens of a call's `ids` (true positions) + the expert's decision.

    Returns {"ids", "labels", "positions"}, labels shifted (position i predicts token i+1) and only on the decision.
    """
    start = max(prefix, len(ids) - window_tokens)
    full = ids[:prefix] + ids[start:] + label_ids
    positions = list(range(prefix)) + list(range(start, len(ids) + len(label_ids)))
    n_ctx = len(full) - len(label_ids)
    labels = [-100] * (n_ctx - 1) + label_ids
    return {"ids": full[:-1], "labels": labels, "positions": positions[:-1]}


def collect_coop_dagger_round(planner, team_sizes, episodes_per_size: int, round_idx: int, path: Path,
                              window_tokens: int, keep_agreeing: int = 4, config: CoopConfig | None = None,
                              progress=None) -> list[dict]:
    """Play `episodes_per_size` episodes per team size with `planner` (a `CoopPlanner`) and return (and append to
    `path`) one record per episode: {"n_robots", "seed", "success", "calls", "agreed", "rows"}."""
    path = Path(path)
    done = load_rollouts(path)
    have = {(e["n_robots"], e["seed"]) for e in done}
    todo = [(k, coop_dagger_seed(round_idx, i)) for i in range(episodes_per_size) for k in team_sizes]
    task = progress.add_task(f"coop DAgger round {round_idx}", total=len(todo), completed=len(have)) if progress else None
    tok = planner.tokenizer
    rng = random.Random(round_idx)
    with path.open("a") as f:
        for k, seed in todo:
            if (k, seed) in have:
                continue
            planner.reset(seed)
            rows, stats = [], {"calls": 0, "agreed": 0}

            def decide(ctx, agent):
                label = expert_decision(ctx.state(), agent).text()
                text, cost = planner(ctx, agent)
                ids, spans = planner.tokens.call(ctx, agent)
                stats["calls"] += 1
                agreed = text.strip() == label
                stats["agreed"] += agreed
                if not agreed or rng.randrange(keep_agreeing) == 0:
                    target = tok.encode(f" {label}\n", add_special_tokens=False)
                    rows.append(dagger_row(ids, spans["task"][1], target, window_tokens))
                return text, cost

            result = run_coop_episode(decide, k, seed, config)
            record = {"n_robots": k, "seed": seed, "success": result["success"], **stats, "rows": rows}
            f.write(json.dumps(record) + "\n")
            f.flush()
            done.append(record)
            if progress:
                progress.advance(task)
    return done


def agreement(episodes: list[dict]) -> float:
    """Fraction of the planner's calls that equal the expert's decision."""
    return sum(e["agreed"] for e in episodes) / max(1, sum(e["calls"] for e in episodes))
