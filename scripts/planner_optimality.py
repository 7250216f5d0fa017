"""How often a planner's action is optimal, on the expert's own states of GoTo and Pickup levels.

    python scripts/planner_optimality.py [--model DIR ...] [--level GoToLocal] [--episodes 60] [--seeds eval|train]

The expert (BabyAIBot) plays each episode; at every state the planner decides over the expert's history (prefix
reuse, greedy), and its action is scored against the orientation-aware shortest paths of the true grid: a state is
(x, y, heading), `left`/`right` turn, `forward` moves into a free cell (a blocked one leaves the state unchanged),
and the goal is to face the mission's object (then, on Pickup levels, `pickup`). An action is optimal when it
lowers the cost-to-go by one. That splits a planner's disagreements with the expert into harmless ties (another
shortest path) and real mistakes, which teacher-forced accuracy alone cannot. A diagnostic for docs/babyai.md, not
part of the package.
"""

from __future__ import annotations

import argparse
import collections
from collections import deque

import torch

from thrifty.agents.planner import PlannerContext, TextPlanner, parse_action
from thrifty.bench import SHIPPED_PLANNER
from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv, eval_seed, train_seed
from thrifty.techniques import build

HEADINGS = ((1, 0), (0, 1), (-1, 0), (0, -1))  # minigrid's agent_dir 0..3: east, south, west, north


def optimal_actions(env: BabyAITextEnv, pickup: bool) -> set[str]:
    """The actions that start a shortest path from the agent's (x, y, heading) to facing the mission's object."""
    u = env._env.unwrapped
    targets = {tuple(int(c) for c in o.cur_pos) for o in u.instrs.desc.obj_set if o.cur_pos is not None}

    def free(x: int, y: int) -> bool:
        cell = u.grid.get(x, y)
        return cell is None or (cell.type == "door" and cell.is_open)

    def moves(s):
        x, y, d = s
        nx, ny = x + HEADINGS[d][0], y + HEADINGS[d][1]
        return {"left": (x, y, (d - 1) % 4), "right": (x, y, (d + 1) % 4),
                "forward": (nx, ny, d) if free(nx, ny) else s}

    def facing(s) -> bool:
        x, y, d = s
        return (x + HEADINGS[d][0], y + HEADINGS[d][1]) in targets

    def cost(s) -> float:
        seen, frontier = {s}, deque([(s, 0)])
        while frontier:
            t, k = frontier.popleft()
            if facing(t):
                return k
            for n in moves(t).values():
                if n not in seen:
                    seen.add(n)
                    frontier.append((n, k + 1))
        return float("inf")

    s = (int(u.agent_pos[0]), int(u.agent_pos[1]), int(u.agent_dir))
    if facing(s):
        return {"pickup"} if pickup else set()
    here = cost(s)
    return {a for a, n in moves(s).items() if cost(n) == here - 1}


def score(model_dir: str, level: str, seeds: list[int]) -> dict:
    planner = TextPlanner.load(model_dir, build("prefix_reuse", store_bytes=0))
    c = collections.Counter()
    for seed in seeds:
        env = BabyAITextEnv(level)
        obs, info = env.reset(seed=seed)
        planner.reset()
        ctx = PlannerContext(planner.tokenizer)
        ctx.start(info["mission"])
        done = False
        while not done:
            ctx.add_observation(obs)
            expert = env.expert_action()
            text, _ = planner.decide(ctx)
            action = parse_action(text)
            best = optimal_actions(env, pickup=level.startswith("Pickup"))
            c["states"] += 1
            c["agrees"] += action == expert
            c["expert_optimal"] += expert in best
            c["planner_optimal"] += action in best
            c["disagrees_but_optimal"] += action != expert and action in best
            ctx.add_action(expert)
            obs, _, terminated, truncated, _ = env.step(ACTIONS.index(expert))
            done = terminated or truncated
        env.close()
    n = c["states"]
    return {"states": n, "agreement": c["agrees"] / n, "expert_optimal": c["expert_optimal"] / n,
            "planner_optimal": c["planner_optimal"] / n,
            "mistakes": (n - c["agrees"] - c["disagrees_but_optimal"]) / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="planner directory (repeatable; default: the shipped one)")
    p.add_argument("--level", default="GoToLocal", choices=("GoToLocal", "PickupLoc"))
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--seeds", choices=("eval", "train"), default="eval")
    a = p.parse_args()
    torch.set_num_threads(1)
    seed_of = eval_seed if a.seeds == "eval" else train_seed
    for model in a.model or [str(SHIPPED_PLANNER)]:
        r = score(model, a.level, [seed_of(i) for i in range(a.episodes)])
        print(f"{model} {a.level} ({a.seeds} seeds, {a.episodes} episodes, {r['states']} expert states): "
              f"agrees with the expert {r['agreement']:.3f}, optimal {r['planner_optimal']:.3f} "
              f"(the expert {r['expert_optimal']:.3f}), mistakes {r['mistakes']:.3f}")


if __name__ == "__main__":
    main()
