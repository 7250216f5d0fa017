"""ReLIC's evaluation (research/seed-relic.md §7): trials on held-out tasks, longer than in training, sampled actions;
the return of each episode against its index in the trial (the in-context curve, mean and standard error over
trials), optionally with an expert acting for the first k episodes (few-shot imitation: the policy reads the
expert's actions and rewards in its context, then acts on its own).

`evaluate_trials` -> {"returns": [trials, episodes] per-episode returns, "mean": [episodes], "stderr": [episodes],
"optimal": mean optimal return of the tasks, "tasks": [trials], ...}; `curve_summary` reads the issue's figures off
it (episode 1 against episodes 15-20).
"""

from __future__ import annotations

import numpy as np
import torch

from thrifty.agents.relic_policy import sample_action
from thrifty.envs.darkroom import DarkroomVectorEnv, greedy_action, optimal_return, task_split


@torch.no_grad()
def evaluate_trials(policy, variant: str = "darkroom-ad", episodes: int = 30, trials: int = 40, num_envs: int = 20,
                    split: str = "heldout", seed: int = 0, expert_episodes: int = 0, greedy: bool = False,
                    progress=None) -> dict:
    """Run `trials` trials of `episodes` episodes each (`num_envs` at a time) on the split's tasks, cycling through
    them in order so each task gets the same number of trials; actions sampled (argmax with `greedy`)."""
    if episodes < 1 or trials < 1 or num_envs < 1:
        raise ValueError(f"episodes, trials and num_envs must be >= 1 (got {episodes}, {trials}, {num_envs})")
    if not 0 <= expert_episodes < episodes:
        raise ValueError(f"expert_episodes={expert_episodes} must be in [0, episodes={episodes})")
    train, heldout = task_split(variant)
    pool = heldout if split == "heldout" else train
    policy.eval()
    generator = torch.Generator().manual_seed(seed)
    all_returns, all_tasks = [], []
    for first in range(0, trials, num_envs):
        b = min(num_envs, trials - first)
        tasks = pool[np.arange(first, first + b) % len(pool)]
        env = DarkroomVectorEnv(variant, num_envs=b, split=split)
        obs, _ = env.reset(seed=seed + first, options={"tasks": tasks})
        goal, _ = env.spec_.task_cells(env.tasks)
        horizon = env.spec_.horizon
        state = policy.start(b)
        prev_action, prev_reward = torch.zeros(b, dtype=torch.long), torch.zeros(b)
        start = torch.ones(b, dtype=torch.bool)
        returns = np.zeros((b, episodes))
        for t in range(episodes * horizon):
            x = torch.as_tensor(obs, dtype=torch.float32)
            logits, _ = policy.step(state, x[:, None], prev_action[:, None], prev_reward[:, None], start[:, None])
            if t // horizon < expert_episodes:
                action = torch.as_tensor(greedy_action(obs, goal))
            elif greedy:
                action = logits[:, 0].argmax(-1)
            else:
                action = sample_action(logits[:, 0], generator)[0]
            obs, reward, _, truncated, _ = env.step(action.numpy())
            returns[:, t // horizon] += reward
            prev_action, prev_reward = action, torch.as_tensor(reward, dtype=torch.float32)
            start = torch.as_tensor(truncated, dtype=torch.bool)
        all_returns.append(returns)
        all_tasks.extend(int(k) for k in tasks)
        if progress:
            progress(b)
    returns = np.concatenate(all_returns)
    n = returns.shape[0]
    return {"variant": variant, "split": split, "episodes": episodes, "trials": n, "seed": seed,
            "expert_episodes": expert_episodes, "greedy": greedy, "tasks": all_tasks,
            "returns": returns.tolist(), "mean": returns.mean(0).tolist(),
            "stderr": (returns.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(episodes)).tolist(),
            "optimal": float(np.mean([optimal_return(variant, k) for k in all_tasks]))}


def curve_summary(result: dict, late: tuple[int, int] = (15, 20)) -> dict:
    """The issue's figures from `evaluate_trials`: mean return of episode 1 (of the first episode the policy acts
    in, after any expert episodes) and of episodes late[0]..late[1] (1-based, inclusive), their ratio, and the
    late return as a fraction of the optimal one; with a 95% interval of the late mean over trials."""
    r = np.asarray(result["returns"])
    first = result.get("expert_episodes", 0)
    lo, hi = late[0] - 1, min(late[1], r.shape[1])
    if lo >= hi:
        raise ValueError(f"the trials have {r.shape[1]} episodes: too few for episodes {late[0]}-{late[1]}")
    late_per_trial = r[:, lo:hi].mean(1)
    se = late_per_trial.std(ddof=1) / np.sqrt(len(late_per_trial)) if len(late_per_trial) > 1 else 0.0
    ep1 = float(r[:, first].mean())
    late_mean = float(late_per_trial.mean())
    return {"episode_1": ep1, f"episodes_{late[0]}_{late[1]}": late_mean,
            "late_interval": [float(late_mean - 1.96 * se), float(late_mean + 1.96 * se)],
            "late_over_first": late_mean / ep1 if ep1 > 0 else float("inf"),
            "late_over_optimal": late_mean / result["optimal"] if result["optimal"] else float("nan")}


def plot_curves(results: dict[str, dict], path) -> str:
    """Return per episode index (mean, shaded standard error) of each result, the optimal return dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, r in results.items():
        m, se = np.asarray(r["mean"]), np.asarray(r["stderr"])
        x = np.arange(1, len(m) + 1)
        ax.plot(x, m, label=name)
        ax.fill_between(x, m - se, m + se, alpha=0.25)
    opt = next(iter(results.values()))["optimal"]
    ax.axhline(opt, ls="--", c="k", lw=1, label=f"optimal ({opt:.1f})")
    first = next(iter(results.values()))
    ax.set_xlabel("episode in the trial")
    ax.set_ylabel("return")
    ax.set_title(f"{first['variant']}, {first['split']} tasks, {first['trials']} trials")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
