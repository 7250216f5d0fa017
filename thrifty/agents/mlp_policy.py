"""The behaviour-cloned MLP policy: state and task in, action out; the reference the sequence policies must beat.

    x = [ (state - mean) / std  (39,) ; task embedding (E,) ]  ->  L x (Linear, GELU)  ->  Linear -> tanh -> (4,)

The task embedding is indexed by the task's position in `thrifty.envs.metaworld.TASKS` (all 50 rows exist, only
the trained tasks' rows are learnt). A checkpoint is a directory: `model.safetensors` (weights and the state
normalisation) and `card.json` (architecture, recipe, data, metrics). FLOPs per step: 2 * in * out per linear
layer (the matmuls; activations, the normalisation and the tanh are left out, as in nanoGPT's estimate).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from thrifty.cost import CostRecord, Stopwatch

KIND = "thrifty-mlp-policy"


@dataclass(frozen=True)
class MLPConfig:
    state_dim: int = 39
    action_dim: int = 4
    n_tasks: int = 50
    task_dim: int = 32
    hidden: int = 512
    layers: int = 3

    def __post_init__(self) -> None:
        if min(self.state_dim, self.action_dim, self.n_tasks, self.task_dim, self.hidden, self.layers) < 1:
            raise ValueError(f"every MLPConfig field must be >= 1, got {self}")


class MLPPolicyNet(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.task_embedding = nn.Embedding(cfg.n_tasks, cfg.task_dim)
        dims = [cfg.state_dim + cfg.task_dim] + [cfg.hidden] * cfg.layers
        self.body = nn.Sequential(*[m for i in range(cfg.layers) for m in (nn.Linear(dims[i], dims[i + 1]), nn.GELU())])
        self.head = nn.Linear(cfg.hidden, cfg.action_dim)
        self.register_buffer("state_mean", torch.zeros(cfg.state_dim))
        self.register_buffer("state_std", torch.ones(cfg.state_dim))

    def forward(self, state: torch.Tensor, task_id: torch.Tensor) -> torch.Tensor:
        """state (B, 39), task_id (B,) long -> action (B, 4) in [-1, 1]."""
        x = (state - self.state_mean) / self.state_std
        x = torch.cat([x, self.task_embedding(task_id)], dim=-1)  # (B, 39 + E)
        return torch.tanh(self.head(self.body(x)))

    def flops_per_step(self) -> int:
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        return sum(2 * m.in_features * m.out_features for m in linears)


def save_policy(net: MLPPolicyNet, out: str | Path, card: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    card = {"kind": KIND, "config": asdict(net.cfg), **card}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out


class PolicyLoadError(ValueError):
    """A policy directory that is missing, incomplete, or of another kind of policy."""


def load_policy_net(path: str | Path) -> tuple[MLPPolicyNet, dict]:
    from safetensors.torch import load_file

    p = Path(path)
    card_file, weights = p / "card.json", p / "model.safetensors"
    if not card_file.is_file() or not weights.is_file():
        raise PolicyLoadError(f"no MLP policy at {p}: expected card.json and model.safetensors "
                              "(build one with `thrifty train policy`)")
    card = json.loads(card_file.read_text())
    if card.get("kind") != KIND:
        raise PolicyLoadError(f"{p} holds a {card.get('kind')!r} checkpoint, not an MLP policy ({KIND!r})")
    net = MLPPolicyNet(MLPConfig(**card["config"]))
    try:
        net.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise PolicyLoadError(f"{weights} does not match the architecture its card describes: {e}") from e
    return net.eval(), card


class MLPPolicy:
    """The policy protocol over an `MLPPolicyNet` (one forward per step, batch 1, no state between steps)."""

    name = "bc-mlp"

    def __init__(self, net: MLPPolicyNet, card: dict | None = None) -> None:
        self.net = net.eval()
        self.card = card or {}
        self._flops = net.flops_per_step()
        self._task = None

    @classmethod
    def load(cls, path: str | Path) -> "MLPPolicy":
        return cls(*load_policy_net(path))

    def reset(self, task: str, instruction: str) -> None:
        from thrifty.envs.metaworld import TASKS

        trained = self.card.get("data", {}).get("tasks")
        if trained and task not in trained:
            raise ValueError(f"this policy was trained on {trained}, not on {task!r}")
        self._task = torch.tensor([TASKS.index(task)])

    @torch.inference_mode()
    def act(self, observation: dict[str, Any]) -> "PolicyStep":
        from thrifty.agents.policy import PolicyStep

        if self._task is None:
            raise RuntimeError("MLPPolicy.act before reset(task, instruction)")
        with Stopwatch() as sw:
            state = torch.from_numpy(np.asarray(observation["state"], dtype=np.float32)).unsqueeze(0)
            action = self.net(state, self._task)[0].numpy()
        return PolicyStep(action, CostRecord(flops=self._flops, wall_s=sw.seconds))
