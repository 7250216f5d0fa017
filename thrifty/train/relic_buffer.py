"""The trial-long rollout buffer of ReLIC's partial-update PPO (Elawady et al. 2024; research/seed-relic.md §4, §12.4):
every step of a trial of B environments, GAE cut at episode boundaries, the shuffle of completed episodes.

Step t of environment b holds what the policy acted on and what followed:
    obs [B, N, D], action [B, N], logp [B, N] (the behaviour log-probability at acting time), value [B, N],
    reward [B, N] (after the action), episode_start [B, N] (obs_t is the first observation of an episode).
The token of step t reads the previous step's action and reward (`inputs`); at an episode start they are ignored by
the policy, so moving whole episodes (`shuffle_episodes`) keeps every token well formed.
"""

from __future__ import annotations

import torch


def gae(rewards: torch.Tensor, values: torch.Tensor, episode_end: torch.Tensor, gamma: float = 0.99,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, T], cut at episode ends: episode_end[b, t] means step t is the
    last of its episode (no bootstrap past it). Darkroom episodes last a fixed horizon and the policy sees its step
    in the episode, so an episode end is terminal. The last step must end an episode (updates fall on episode
    boundaries). -> (advantages, returns = advantages + values), both [B, T]."""
    if rewards.shape != values.shape or rewards.shape != episode_end.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and episode_end "
                         f"{tuple(episode_end.shape)} must have the same [B, T] shape")
    if rewards.shape[1] and not bool(episode_end[:, -1].all()):
        raise ValueError("the last step must end an episode: updates fall on episode boundaries")
    adv = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        go_on = (~episode_end[:, t]).to(values.dtype)
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value * go_on - values[:, t]
        running = delta + gamma * lam * go_on * running
        adv[:, t] = running
    return adv, adv + values


class TrialBuffer:
    """Steps 0..N-1 of one trial of B environments (see the module docstring for the fields)."""

    FIELDS = ("obs", "action", "logp", "value", "reward", "episode_start")

    def __init__(self, batch: int, steps: int, obs_dim: int) -> None:
        self.batch, self.steps = batch, steps
        self.obs = torch.zeros(batch, steps, obs_dim)
        self.action = torch.zeros(batch, steps, dtype=torch.long)
        self.logp = torch.zeros(batch, steps)
        self.value = torch.zeros(batch, steps)
        self.reward = torch.zeros(batch, steps)
        self.episode_start = torch.zeros(batch, steps, dtype=torch.bool)
        self.filled = 0

    def add(self, t: int, obs, action, logp, value, reward, episode_start) -> None:
        """Write step t (each argument [B, ...]); steps are written in order."""
        if t != self.filled or t >= self.steps:
            raise IndexError(f"step {t} written after {self.filled} of {self.steps} steps")
        self.obs[:, t] = torch.as_tensor(obs, dtype=torch.float32)
        self.action[:, t] = torch.as_tensor(action)
        self.logp[:, t] = torch.as_tensor(logp)
        self.value[:, t] = torch.as_tensor(value)
        self.reward[:, t] = torch.as_tensor(reward, dtype=torch.float32)
        self.episode_start[:, t] = torch.as_tensor(episode_start)
        self.filled = t + 1

    def inputs(self, t: int, rows: torch.Tensor | None = None):
        """The policy's inputs for steps [0, t) -> (obs, prev_action, prev_reward, episode_start), each [B', t]."""
        pick = (lambda x: x[:, :t]) if rows is None else (lambda x: x[rows, :t])
        obs, action, reward, start = pick(self.obs), pick(self.action), pick(self.reward), pick(self.episode_start)
        prev_action = torch.cat([torch.zeros_like(action[:, :1]), action[:, :-1]], 1)
        prev_reward = torch.cat([torch.zeros_like(reward[:, :1]), reward[:, :-1]], 1)
        return obs, prev_action, prev_reward, start

    def episode_end(self, t: int) -> torch.Tensor:
        """[B, t] bool: step i is the last of its episode within [0, t) (the next step starts one, or i = t - 1)."""
        end = torch.ones(self.batch, t, dtype=torch.bool)
        end[:, :-1] = self.episode_start[:, 1:t]
        return end

    def advantages(self, t: int, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE over [0, t) with the stored (refreshed) values -> (advantages, returns), each [B, t]."""
        return gae(self.reward[:, :t], self.value[:, :t], self.episode_end(t), gamma, lam)

    def shuffle_episodes(self, t: int, generator: torch.Generator) -> None:
        """Permute the order of the completed episodes in [0, t) of every environment (ReLIC's
        `shuffle_old_episodes`): each episode's steps, and its start flag, move together; steps at and after t
        stay. Call it at an episode boundary (step t - 1 ends an episode): the trainer's updates fall there."""
        for b in range(self.batch):
            starts = torch.nonzero(self.episode_start[b, :t]).flatten().tolist()
            if not starts or starts[0] != 0:
                raise ValueError(f"environment {b}: the trial does not start with an episode start")
            bounds = list(zip(starts, starts[1:] + [t]))
            order = torch.randperm(len(bounds), generator=generator).tolist()
            index = torch.cat([torch.arange(*bounds[i]) for i in order])
            for name in self.FIELDS:
                x = getattr(self, name)
                x[b, :t] = x[b, index]
