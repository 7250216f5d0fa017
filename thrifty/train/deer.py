"""Recipe: DeeR-VLA's multi-exit policy on Meta-World demonstrations (`thrifty train deer`).

Reads top to bottom:
1. read the demonstrations (`thrifty collect metaworld`): per step the state, the task's instruction and the
   expert's action (the label); the last `heldout_episodes` of each task are kept out for calibration and metrics;
2. draw windows of `window` consecutive steps of one episode (`batch_size` of them per step; a share
   `start_share` start at the episode's first step, the LSTM's state at reset); steps past an episode's end are
   masked out of the loss;
3. every layer's features of every step (`DeerNet.exit_features`), then DeeR's losses, summed with weight 1 each:
   - one linear auxiliary head per exit on that exit's pooled features (training only, never shipped);
   - the shared head over the window on features drawn from a random exit per step (DeeR's strategy 1);
   - the shared head on a two-segment mix: steps before a random cut from one random exit, after it from another
     (strategy 2: the exit depth drifts within an episode);
   each loss is Huber on the 3 arm dimensions plus `gripper_weight` x BCE on the gripper (label: closing, > 0);
4. AdamW, linear warm-up then cosine, gradient clipping; a checkpoint every `checkpoint_every` steps so an
   interrupted run resumes (only under the same recipe and data);
5. calibration (`consistency_scores`): the held-out episodes are replayed step by step, the head's LSTM history
   made of a random exit per step (DeeR's approximation of the real history); at every step the consistency score
   of every exit against the previous one (the first against layer 0). The (exits, steps) matrix is shipped as
   `scores.safetensors`: an exit-ratio budget solves its thresholds on it;
6. save `model.safetensors`, `scores.safetensors` and `card.json` (recipe, command, data, seed, time, curve,
   held-out loss per exit). Closed-loop success is measured by `thrifty bench deer`.
Metric names: `losses/train_total`, `losses/train_strategy1`, `losses/train_strategy2`, `losses/train_aux` per
logged step; `heldout/arm_mse_exit<L>` (L = layers run) at the end.
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
from torch import nn

from thrifty.agents.deer_policy import DeerConfig, DeerNet, save_deer, word_vocabulary
from thrifty.techniques.early_exit import consistency_score
from thrifty.train.demos import DemoDirError, DemoSet


@dataclass
class DeerRecipe:
    d_model: int = 128
    layers: int = 12
    heads: int = 4
    kv_heads: int = 2
    d_ff: int = 256
    exit_every: int = 2
    """an exit after every this many layers"""
    lstm_hidden: int = 128
    mlp_hidden: int = 128
    steps: int = 600
    """optimisation steps (~2.5 s each on one core: ~25 min)"""
    batch_size: int = 32
    """windows per step"""
    window: int = 16
    """consecutive steps per window"""
    start_share: float = 0.25
    """share of windows that start at an episode's first step"""
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    gripper_weight: float = 0.01
    """DeeR's weight of the gripper BCE next to the arm's Huber loss"""
    heldout_episodes: int = 10
    """episodes per task kept out of training: the calibration set of the thresholds, and the held-out metrics"""
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 50
    log_every: int = 10

    def config(self, words: tuple[str, ...]) -> DeerConfig:
        return DeerConfig(words=words, d_model=self.d_model, layers=self.layers, heads=self.heads,
                          kv_heads=self.kv_heads, d_ff=self.d_ff, exit_every=self.exit_every,
                          lstm_hidden=self.lstm_hidden, mlp_hidden=self.mlp_hidden)

    def fingerprint(self, data_id: str) -> str:
        """A checkpoint resumes only under the same recipe and data (threads and logging never matter)."""
        fields = {k: v for k, v in asdict(self).items() if k not in ("threads", "checkpoint_every", "log_every")}
        return hashlib.sha256(json.dumps([fields, data_id], sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- data
@dataclass
class Episodes:
    """The demonstration steps grouped by episode: rows of episode i are starts[i] .. starts[i] + lengths[i] - 1."""

    state: torch.Tensor  # (N, 39)
    action: torch.Tensor  # (N, 4)
    ids: torch.Tensor  # (N, W) the step's instruction ids
    starts: np.ndarray
    lengths: np.ndarray


def _episodes(demos: DemoSet, net_cfg: DeerConfig, heldout: int) -> tuple[Episodes, Episodes]:
    from thrifty.envs.metaworld import TASKS

    data = demos.arrays(names=("state", "action", "task_id", "episode", "step"))
    word_ids = {}
    net_words = {w: i for i, w in enumerate(net_cfg.words)}
    for t, text in demos.manifest["instructions"].items():
        from thrifty.agents.deer_policy import instruction_words

        ids = [net_words.get(w, 1) for w in instruction_words(text)][: net_cfg.instruction_tokens]
        word_ids[TASKS.index(t)] = ids + [0] * (net_cfg.instruction_tokens - len(ids))
    # an episode starts where the step counter restarts (shards hold consecutive episodes of one task)
    starts = np.flatnonzero(data["step"] == 0)
    lengths = np.diff(np.append(starts, len(data["step"])))
    task_of = data["task_id"][starts]
    held = np.zeros(len(starts), bool)
    for t in np.unique(task_of):
        idx = np.flatnonzero(task_of == t)
        if heldout and len(idx) > heldout:
            held[idx[-heldout:]] = True

    def pick(mask: np.ndarray) -> Episodes:
        rows = np.concatenate([np.arange(s, s + n) for s, n in zip(starts[mask], lengths[mask])]) if mask.any() \
            else np.zeros(0, int)
        new_starts = np.concatenate([[0], np.cumsum(lengths[mask])[:-1]]).astype(int) if mask.any() else starts[:0]
        ids = torch.tensor([word_ids[int(t)] for t in data["task_id"][rows]], dtype=torch.long)
        ids = ids.view(len(rows), net_cfg.instruction_tokens)
        return Episodes(torch.from_numpy(np.ascontiguousarray(data["state"][rows])),
                        torch.from_numpy(np.ascontiguousarray(data["action"][rows])), ids, new_starts,
                        lengths[mask].astype(int))

    return pick(~held), pick(held)


def _windows(eps: Episodes, batch: int, window: int, start_share: float,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (B, T) of `batch` windows and their mask (B, T) (False past an episode's end)."""
    e = torch.randint(0, len(eps.starts), (batch,), generator=gen).numpy()
    n = eps.lengths[e]
    u = torch.rand(batch, generator=gen).numpy()
    at_start = torch.rand(batch, generator=gen).numpy() < start_share
    first = np.where(at_start, 0, np.floor(u * np.maximum(1, n - window + 1))).astype(int)
    offs = np.arange(window)[None]
    mask = first[:, None] + offs < n[:, None]
    rows = eps.starts[e][:, None] + np.minimum(first[:, None] + offs, n[:, None] - 1)
    return torch.from_numpy(rows), torch.from_numpy(mask)


# ---------------------------------------------------------------------- losses
def action_loss(arm: torch.Tensor, grip_logit: torch.Tensor, action: torch.Tensor, mask: torch.Tensor,
                gripper_weight: float) -> torch.Tensor:
    """Huber on the arm (..., 3) + weight x BCE on the gripper (..., ) against action (..., 4); mask (...) of steps."""
    a = nn.functional.huber_loss(arm, action[..., :3], reduction="none").mean(-1)
    g = nn.functional.binary_cross_entropy_with_logits(grip_logit, (action[..., 3] > 0).float(), reduction="none")
    m = mask.float()
    return ((a + gripper_weight * g) * m).sum() / m.sum().clamp_min(1)


def _lr(recipe: DeerRecipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def deer_losses(net: DeerNet, aux: nn.ModuleList, ids: torch.Tensor, state: torch.Tensor, action: torch.Tensor,
                mask: torch.Tensor, gripper_weight: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """DeeR's training losses on windows: ids (B, T, W), state (B, T, 39), action (B, T, 4), mask (B, T)."""
    b, t = mask.shape
    feats = net.exit_features(ids.flatten(0, 1), state.flatten(0, 1)).unflatten(1, (b, t))  # (1+E, B, T, d)
    exits = feats[1:]
    n_exits = exits.shape[0]
    aux_loss = sum(action_loss(*_split(head(exits[k])), action, mask, gripper_weight) for k, head in enumerate(aux))
    # strategy 1: a random exit per step
    choice = torch.randint(0, n_exits, (b, t), generator=gen)
    mixed = _gather(exits, choice)
    out = net.head(mixed)
    s1 = action_loss(out.arm, out.gripper_logit, action, mask, gripper_weight)
    # strategy 2: two segments, a random exit each, cut at a random step
    e1, e2 = torch.randint(0, n_exits, (2, b, 1), generator=gen)
    cut = torch.randint(1, t + 1, (b, 1), generator=gen)
    choice2 = torch.where(torch.arange(t)[None] < cut, e1, e2)
    out2 = net.head(_gather(exits, choice2))
    s2 = action_loss(out2.arm, out2.gripper_logit, action, mask, gripper_weight)
    return {"total": aux_loss + s1 + s2, "aux": aux_loss, "strategy1": s1, "strategy2": s2}


def _split(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An auxiliary head's output (..., 4) -> arm in [-1, 1] (..., 3), gripper logit (...)."""
    return torch.tanh(y[..., :3]), y[..., 3]


def _gather(exits: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """exits (E, B, T, d), choice (B, T) -> (B, T, d): each step's features from its chosen exit."""
    idx = choice[None, ..., None].expand(1, *choice.shape, exits.shape[-1])
    return exits.gather(0, idx)[0]


# ---------------------------------------------------------------------- calibration
@torch.no_grad()
def consistency_scores(net: DeerNet, eps: Episodes, seed: int = 0, batch: int = 128) -> tuple[torch.Tensor, dict]:
    """Replay episodes step by step (`batch` at a time), the head's history from a random exit per step; at every
    step every exit's consistency score against the previous exit (the first against layer 0).
    Returns scores (E, N steps) and the held-out arm MSE of every exit (history from that same exit)."""
    gen = torch.Generator().manual_seed(seed)
    n_exits = len(net.exit_layers)
    cols, sq, counts = [], torch.zeros(n_exits), 0
    order = np.argsort(-eps.lengths)
    for chunk in range(0, len(order), batch):
        sel = order[chunk:chunk + batch]
        starts, lengths = eps.starts[sel], eps.lengths[sel]
        state_rand, state_same = None, [None] * n_exits
        for t in range(int(lengths.max())):
            live = lengths > t
            rows = torch.from_numpy(starts + np.minimum(t, lengths - 1))
            feats = net.exit_features(eps.ids[rows], eps.state[rows])  # (1+E, B, d)
            outs = [net.head.peek(f, state_rand, gripper=False) for f in feats]
            arms = torch.stack([o.arm for o in outs])  # (1+E, B, 3)
            score = consistency_score(arms[1:], arms[:-1])  # (E, B)
            cols.append(score[:, torch.from_numpy(live)])
            pick = torch.randint(0, n_exits, (len(sel),), generator=gen)
            h = torch.stack([outs[1 + k].state[0] for k in range(n_exits)])  # (E, B, H)
            c = torch.stack([outs[1 + k].state[1] for k in range(n_exits)])
            ar = torch.arange(len(sel))
            state_rand = (h[pick, ar], c[pick, ar])  # each step's history continues from a random exit
            target = eps.action[rows][:, :3]
            for k in range(n_exits):
                o = net.head.peek(feats[1 + k], state_same[k], gripper=False)
                state_same[k] = o.state
                sq[k] += ((o.arm - target) ** 2).mean(-1)[torch.from_numpy(live)].sum()
            counts += int(live.sum())
    mse = {f"heldout/arm_mse_exit{e}": float(sq[k] / max(1, counts)) for k, e in enumerate(net.exit_layers)}
    return torch.cat(cols, 1), mse


# ---------------------------------------------------------------------- the run
def train_deer(recipe: DeerRecipe, data_dir: str | Path, out_dir: str | Path, run_dir: str | Path,
               command: str = "", progress: bool = True) -> Path:
    """Run the recipe on `data_dir`; resumes from `run_dir/checkpoint.pt` when recipe and data match."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    torch.set_num_threads(recipe.threads)
    demos = DemoSet(data_dir)
    if demos.settings.get("domain", "metaworld") != "metaworld":
        raise DemoDirError(f"{data_dir} holds {demos.settings['domain']} demonstrations; the DeeR policy acts on "
                           "Meta-World (`thrifty collect metaworld`)")
    data_id = hashlib.sha256(json.dumps(demos.manifest["shards"], sort_keys=True).encode()).hexdigest()[:16]
    fingerprint = recipe.fingerprint(data_id)
    torch.manual_seed(recipe.seed)
    cfg = recipe.config(word_vocabulary(demos.manifest["instructions"].values()))
    net = DeerNet(cfg)
    train, heldout = _episodes(demos, cfg, recipe.heldout_episodes)
    if len(train.starts) == 0:
        raise DemoDirError(f"{data_dir}: no training episodes left after holding out {recipe.heldout_episodes} per "
                           "task; collect more episodes or lower heldout_episodes")
    net.state_mean.copy_(train.state.mean(0))
    net.state_std.copy_(train.state.std(0).clamp_min(1e-3))
    aux = nn.ModuleList(nn.Linear(cfg.d_model, cfg.arm_dim + 1) for _ in cfg.exit_layers)
    params = [*net.parameters(), *aux.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.pt"
    step, curve, seconds = 0, [], 0.0
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        if saved["fingerprint"] == fingerprint:
            net.load_state_dict(saved["model"])
            aux.load_state_dict(saved["aux"])
            opt.load_state_dict(saved["opt"])
            gen.set_state(saved["gen"])
            step, curve, seconds = saved["step"], saved["curve"], saved["seconds"]
    net.train()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), TextColumn("{task.fields[loss]}"), disable=not progress)
    with bar:
        task = bar.add_task(f"DeeR policy ({len(train.state):,} steps of data)", total=recipe.steps,
                            completed=step, loss="")
        t0, running = time.perf_counter(), []
        while step < recipe.steps:
            rows, mask = _windows(train, recipe.batch_size, recipe.window, recipe.start_share, gen)
            for g in opt.param_groups:
                g["lr"] = _lr(recipe, step)
            losses = deer_losses(net, aux, train.ids[rows], train.state[rows], train.action[rows], mask,
                                 recipe.gripper_weight, gen)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step()
            running.append({k: float(v.detach()) for k, v in losses.items()})
            step += 1
            if step % recipe.log_every == 0 or step == recipe.steps:
                mean = {f"losses/train_{k}": float(np.mean([r[k] for r in running])) for k in running[0]}
                curve.append({"step": step, **mean, "wall_s": round(seconds + time.perf_counter() - t0, 2)})
                running = []
                bar.update(task, loss=f"loss {mean['losses/train_total']:.4f}")
            bar.advance(task)
            if step % recipe.checkpoint_every == 0 or step == recipe.steps:
                torch.save({"fingerprint": fingerprint, "model": net.state_dict(), "aux": aux.state_dict(),
                            "opt": opt.state_dict(), "gen": gen.get_state(), "step": step, "curve": curve,
                            "seconds": seconds + time.perf_counter() - t0}, ckpt)
        seconds += time.perf_counter() - t0
    net.eval()
    t1 = time.perf_counter()
    scores, heldout_mse = consistency_scores(net, heldout if len(heldout.starts) else train, seed=recipe.seed)
    card = {"recipe": asdict(recipe), "command": command, "seed": recipe.seed,
            "train_seconds": round(seconds, 1), "calibration_seconds": round(time.perf_counter() - t1, 1),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "parameters": sum(p.numel() for p in net.parameters()),
            "backbone_parameters": sum(p.numel() for p in net.llm.parameters()),
            "data": {"dir": str(data_dir), "tasks": list(demos.tasks), "settings": demos.settings,
                     "counts": demos.counts(), "train_steps": int(len(train.state)),
                     "heldout_steps": int(len(heldout.state)), "heldout_episodes_per_task": recipe.heldout_episodes},
            "scores": {"file": "scores.safetensors", "shape": list(scores.shape),
                       "what": "consistency score (RMS arm difference with the previous exit) per exit and held-out "
                               "step, history from random exits",
                       "median_per_exit": [float(x) for x in scores.median(1).values]},
            "heldout": heldout_mse, "curve": curve, "final": curve[-1] if curve else {}}
    return save_deer(net, out_dir, card, scores=scores)
