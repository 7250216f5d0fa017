"""`thrifty train relic`: partial-update PPO over whole trials (ReLIC, Elawady et al. 2024; research/seed-relic.md §4).

One trial = N steps of B environments in the same task (consecutive episodes, one goal each). Every U = N / K
steps the policy is updated on the whole prefix [0, t) with the loss only on the newest chunk [t - U, t) (a
*partial* update); the K-th update, at the trial's end, puts the loss on all N steps (the *full* update). After
each partial update, with the new weights: the completed episodes are shuffled (their order in the context, each
episode kept whole), then the prefix is re-run to rebuild the acting cache and to refresh the stored values
(ReLIC's update_stale_kv / update_stale_values; the behaviour log-probabilities are kept, as ReLIC does, so the
ratio of old steps is against the policy that acted). K = 1 is the "no partial updates" ablation.

Simplifications against ReLIC's trainer, each a switch or a documented choice:
- updates fall on episode boundaries (U a multiple of the horizon; Darkroom episodes have a fixed length), so GAE
  never bootstraps across an unfinished episode and the in-progress episode never needs to stay last;
- one optimiser step per minibatch of environments (ReLIC accumulates 10 minibatches); synchronous acting.

Metrics (one JSON line per trial in RUN_DIR/metrics.jsonl, fixed names): trial, env_steps, wall_s, lr,
return_episode_first, return_episode_last, return_mean (mean over environments of the per-episode return),
policy_loss, value_loss, entropy, approx_kl, clip_fraction (means over the trial's updates and minibatches).
Checkpoints (RUN_DIR/checkpoint.pt, after every trial) resume the run exactly: weights, optimiser, trial index,
the RNG states. Only `trials` may change on resume (a longer run: the cosine schedule then stretches to the new
end from the current trial on).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from thrifty.agents.relic_policy import sample_action
from thrifty.train.relic_buffer import TrialBuffer


@dataclass
class RelicTrainConfig:
    variant: str = "darkroom-ad"
    """a `thrifty.envs.darkroom` variant; training uses its train split of tasks"""
    arch: str = "relic"
    """relic (the transformer of thrifty.agents.relic_policy) or rl2 (the LSTM baseline)"""
    num_envs: int = 8
    trial_steps: int = 400
    """N: steps per trial (20 episodes of darkroom-ad)"""
    updates_per_trial: int = 4
    """K: updates per trial, every N / K steps; the last one is the full update (K = 1: no partial updates)"""
    trials: int = 200
    epochs: int = 4
    minibatch_envs: int = 4
    lr: float = 3e-4
    lr_min: float = 3e-5
    warmup_steps: int = 10_000
    """env steps of linear warm-up, then cosine annealing to lr_min at the last trial"""
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5
    gamma: float = 0.99
    lam: float = 0.95
    shuffle_episodes: bool = True
    refresh: bool = True
    """rebuild the acting cache and the stored values with the new weights after each partial update"""
    seed: int = 0
    threads: int = 1
    model: dict[str, Any] = field(default_factory=dict)
    """the policy's own settings: RelicConfig's (d_model, n_layers, n_heads, n_kv_heads, d_ff, sink, inter_episode,
    rope, ...) or RL2Config's (d_model, hidden)"""

    def check(self) -> None:
        """Clear errors for settings that cannot train."""
        from thrifty.envs.darkroom import get_spec

        horizon = get_spec(self.variant).horizon
        if self.arch not in ("relic", "rl2"):
            raise ValueError(f"unknown arch {self.arch!r}: use relic (the ReLIC transformer) or rl2 (the LSTM)")
        if self.updates_per_trial < 1 or self.trial_steps % self.updates_per_trial:
            raise ValueError(f"updates per trial K={self.updates_per_trial} must divide the trial's "
                             f"N={self.trial_steps} steps (an update every N / K steps)")
        chunk = self.trial_steps // self.updates_per_trial
        if self.trial_steps < horizon:
            raise ValueError(f"a trial of {self.trial_steps} steps is shorter than one {self.variant} episode "
                             f"({horizon} steps): use at least {horizon}")
        if chunk % horizon:
            raise ValueError(f"an update chunk of N / K = {chunk} steps must hold whole {self.variant} episodes "
                             f"({horizon} steps each): choose N and K so that N / K is a multiple of {horizon}")
        if self.num_envs < 1 or self.minibatch_envs < 1 or self.num_envs % self.minibatch_envs:
            raise ValueError(f"minibatch_envs={self.minibatch_envs} must divide num_envs={self.num_envs}")
        for name in ("lr", "clip", "epochs", "trials"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def make_policy(cfg: RelicTrainConfig, env) -> torch.nn.Module:
    """The policy `cfg.arch` names, for the env's spaces, with cfg.model's settings."""
    if cfg.arch == "rl2":
        from thrifty.agents.rl2_policy import RL2Config, RL2Policy

        return RL2Policy(RL2Config.for_spaces(env.single_observation_space, env.single_action_space,
                                              seed=cfg.seed, **cfg.model))
    from thrifty.agents.relic_policy import RelicConfig, RelicPolicy

    return RelicPolicy(RelicConfig.for_spaces(env.single_observation_space, env.single_action_space,
                                              seed=cfg.seed, **cfg.model))


def learning_rate(cfg: RelicTrainConfig, env_steps: int) -> float:
    """Linear warm-up from lr / 1000 over `warmup_steps`, then cosine annealing to lr_min at the run's end."""
    total = cfg.trials * cfg.trial_steps * cfg.num_envs
    if env_steps < cfg.warmup_steps:
        return cfg.lr * (1e-3 + (1 - 1e-3) * env_steps / cfg.warmup_steps)
    frac = min(1.0, (env_steps - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * frac))


def ppo_update(policy, opt, buffer: TrialBuffer, t: int, loss_start: int, cfg: RelicTrainConfig,
               generator: torch.Generator) -> dict[str, float]:
    """cfg.epochs passes over minibatches of environments, each forward over the whole prefix [0, t), the clipped
    PPO loss + value loss - entropy bonus averaged over steps [loss_start, t) -> mean statistics."""
    adv, ret = buffer.advantages(t, cfg.gamma, cfg.lam)
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl",
                                                      "clip_fraction")}
    for _ in range(cfg.epochs):
        order = torch.randperm(buffer.batch, generator=generator)
        for rows in order.split(cfg.minibatch_envs):
            logits, values = policy(*buffer.inputs(t, rows))
            logits, values = logits[:, loss_start:], values[:, loss_start:]
            logp_all = torch.log_softmax(logits.float(), -1)
            logp = logp_all.gather(-1, buffer.action[rows, loss_start:t, None]).squeeze(-1)
            old, a, r = buffer.logp[rows, loss_start:t], adv[rows, loss_start:], ret[rows, loss_start:]
            ratio = torch.exp(logp - old)
            policy_loss = -torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a).mean()
            value_loss = 0.5 * (values - r).pow(2).mean()
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
            loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            opt.step()
            with torch.no_grad():
                stats["policy_loss"].append(float(policy_loss))
                stats["value_loss"].append(float(value_loss))
                stats["entropy"].append(float(entropy))
                stats["approx_kl"].append(float(((ratio - 1) - (logp - old)).mean()))
                stats["clip_fraction"].append(float(((ratio - 1).abs() > cfg.clip).float().mean()))
    return {k: float(np.mean(v)) for k, v in stats.items()}


