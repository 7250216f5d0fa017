"""Recipe: LRAM's action models on Meta-World demonstrations (`thrifty train action-model --arch xlstm|mamba|dt`).

Reads top to bottom:
1. read the demonstrations (`thrifty collect metaworld`, and for a second domain `thrifty collect babyai`) and cut
   them into episodes; per step the state, the reward, the return-to-go (the sum of the episode's rewards from that
   step on) and the expert's action (label);
2. sample training windows of `context_steps` consecutive steps (LRAM: 50) starting anywhere in an episode,
   zero-padded with a mask at the end of short episodes;
3. train the model (`thrifty.agents.action_model`) with AdamW, warm-up and cosine decay, gradient clipping, on
   cross-entropy over the action vocabulary; the three architectures share data, steps, window and a parameter
   budget. With several demonstration directories (domains), every optimiser step takes one batch per domain
   (LRAM's single-domain batches) and averages their losses;
4. save `model.safetensors` + `card.json`: recipe, command, data, parameters, loss curve and the target return per
   task the policy is conditioned on (the best return among that task's training episodes).
Metric names: `losses/train_ce`, `losses/heldout_ce` (the last `heldout_episodes` episodes of each task), averaged
over domains, and with several domains `losses/heldout_ce/<domain>` too.
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

    def model_config(self, domains: tuple[str, ...] = ("metaworld",)) -> ActionModelConfig:
        return ActionModelConfig.for_domains(self.arch, domains, d_model=self.d_model, layers=self.layers,
                                             heads=self.heads, context_steps=self.context_steps)


def episodes_of(demos: DemoSet) -> list[dict[str, np.ndarray]]:
    """Every demonstration episode as arrays: state (T, S), action (T, A) (Meta-World 39 and 4, BabyAI 151 and 1),
    reward (T,), rtg (T,), task, seed."""
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
    first = episodes[0]
    batch = {k: np.zeros((n, steps) + shape, np.float32) for k, shape in
             (("state", first["state"].shape[1:]), ("action", first["action"].shape[1:]), ("reward", ()),
              ("rtg", ()), ("mask", ()))}
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


@dataclass
class DomainData:
    """One domain's demonstrations, split by episode into training and held-out ones."""

    name: str
    train: list[dict]
    heldout: list[dict]
    targets: dict[str, float]
    """per task: the best return among its training episodes (what the policy is conditioned on)"""


def split_domain(demos: DemoSet, heldout_per_task: int) -> DomainData:
    by_task: dict[str, list] = {}
    for e in episodes_of(demos):
        by_task.setdefault(e["task"], []).append(e)
    few = {t: len(eps) for t, eps in by_task.items() if len(eps) <= heldout_per_task}
    if few:
        raise ValueError(f"{demos.root}: tasks {few} have no more episodes than the {heldout_per_task} held out per "
                         "task, so none would be left to train on; collect more episodes")
    heldout = [e for eps in by_task.values() for e in eps[-heldout_per_task:]] if heldout_per_task else []
    held_ids = {(e["task"], e["seed"]) for e in heldout}
    train = [e for eps in by_task.values() for e in eps if (e["task"], e["seed"]) not in held_ids]
    targets = {t: float(max(e["rtg"][0] for e in eps if (t, e["seed"]) not in held_ids)) for t, eps in by_task.items()}
    return DomainData(demos.settings.get("domain", "metaworld"), train, heldout, targets)


def train_action_model(recipe: ActionModelRecipe, data_dir: str | Path | list, out_dir: str | Path,
                       run_dir: str | Path, command: str = "", progress: bool = True) -> Path:
    """Run the recipe on one demonstration directory or several (one per domain); resumes from
    `run_dir/checkpoint.pt` when recipe and data match."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    torch.set_num_threads(recipe.threads)
    dirs = list(data_dir) if isinstance(data_dir, (list, tuple)) else [data_dir]
    sets = [DemoSet(d) for d in dirs]
    ids = [hashlib.sha256(json.dumps(d.manifest["shards"], sort_keys=True).encode()).hexdigest()[:16] for d in sets]
    data_id = ids[0] if len(ids) == 1 else "+".join(ids)
    fingerprint = recipe.fingerprint(data_id)
    domains = [split_domain(d, recipe.heldout_episodes) for d in sets]
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"one demonstration directory per domain, got domains {names} for {[str(d) for d in dirs]}")
    targets = {t: r for d in domains for t, r in d.targets.items()}
    train_eps = sum(len(d.train) for d in domains)

    torch.manual_seed(recipe.seed)
    model = ActionModel(recipe.model_config(tuple(names)))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    rng = np.random.default_rng(recipe.seed)
    held = {d.name: sample_windows(d.heldout, 64, recipe.context_steps, np.random.default_rng(12345))
            for d in domains if d.heldout}
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
        task = bar.add_task(f"action model ({recipe.arch}, {train_eps} episodes, {'+'.join(names)})",
                            total=recipe.steps, completed=step)
        t0, running = time.perf_counter(), []
        while step < recipe.steps:
            for g in opt.param_groups:
                g["lr"] = _lr(recipe, step)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for d in domains:  # one single-domain batch each, losses averaged
                b = sample_windows(d.train, recipe.batch_size, recipe.context_steps, rng)
                loss = model.train().loss(b["state"], b["rtg"], b["reward"], b["action"], d.name, mask=b["mask"])
                (loss / len(domains)).backward()
                total += loss.item() / len(domains)
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            opt.step()
            running.append(total)
            step += 1
            bar.advance(task)
            if step % recipe.log_every == 0 or step == recipe.steps:
                row = {"step": step, "losses/train_ce": float(np.mean(running))}
                if held:
                    with torch.no_grad():
                        per = {n: model.eval().loss(b["state"], b["rtg"], b["reward"], b["action"], n,
                                                    mask=b["mask"]).item() for n, b in held.items()}
                    row["losses/heldout_ce"] = float(np.mean(list(per.values())))
                    if len(domains) > 1:
                        row.update({f"losses/heldout_ce/{n}": v for n, v in per.items()})
                else:
                    row["losses/heldout_ce"] = None
                curve.append(row | {"wall_s": round(seconds + time.perf_counter() - t0, 2)})
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
            "data": [{"dir": str(p), "domain": d.name, "tasks": list(ds.tasks), "settings": ds.settings,
                      "train_episodes": len(d.train), "heldout_episodes": len(d.heldout)}
                     for p, ds, d in zip(dirs, sets, domains)],
            "curve": curve, "final": curve[-1] if curve else {}}
    return save_action_model(model.eval(), out_dir, card)
