"""Recipe: the behaviour-cloned MLP policy on Meta-World demonstrations (`thrifty train policy`).

Reads top to bottom:
1. read the demonstrations (`thrifty collect metaworld`, `thrifty.train.demos`): every step's state, task id and
   the expert's action (the label; under DART noise the executed action differs, the label never does);
2. normalise the state by the data's mean and std (stored in the checkpoint);
3. train `MLPPolicyNet` with AdamW and a cosine schedule on mean squared error over the 4 action dimensions,
   minibatches drawn uniformly over all steps of all tasks, checkpointing so an interrupted run resumes;
4. save `model.safetensors` + `card.json` (recipe, command, data, seed, loss curve); closed-loop success is
   measured by `thrifty bench metaworld` and written into the card with `--write-card`.
Metric names: `losses/train_mse` per logged step, `losses/heldout_mse` on the held-out episodes (the last
`heldout_episodes` of each task's demonstrations, never trained on).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from thrifty.agents.mlp_policy import MLPConfig, MLPPolicyNet, save_policy
from thrifty.train.demos import DemoDirError, DemoSet


@dataclass
class BCRecipe:
    hidden: int = 512
    """width of each hidden layer"""
    layers: int = 3
    """hidden layers"""
    task_dim: int = 32
    """task embedding size"""
    steps: int = 10_000
    """optimisation steps"""
    batch_size: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 1e-4
    heldout_episodes: int = 5
    """episodes per task kept out of training to measure held-out MSE"""
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 1000
    log_every: int = 100

    def fingerprint(self, data_id: str) -> str:
        """Identifies a run: a checkpoint resumes only under the same recipe and data (threads never matter)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("threads", "checkpoint_every", "log_every")}
        return hashlib.sha256(json.dumps([fields, data_id], sort_keys=True).encode()).hexdigest()[:16]


def _split(demos: DemoSet, heldout: int) -> tuple[dict, dict]:
    data = demos.arrays(names=("state", "action", "task_id", "episode"))
    train = np.ones(len(data["episode"]), bool)
    for task_id in np.unique(data["task_id"]):
        rows = data["task_id"] == task_id
        seeds = np.unique(data["episode"][rows])
        if heldout and len(seeds) > heldout:
            train &= ~(rows & np.isin(data["episode"], seeds[-heldout:]))
    return ({k: v[train] for k, v in data.items()}, {k: v[~train] for k, v in data.items()})


def _lr(recipe: BCRecipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def _mse(net: MLPPolicyNet, data: dict) -> float | None:
    if len(data["state"]) == 0:
        return None
    pred = net(torch.from_numpy(data["state"]), torch.from_numpy(data["task_id"].astype(np.int64)))
    return float(((pred - torch.from_numpy(data["action"])) ** 2).mean())


def train_policy(recipe: BCRecipe, data_dir: str | Path, out_dir: str | Path, run_dir: str | Path,
                 command: str = "", progress: bool = True) -> Path:
    """Run the recipe on `data_dir`; resumes from `run_dir/checkpoint.pt` when recipe and data match."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    torch.set_num_threads(recipe.threads)
    demos = DemoSet(data_dir)
    if demos.settings.get("domain", "metaworld") != "metaworld":
        raise DemoDirError(f"{data_dir} holds {demos.settings['domain']} demonstrations; the BC MLP policy acts on "
                           "Meta-World (`thrifty collect metaworld`); train an action model on them instead "
                           "(`thrifty train action-model --data DIR`)")
    data_id = hashlib.sha256(json.dumps(demos.manifest["shards"], sort_keys=True).encode()).hexdigest()[:16]
    fingerprint = recipe.fingerprint(data_id)
    train, heldout = _split(demos, recipe.heldout_episodes)
    n = len(train["state"])
    torch.manual_seed(recipe.seed)
    net = MLPPolicyNet(MLPConfig(hidden=recipe.hidden, layers=recipe.layers, task_dim=recipe.task_dim))
    net.state_mean.copy_(torch.from_numpy(train["state"].mean(0)))
    net.state_std.copy_(torch.from_numpy(train["state"].std(0)).clamp_min(1e-3))
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    step, curve, seconds = 0, [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["fingerprint"] == fingerprint:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            step, curve, seconds = state["step"], state["curve"], state["seconds"]
    states = torch.from_numpy(train["state"])
    actions = torch.from_numpy(train["action"])
    tasks = torch.from_numpy(train["task_id"].astype(np.int64))
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), disable=not progress)
    with bar:
        task = bar.add_task(f"BC policy ({n:,} steps of data)", total=recipe.steps, completed=step)
        t0, running = time.perf_counter(), []
        while step < recipe.steps:
            idx = torch.randint(0, n, (recipe.batch_size,), generator=gen)
            for g in opt.param_groups:
                g["lr"] = _lr(recipe, step)
            loss = ((net(states[idx], tasks[idx]) - actions[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running.append(loss.item())
            step += 1
            bar.advance(task)
            if step % recipe.log_every == 0 or step == recipe.steps:
                curve.append({"step": step, "losses/train_mse": float(np.mean(running)),
                              "losses/heldout_mse": _mse(net.eval(), heldout),
                              "wall_s": round(seconds + time.perf_counter() - t0, 2)})
                net.train()
                running = []
            if step % recipe.checkpoint_every == 0 or step == recipe.steps:
                seconds_now = seconds + time.perf_counter() - t0
                torch.save({"fingerprint": fingerprint, "model": net.state_dict(), "opt": opt.state_dict(),
                            "gen": gen.get_state(), "step": step, "curve": curve, "seconds": seconds_now}, ckpt)
        seconds += time.perf_counter() - t0
    card = {"recipe": asdict(recipe), "command": command, "train_seconds": round(seconds, 1),
            "parameters": sum(p.numel() for p in net.parameters()), "flops_per_step": net.flops_per_step(),
            "data": {"dir": str(data_dir), "tasks": list(demos.tasks), "settings": demos.settings,
                     "counts": demos.counts(), "train_steps": n, "heldout_steps": int(len(heldout["state"]))},
            "curve": curve, "final": curve[-1] if curve else {}}
    return save_policy(net.eval(), out_dir, card)
