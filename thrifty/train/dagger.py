"""DAgger rounds for the BabyAI-Text planner (Ross et al., 2011): the planner drives, the expert labels.

Behaviour cloning only ever sees expert states, so a planner that makes one mistake walks into states it never saw
(typically: facing a wall, repeating `forward`). A DAgger round plays the *current* planner greedily on fresh
training seeds and records, at every state it visits, the action BabyAIBot would take there (the bot replans from
any state, see `BabyAITextEnv.expert_action`). Those episodes have the same form as the expert transcripts
(`observations`, `taken` = the planner's actions, `labels` = the expert's), so `encode_episode` trains on them
unchanged: the planner's own actions stay in the context, the expert's are the targets.

Rollouts use `prefix_reuse` (exact, ~15x cheaper per decision than recomputing) and are appended to a JSON-lines
file one episode at a time, so an interrupted round resumes where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from thrifty.agents.planner import DEFAULT_ACTION, PlannerContext, TextPlanner, parse_action
from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv, ExpertLostError, train_seed

DAGGER_SEED_BASE = 200_000
"""DAgger round r plays training seeds DAGGER_SEED_BASE + r * 100_000 + i: disjoint from the expert transcripts'
seeds (0..n-1) and from evaluation seeds (>= 1e9)."""


def dagger_seed(round_idx: int, i: int) -> int:
    return train_seed(DAGGER_SEED_BASE + round_idx * 100_000 + i)


def rollout_with_labels(planner: TextPlanner, level: str, seed: int, max_steps: int) -> dict[str, Any]:
    """Play `level` from `seed` with the planner's greedy actions; label every visited state with the expert's."""
    env = BabyAITextEnv(level, max_steps=max_steps)
    obs, info = env.reset(seed=seed)
    planner.reset()
    context = PlannerContext(planner.tokenizer)
    context.start(info["mission"])
    observations, taken, labels = [], [], []
    done, reward = False, 0.0
    while not done:
        try:
            label = env.expert_action()
        except ExpertLostError:  # the planner did what the bot cannot follow (opened a box): labels end here
            break
        context.add_observation(obs)
        labels.append(label)
        text, _ = planner.decide(context)
        action = parse_action(text) or DEFAULT_ACTION
        context.add_action(action)
        observations.append(obs)
        taken.append(action)
        obs, reward, terminated, truncated, _ = env.step(ACTIONS.index(action))
        done = terminated or truncated
    env.close()
    return {"level": level, "seed": seed, "mission": info["mission"], "observations": observations,
            "taken": taken, "labels": labels, "success": reward > 0, "source": "dagger"}


def collect_dagger_round(model, tokenizer, levels: list[str], episodes_per_level: int, round_idx: int,
                         max_steps: int, path: Path, progress=None) -> list[dict]:
    """Collect (or finish collecting) round `round_idx` into `path`; returns all its episodes.

    `model` is the torch model being trained (put in eval mode by the caller); episodes already in `path`
    are kept and skipped, a torn last line is dropped."""
    from thrifty.backbones import HFDecoder
    from thrifty.techniques import build

    episodes = load_rollouts(path)
    done = {(e["level"], e["seed"]) for e in episodes}
    todo = [(lv, dagger_seed(round_idx, i)) for lv in levels for i in range(episodes_per_level)]
    todo = [t for t in todo if t not in done]
    if not todo:
        return episodes
    planner = TextPlanner(HFDecoder.from_model(model), tokenizer, build("prefix_reuse", store_bytes=0))
    task = progress.add_task(f"DAgger round {round_idx}", total=len(todo) + len(done)) if progress else None
    if progress:
        progress.update(task, completed=len(done))
    with path.open("a") as f:
        for level, seed in todo:
            ep = rollout_with_labels(planner, level, seed, max_steps)
            f.write(json.dumps(ep) + "\n")
            f.flush()
            episodes.append(ep)
            if progress:
                progress.advance(task)
    return episodes


def load_rollouts(path: Path) -> list[dict]:
    """The episodes of a round file (one JSON object per line). A torn last line from an interrupted run is dropped
    and the file rewritten without it, so the caller can append to it."""
    episodes: list[dict] = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                episodes.append(json.loads(line))
            except json.JSONDecodeError:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in episodes))
    return episodes


def agreement(episodes: list[dict]) -> float:
    """Fraction of visited states where the planner's action equals the expert's label."""
    pairs = [(t, lab) for e in episodes for t, lab in zip(e["taken"], e["labels"])]
    return sum(t == lab for t, lab in pairs) / max(1, len(pairs))