@torch.no_grad()
def refresh(policy, buffer: TrialBuffer, t: int):
    """Re-run the prefix [0, t) with the current weights: a new acting state, and the stored values overwritten."""
    state = policy.start(buffer.batch)
    _, values = policy.step(state, *buffer.inputs(t))
    buffer.value[:, :t] = values
    return state


def run_trial(policy, env, cfg: RelicTrainConfig, opt, generator: torch.Generator, trial: int,
              env_steps: int) -> dict[str, float]:
    """Act one trial of cfg.trial_steps steps with its K updates -> the trial's metrics."""
    spec = env.spec_
    n, chunk = cfg.trial_steps, cfg.trial_steps // cfg.updates_per_trial
    obs, _ = env.reset(seed=cfg.seed * 100_003 + trial)
    buffer = TrialBuffer(cfg.num_envs, n, obs.shape[1])
    policy.eval()
    state = policy.start(cfg.num_envs)
    prev_action = torch.zeros(cfg.num_envs, dtype=torch.long)
    prev_reward = torch.zeros(cfg.num_envs)
    start = torch.ones(cfg.num_envs, dtype=torch.bool)
    update_stats = []
    returns = torch.zeros(cfg.num_envs, n // spec.horizon)  # [B, episodes], in the order they were played
    for t in range(n):
        x = torch.as_tensor(obs, dtype=torch.float32)
        with torch.no_grad():
            logits, value = policy.step(state, x[:, None], prev_action[:, None], prev_reward[:, None], start[:, None])
        action, logp = sample_action(logits[:, 0], generator)
        obs, reward, _, truncated, _ = env.step(action.numpy())
        buffer.add(t, x, action, logp, value[:, 0], reward, start)
        returns[:, t // spec.horizon] += torch.as_tensor(reward, dtype=torch.float32)
        prev_action, prev_reward = action, torch.as_tensor(reward, dtype=torch.float32)
        start = torch.as_tensor(truncated, dtype=torch.bool)
        if (t + 1) % chunk == 0:
            full = t + 1 == n
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, env_steps + (t + 1) * cfg.num_envs)
            policy.train()
            update_stats.append(ppo_update(policy, opt, buffer, t + 1, 0 if full else t + 1 - chunk, cfg,
                                           generator))
            policy.eval()
            if not full:
                if cfg.shuffle_episodes:
                    buffer.shuffle_episodes(t + 1, generator)
                if cfg.refresh or cfg.shuffle_episodes:  # a shuffled context must be re-read to act on it
                    state = refresh(policy, buffer, t + 1)
    out = {"return_episode_first": float(returns[:, 0].mean()), "return_episode_last": float(returns[:, -1].mean()),
           "return_mean": float(returns.mean())}
    for k in update_stats[0]:
        out[k] = float(np.mean([s[k] for s in update_stats]))
    return out


def train_relic(cfg: RelicTrainConfig, run_dir: str | Path, progress: bool = True, out: str | Path | None = None,
                stop_at: int | None = None, command: str | None = None):
    """Train (or resume) the run in `run_dir`; returns the policy. With `out`, the final policy is saved there with
    a card (relic_card.json: the config, the data, the time, the last metrics). `stop_at`: stop after that many
    trials of the schedule (a later call resumes from the checkpoint). `command`: the command line, for the card."""
    from thrifty.envs.darkroom import DarkroomVectorEnv

    cfg.check()
    torch.set_num_threads(cfg.threads)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    env = DarkroomVectorEnv(cfg.variant, num_envs=cfg.num_envs, split="train")
    policy = make_policy(cfg, env)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
    generator = torch.Generator().manual_seed(cfg.seed)
    ckpt, metrics_path = run / "checkpoint.pt", run / "metrics.jsonl"
    trial, wall = 0, 0.0
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        mine = {k: v for k, v in asdict(cfg).items() if k != "trials"}  # a run may be lengthened: its schedule
        if {k: v for k, v in saved["config"].items() if k != "trials"} != mine:  # then stretches from here on
            raise ValueError(f"{ckpt} was written by another configuration ({saved['config']}); use another run "
                             "directory, or remove it to start over")
        policy.load_state_dict(saved["policy"])
        opt.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        trial, wall = saved["trial"], saved["wall_s"]
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        metrics_path.write_text("".join(line + "\n" for line in lines[:trial]))  # drop a trial not checkpointed
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[info]}"))
        bar.start()
        task = bar.add_task(f"relic {cfg.arch} trials", total=cfg.trials, completed=trial, info="")
    try:
        while trial < min(cfg.trials, stop_at or cfg.trials):
            t0 = time.perf_counter()
            env_steps = trial * cfg.trial_steps * cfg.num_envs
            m = run_trial(policy, env, cfg, opt, generator, trial, env_steps)
            wall += time.perf_counter() - t0
            trial += 1
            row = {"trial": trial, "env_steps": trial * cfg.trial_steps * cfg.num_envs, "wall_s": round(wall, 2),
                   "lr": opt.param_groups[0]["lr"], **m}
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            torch.save({"config": asdict(cfg), "policy": policy.state_dict(), "optimizer": opt.state_dict(),
                        "generator": generator.get_state(), "trial": trial, "wall_s": wall}, ckpt)
            if bar:
                bar.update(task, completed=trial, info=f"return first {m['return_episode_first']:.2f} last "
                                                       f"{m['return_episode_last']:.2f}")
    finally:
        if bar:
            bar.stop()
    if out is not None:
        p = policy.save(out)
        last = json.loads(metrics_path.read_text().splitlines()[-1])
        card = {"what": f"ReLIC partial-update PPO ({cfg.arch}) on {cfg.variant}, train split of tasks",
                "command": command,
                "config": asdict(cfg), "env_steps": last["env_steps"], "wall_s": last["wall_s"],
                "threads": cfg.threads, "last_trial_metrics": last, "torch": torch.__version__}
        (p / "relic_card.json").write_text(json.dumps(card, indent=2))
    return policy
