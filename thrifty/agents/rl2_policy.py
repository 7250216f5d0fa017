"""RL² (Duan et al. 2016; Wang et al. 2016), ReLIC's recurrent baseline: an LSTM whose state spans the whole trial
(never reset between episodes), over the same per-step tokens as `RelicPolicy`, with actor and critic heads.

It has `RelicPolicy`'s acting and training interface, so `thrifty.train.relic` trains either: `start(batch)`, then
`step(state, obs, prev_action, prev_reward, episode_start)` over T >= 1 steps, and `forward` = one `step` of a whole
trial from a fresh state. Inputs per step, each [B, T]: obs [B, T, obs_dim] (raw), prev_action, prev_reward,
episode_start (bool). Per step it costs the same at any trial length (the state is [2, B, hidden]).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thrifty.agents.relic_policy import SpacesConfig, load_trial_checkpoint, save_trial_policy

CONFIG_FILE = "rl2_policy.json"


@dataclass
class RL2Config(SpacesConfig):
    observation_space: dict[str, Any]
    """`describe_space` of the environment's single observation space (Box, 1-D)"""
    n_actions: int
    d_model: int = 64
    hidden: int = 128
    max_episode_steps: int = 512
    """rows of the within-episode step embedding (as RelicPolicy's); later steps share the last row"""
    seed: int = 0


@dataclass
class RL2State:
    hc: tuple[torch.Tensor, torch.Tensor] | None = None
    """the LSTM's (h, c), each [1, B, hidden]; None before the first step"""
    step: torch.Tensor | None = None
    """[B] index of the last step in its episode"""
    tokens: int = 0


class RL2Policy(nn.Module):
    def __init__(self, config: RL2Config) -> None:
        super().__init__()
        self.config = c = config
        space = c.observation_space
        self.register_buffer("obs_low", torch.tensor(space["low"], dtype=torch.float32), persistent=False)
        self.register_buffer("obs_span", (torch.tensor(space["high"]) - torch.tensor(space["low"])).clamp(min=1e-6)
                             .float(), persistent=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            self.action_embed = nn.Embedding(c.n_actions + 1, c.d_model)  # 0 = episode start
            self.step_embed = nn.Embedding(c.max_episode_steps, c.d_model)
            self.in_proj = nn.Linear(c.obs_dim + 1 + c.d_model, c.d_model)
            self.lstm = nn.LSTM(c.d_model, c.hidden, batch_first=True)
            self.out_proj = nn.Linear(c.hidden, c.d_model)
            self.actor = nn.Linear(c.d_model, c.n_actions)
            self.critic = nn.Linear(c.d_model, 1)

    def start(self, batch: int) -> RL2State:
        return RL2State(step=torch.full((batch,), -1, device=self.obs_low.device))

    def step(self, state: RL2State, obs, prev_action, prev_reward, episode_start):
        """Extend the trial by T >= 1 steps -> (actor logits [B, T, A], values [B, T])."""
        if state.hc is None and not bool(episode_start[:, 0].all()):
            raise ValueError("the first step of a trial must have episode_start=True")
        t = torch.arange(episode_start.shape[1], device=episode_start.device)
        last_start = torch.where(episode_start, t, torch.full_like(t, -1)).cummax(1).values
        step = torch.where(last_start >= 0, t - last_start, state.step[:, None] + 1 + t)
        obs = (obs.float() - self.obs_low) / self.obs_span
        action = torch.where(episode_start, torch.zeros_like(prev_action), prev_action.long() + 1)
        reward = torch.where(episode_start, 0.0, prev_reward.float())[..., None]
        x = self.in_proj(torch.cat([obs, reward, self.action_embed(action)], -1))
        x = x + self.step_embed(step.clamp(max=self.config.max_episode_steps - 1))
        h, state.hc = self.lstm(x, state.hc)
        state.step, state.tokens = step[:, -1], state.tokens + x.shape[1]
        z = torch.relu(self.out_proj(h))
        return self.actor(z), self.critic(z).squeeze(-1)

    def forward(self, obs, prev_action, prev_reward, episode_start):
        return self.step(self.start(obs.shape[0]), obs, prev_action, prev_reward, episode_start)

    def save(self, path: str | Path) -> Path:
        return save_trial_policy(self, path, CONFIG_FILE)

    @classmethod
    def load(cls, path: str | Path, observation_space: Any = None) -> "RL2Policy":
        return load_trial_checkpoint(cls, RL2Config, path, CONFIG_FILE, "RL²", observation_space)


def load_trial_policy(path: str | Path, observation_space: Any = None):
    """A saved RelicPolicy or RL2Policy, whichever `path` holds."""
    from thrifty.agents.relic_policy import CONFIG_FILE as RELIC_CONFIG, RelicPolicy

    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return RL2Policy.load(p, observation_space)
    if (p / RELIC_CONFIG).is_file():
        return RelicPolicy.load(p, observation_space)
    raise FileNotFoundError(f"no trial policy in {p}: expected {RELIC_CONFIG} (ReLIC) or {CONFIG_FILE} (RL²); "
                            "train one with `thrifty train relic`")
