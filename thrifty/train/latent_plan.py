"""Latent plans (EchoRL, issue 19, part 3): a trajectory encoder whose plan vector conditions the planner as a soft
prompt inside the current observation's span.

    observation j's tokens -> mean input embedding e_j [d]          (detached: the encoder learns, not the table)
    z_t = GRU(e_{t-k+1}, ..., e_t)   [d_plan]                        (the last k observations, zero-padded on the left)
    delta_t = W z_t + b              [d]   (W, b zero-initialised: at the start the planner is exactly the BC one)
    input embedding of observation t's first token += delta_t

The soft prompt sits on a token of the *current* observation, so everything before it (the stable prefix, its
keys and values in a kept session) is untouched, and once later observations arrive it is a fixed part of the
prefix: prefix reuse stays exact and its hit rate unchanged (`tests/test_planner_rl.py`).

EchoRL's temporal smoothing ||z_t - z_{t-1}||^2 / (2 sigma^2) uses sigma = 0.01, which makes it ~5000 ||dz||^2
(../shared/research/seed-erecap-echorl.md, B8). Here it is averaged over the plan's dimensions with sigma = 0.5:
z is a GRU state in (-1, 1)^d_plan, so the term is at most 8 and of order 1 or below; `plan_smooth` weighs it.
"""

from __future__ import annotations

import torch
from torch import nn

SMOOTH_SIGMA = 0.5


class PlanEncoder(nn.Module):
    def __init__(self, d_model: int, d_plan: int = 32, window: int = 4) -> None:
        super().__init__()
        if window < 1 or d_plan < 1:
            raise ValueError(f"need window >= 1 and d_plan >= 1, got {window}, {d_plan}")
        self.window = window
        self.gru = nn.GRU(d_model, d_plan, batch_first=True)
        self.out = nn.Linear(d_plan, d_model)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs [N, d] (each observation's mean embedding, in order) -> z [N, d_plan], delta [N, d]: row t from the
        window of observations t-k+1..t."""
        n, d = obs.shape
        k = self.window
        padded = torch.cat([obs.new_zeros(k - 1, d), obs])  # [N + k - 1, d]
        windows = padded.unfold(0, k, 1).transpose(1, 2)  # [N, k, d]
        _, h = self.gru(windows)
        z = h[-1]
        return z, self.out(z)


def smoothing(z: torch.Tensor) -> torch.Tensor:
    """mean over t of ||z_t - z_{t-1}||^2 / (2 sigma^2 d_plan); 0 for a single plan."""
    if z.shape[0] < 2:
        return z.new_zeros(())
    dz = z[1:] - z[:-1]
    return dz.pow(2).mean() / (2 * SMOOTH_SIGMA ** 2)


def observation_embeddings(model, ids: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """ids [T], spans [(start, end)] of the observations -> [N, d] mean input embedding of each, detached."""
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
    return torch.stack([emb[a:b].mean(0) for a, b in spans])
