"""Recipe: LRAM's action models on Meta-World demonstrations (`thrifty train action-model --arch xlstm|mamba|dt`).

Reads top to bottom:
1. read the demonstrations (`thrifty collect metaworld`) and cut them into episodes; per step the state, the
   reward, the return-to-go (the sum of the episode's rewards from that step on) and the expert's action (label);
2. sample training windows of `context_steps` consecutive steps (LRAM: 50) starting anywhere in an episode,
   zero-padded with a mask at the end of short episodes;
3. train the model (`thrifty.agents.action_model`) with AdamW, warm-up and cosine decay, gradient clipping, on
   cross-entropy over the action bins; the three architectures share data, steps, window and a parameter budget;
4. save `model.safetensors` + `card.json`: recipe, command, data, parameters, loss curve and the target return per
   task the policy is conditioned on (the best return among that task's training episodes).
Metric names: `losses/train_ce`, `losses/heldout_ce` (the last `heldout_episodes` episodes of each task).
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

from thrifty.agents.action_model import ActionModel, ActionModelConfig, save_action_model
from thrifty.train.demos import DemoSet


@dataclass
class ActionModelRecipe:
    arch: str = "xlstm"
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    context_steps: int = 50
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 0.25
    heldout_episodes: int = 5
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 250
    log_every: int = 50

    def fingerprint(self, data_id: str) -> str:
        fields = {k: v for k, v in asdict(self).items() if k not in ("threads", "checkpoint_every", "log_every")}
        return hashlib.sha256(json.dumps([fields, data_id], sort_keys=True).encode()).hexdigest()[:16]

    def model_config(self) -> ActionModelConfig:
        return ActionModelConfig(self.arch, d_model=self.d_model, layers=self.layers, heads=self.heads,
                                 context_steps=self.context_steps)


def episodes_of(demos: DemoSet) -> list[dict[str, np.ndarray]]:
    """Every demonstration episode as arrays: state (T, 39), action (T, 4), reward (T,), rtg (T,), task."""
    out = []
    for task, arrays in demos.shard_arrays():
        ep = np.asarray(arrays["episode"])
        for seed in np.unique(ep):
            rows = np.flatnonzero(ep == seed)
            reward = np.asarray(arrays["reward"][rows], np.float32)
            out.append({"task": task, "seed": int(seed), "state": np.asarray(arrays["state"][rows], np.float32),
                        "action": np.asarray(arrays["action"][rows], np.float32), "reward": reward,
                        "rtg": np.cumsum(reward[::-1])[::-1].astype(np.float32).copy()})
    return out


def sample_windows(episodes: list[dict], n: int, steps: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """n windows of `steps` consecutive steps (episodes drawn proportionally to length); mask marks real steps."""
    lengths = np.array([len(e["reward"]) for e in episodes], np.float64)
    picks = rng.choice(len(episodes), size=n, p=lengths / lengths.sum())
    batch = {k: np.zeros((n, steps) + shape, np.float32) for k, shape in
             (("state", (39,)), ("action", (4,)), ("reward", ()), ("rtg", ()), ("mask", ()))}
    for i, j in enumerate(picks):
        e = episodes[j]
        start = int(rng.integers(0, max(1, len(e["reward"]) - steps + 1)))
        sl = slice(start, start + steps)
        t = len(e["reward"][sl])
        for k in ("state", "action", "reward", "rtg"):
            batch[k][i, :t] = e[k][sl]
        batch["mask"][i, :t] = 1.0
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def _lr(recipe: ActionModelRecipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = min(1.0, (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps))
    return recipe.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def train_action_model(recipe: ActionModelRecipe, data_dir: str | Path, out_dir: str | Path, run_dir: str | Path,
                       command: str = "", progress: bool = True) -> Path:
    """Run the recipe; resumes from `run_dir/checkpoint.pt` when recipe and data match."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    torch.set_num_threads(recipe.threads)
    demos = DemoSet(data_dir)
    data_id = hashlib.sha256(json.dumps(demos.manifest["shards"], sort_keys=True).encode()).hexdigest()[:16]
    fingerprint = recipe.fingerprint(data_id)
    episodes = episodes_of(demos)
    by_task: dict[str, list] = {}
    for e in episodes:
        by_task.setdefault(e["task"], []).append(e)
    heldout = [e for eps in by_task.values() for e in eps[-recipe.heldout_episodes:]] if recipe.heldout_episodes else []
    held_ids = {(e["task"], e["seed"]) for e in heldout}
    train = [e for e in episodes if (e["task"], e["seed"]) not in held_ids]
    targets = {t: float(max(e["rtg"][0] for e in eps if (t, e["seed"]) not in held_ids)) for t, eps in by_task.items()}

    torch.manual_seed(recipe.seed)
    model = ActionModel(recipe.model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    rng = np.random.default_rng(recipe.seed)
    held_batch = sample_windows(heldout, 64, recipe.context_steps, np.random.default_rng(12345)) if heldout else None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    step, curve, seconds = 0, [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["fingerprint"] == fingerprint:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            rng.bit_generator.state = state["rng"]
            step, curve, seconds = state["step"], state["curve"], state["seconds"]
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), disable=not progress)
    with bar:
        task = bar.add_task(f"action model ({recipe.arch}, {len(train)} episodes)", total=recipe.steps, completed=step)
        t0, running = time.perf_counter(), []
        while step < recipe.steps:
            b = sample_windows(train, recipe.batch_size, recipe.context_steps, rng)
            for g in opt.param_groups:
                g["lr"] = _lr(recipe, step)
            loss = model.train().loss(b["state"], b["rtg"], b["reward"], b["action"], act_dim=4, mask=b["mask"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            running.append(loss.item())
            step += 1
            bar.advance(task)
            if step % recipe.log_every == 0 or step == recipe.steps:
                held = None
                if held_batch is not None:
                    with torch.no_grad():
                        held = model.eval().loss(held_batch["state"], held_batch["rtg"], held_batch["reward"],
                                                 held_batch["action"], act_dim=4, mask=held_batch["mask"]).item()
                curve.append({"step": step, "losses/train_ce": float(np.mean(running)), "losses/heldout_ce": held,
                              "wall_s": round(seconds + time.perf_counter() - t0, 2)})
                running = []
            if step % recipe.checkpoint_every == 0 or step == recipe.steps:
                torch.save({"fingerprint": fingerprint, "model": model.state_dict(), "opt": opt.state_dict(),
                            "rng": rng.bit_generator.state, "step": step, "curve": curve,
                            "seconds": seconds + time.perf_counter() - t0}, ckpt)
        seconds += time.perf_counter() - t0
    card = {"recipe": asdict(recipe), "command": command, "train_seconds": round(seconds, 1),
            "parameters": sum(p.numel() for p in model.parameters()),
            "backbone_parameters": sum(p.numel() for p in model.backbone.parameters()),
            "target_returns": targets,
            "data": {"dir": str(data_dir), "tasks": list(demos.tasks), "settings": demos.settings,
                     "train_episodes": len(train), "heldout_episodes": len(heldout)},
            "curve": curve, "final": curve[-1] if curve else {}}
    return save_action_model(model.eval(), out_dir, card)
