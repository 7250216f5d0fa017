"""PPO's model-free pieces (Schulman et al., 2017): generalised advantage estimation and the clipped objective with
a value loss, an entropy bonus and a KL guard against a reference policy (the behaviour-cloned planner)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class PPOSettings(Protocol):
    """What the objective reads (a `PPORecipe` has them)."""

    clip: float
    value_coef: float
    entropy_coef: float
    kl_coef: float


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over one episode that ends after its last decision (no bootstrap):
    rewards, values [N] -> advantages, returns [N]; delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma
    lam A_{t+1}, returns = A + V."""
    n = rewards.shape[0]
    adv = torch.zeros(n, dtype=torch.float32)
    running = 0.0
    for t in range(n - 1, -1, -1):
        next_v = float(values[t + 1]) if t + 1 < n else 0.0
        delta = float(rewards[t]) + gamma * next_v - float(values[t])
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, adv + values.detach().float()


@dataclass
class LossTerms:
    total: torch.Tensor
    policy: float
    value: float
    entropy: float
    kl_bc: float
    approx_kl: float
    clip_fraction: float
    ratio_mean: float


def ppo_loss(logp: torch.Tensor, values: torch.Tensor, actions: torch.Tensor, old_logp: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, bc_logp: torch.Tensor, recipe: PPOSettings) -> LossTerms:
    """The PPO objective over N decisions: logp, bc_logp [N, A]; values, old_logp, advantages, returns [N];
    actions [N] long. loss = -mean(min(r A, clip(r, 1-c, 1+c) A)) + c_v mean((V - R)^2) - c_e H + c_kl KL(pi||BC),
    r = exp(logp[a] - old_logp)."""
    taken = logp.gather(-1, actions[:, None]).squeeze(-1)
    ratio = torch.exp(taken - old_logp)
    clipped = ratio.clamp(1 - recipe.clip, 1 + recipe.clip)
    policy = -torch.minimum(ratio * advantages, clipped * advantages).mean()
    value = (values - returns).pow(2).mean()
    p = logp.exp()
    entropy = -(p * logp).sum(-1).mean()
    kl_bc = (p * (logp - bc_logp)).sum(-1).mean()
    total = policy + recipe.value_coef * value - recipe.entropy_coef * entropy + recipe.kl_coef * kl_bc
    with torch.no_grad():
        approx_kl = float((old_logp - taken).mean())
        clip_fraction = float(((ratio - 1).abs() > recipe.clip).float().mean())
    return LossTerms(total, policy.item(), value.item(), entropy.item(), kl_bc.item(), approx_kl, clip_fraction,
                     ratio.mean().item())
