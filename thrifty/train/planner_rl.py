"""PPO on the LM planner (EchoRL's learner, issue 19, part 1): the behaviour-cloned planner learns from its own
closed-loop experience.

EchoRL (../shared/seeds/001) promises PPO over rollouts that reuse KV prefixes; its code never ran it (its ratio
is always 1: ../shared/research/seed-erecap-echorl.md, B). Here, in thrifty's own code:

- **The policy** is the planner's distribution over the level's action words at the decision prompt:
  pi(a | context) = softmax(logits[action tokens] / T), each action word being one token (" left", ...), the token
  greedy decoding emits first. Acting and learning use the same distribution.
- **Rollouts** run in closed loop through exact prefix reuse: one kept `Session` per episode, each decision extends
  it by the tokens appended since the last one (the action taken, the new observation, the prompt), so a decision
  costs its new tokens only. The behaviour log-probability of every sampled action is stored at acting time.
- **The update** is one teacher-forced pass per episode: the context is append-only, so a single forward over the
  episode's tokens gives the policy's logits and the value at every decision position (the logits at the prompt's
  last token predict the action token). The value head reads that token's final hidden state (detached: the value
  loss does not move the trunk the policy and the shipped techniques rely on).
- **Losses** (per decision, averaged over a minibatch of episodes): the clipped surrogate on the ratio
  exp(logp_new - logp_behaviour) with GAE advantages (normalised over the iteration), the value loss on the GAE
  returns, an entropy bonus, and a KL guard KL(pi || pi_BC) against the frozen behaviour-cloned planner.
- **Reward**: the level's own (1 - 0.9 steps / max_steps on success, else 0) at the last decision. No shaping: the
  BC start already succeeds often enough for the sparse reward to carry signal, and a shaped reward would change
  which behaviour is optimal.

- **Replay** (optional): stored episodes join the update through their behaviour log-probabilities (the clipped
  ratio is the off-policy correction), weighted by the prioritized sampler's importance weights.

The policy, rollouts and episode scoring are `thrifty.train.planner_policy`; GAE and the objective
`thrifty.train.ppo`; the replay `thrifty.train.replay`. This module is the run.
Resumable (`run_dir/ckpt.pt`, atomic; a run with another recipe is refused), metrics with fixed names one JSON line
per iteration (`run_dir/metrics.jsonl`), plotted against environment steps and wall time (`plot_metrics`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from thrifty.envs.seeds import train_seed
from thrifty.train.planner_policy import (Episode, PlannerRLError, ValueHead, action_log_probs, action_token_ids,
                                          load_planner_for_rl, rollout, score_episode)
from thrifty.train.latent_plan import PlanEncoder, smoothing
from thrifty.train.ppo import LossTerms, gae, ppo_loss
from thrifty.train.rollout_workers import InProcessRollouts, RayRollouts, RolloutJob

METRICS = ("iteration", "episodes", "env_steps", "decisions", "wall_s", "success", "return_mean", "policy_loss",
           "value_loss", "entropy", "kl_bc", "approx_kl", "clip_fraction", "replayed", "replay_size", "rollout_s",
           "update_s", "prefix_hit_rate", "bw_full", "bw_eff", "bw_learner", "eta_bw", "val_success")
"""The fixed metric names of metrics.jsonl (val_success is null on iterations without a validation)."""


REPLAY_MODES = ("none", "surprise", "uniform")


@dataclass(frozen=True)
class PPORecipe:
    levels: tuple[str, ...] = ("GoToLocal",)
    iterations: int = 30
    episodes_per_iteration: int = 16
    minibatch_episodes: int = 4
    epochs: int = 2
    lr: float = 1e-5
    value_lr: float = 1e-3
    clip: float = 0.2
    gamma: float = 0.99
    lam: float = 0.95
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    kl_coef: float = 0.05
    temperature: float = 1.0
    max_steps: int = 64
    grad_clip: float = 1.0
    val_every: int = 5
    val_episodes: int = 30
    seed: int = 0
    seed_base: int = 3_000_000
    """rollout episode i uses train_seed(seed_base + i); validation uses train_seed(seed_base // 3 * 4 + i), both
    disjoint from the BC transcripts (seeds below 10^6) and from evaluation seeds (10^9 + i) by construction"""
    threads: int = 2
    value_hidden: int = 64
    rollout_reuse: bool = True
    """rollouts through one kept session (exact prefix reuse); False: every decision recomputes its context"""
    replay: str = "none"
    """"none"; "surprise" (EchoRL's surprise-prioritized hot/cold replay, `thrifty.train.replay`); "uniform"
    (the same buffer, every stored episode equally likely, no tiers, importance weights 1)"""
    replay_episodes: int = 8
    """replayed episodes added to each iteration's update (with replay)"""
    replay_capacity: int = 128
    hot_fraction: float = 0.5
    age_hot: int = 2
    latent_plans: bool = False
    """a trajectory encoder's plan vector as a soft prompt on each observation's first token
    (`thrifty.train.latent_plan`); off is the ablation"""
    plan_dim: int = 32
    plan_window: int = 4
    plan_smooth: float = 0.1
    """weight of the temporal smoothing term (itself of order 1)"""
    plan_lr: float = 1e-3
    shaping: float = 0.0
    """weight of the potential-based shaping term (Ng et al., 1999) w (gamma Phi(s') - Phi(s)) per decision,
    Phi = -(steps to the mission's object, `BabyAITextEnv.goal_distance`); 0 = the level's reward alone"""
    rollout_workers: int = 0
    """0: rollouts in the learner's process; n: n Ray actors (one CPU each), the weights broadcast per iteration;
    the episodes are the same either way (each draws from its own generator)"""

    def __post_init__(self) -> None:
        if self.replay not in REPLAY_MODES:
            raise PlannerRLError(f"replay must be one of {REPLAY_MODES}, got {self.replay!r}")
        if not self.levels:
            raise PlannerRLError("the recipe needs at least one level")
        if not isinstance(self.rollout_workers, int) or self.rollout_workers < 0:
            raise PlannerRLError(f"rollout_workers must be an integer >= 0, got {self.rollout_workers!r}")
        for name in ("iterations", "episodes_per_iteration", "minibatch_episodes", "epochs", "max_steps",
                     "val_every", "threads", "value_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise PlannerRLError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not 0 < self.clip < 1:
            raise PlannerRLError(f"clip must be in (0, 1), got {self.clip}")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise PlannerRLError(f"need 0 < gamma <= 1 and 0 <= lam <= 1, got {self.gamma}, {self.lam}")
        if self.temperature <= 0 or self.lr <= 0 or self.value_lr <= 0:
            raise PlannerRLError("temperature, lr and value_lr must be > 0")
        if min(self.value_coef, self.entropy_coef, self.kl_coef) < 0:
            raise PlannerRLError("the loss weights must be >= 0")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def rollout_seed(self, i: int) -> int:
        return train_seed(self.seed_base + i)

    def val_seed(self, i: int) -> int:
        return train_seed(self.seed_base // 3 * 4 + i)


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class RunState:
    iteration: int = 0
    env_steps: int = 0
    episodes: int = 0
    wall_s: float = 0.0
    metrics: list[dict] = field(default_factory=list)


def make_replay(recipe: PPORecipe):
    from thrifty.train.replay import ReplayConfig, SurpriseReplay

    if recipe.replay == "none":
        return None
    return SurpriseReplay(ReplayConfig(capacity=recipe.replay_capacity, hot_fraction=recipe.hot_fraction,
                                       age_hot=recipe.age_hot, beta_steps=max(1, recipe.iterations),
                                       prioritized=recipe.replay == "surprise"))


def _save(path: Path, recipe: PPORecipe, model, value_head, opt, state: RunState, source: str, replay,
          plans) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": recipe.fingerprint(), "recipe": asdict(recipe), "source": source, "replay": replay,
                "plans": None if plans is None else plans.state_dict(),
                "model": model.state_dict(), "value_head": value_head.state_dict(), "opt": opt.state_dict(),
                "torch_rng": torch.get_rng_state(), "state": asdict(state)}, tmp)
    tmp.replace(path)


def _resume(path: Path, recipe: PPORecipe, model, value_head, opt, source: str,
            plans=None) -> tuple[RunState, tuple | None]:
    if not path.exists():
        return RunState(), None
    ck = torch.load(path, weights_only=False)
    if ck["fingerprint"] != recipe.fingerprint() or ck.get("source") != source:
        diff = {k: (v, getattr(recipe, k)) for k, v in ck["recipe"].items()
                if k in recipe.__dataclass_fields__ and (tuple(v) if isinstance(v, list) else v) != getattr(recipe, k)}
        if ck.get("source") != source:
            diff["model"] = (ck.get("source"), source)
        raise PlannerRLError(f"{path} is a run with another recipe or start model (checkpoint vs now: {diff}); "
                             "resume it with the same settings, or pass another --run-dir to start a new run")
    model.load_state_dict(ck["model"])
    value_head.load_state_dict(ck["value_head"])
    if plans is not None:
        plans.load_state_dict(ck["plans"])
    opt.load_state_dict(ck["opt"])
    torch.set_rng_state(ck["torch_rng"])
    return RunState(**ck["state"]), ck["replay"]


def validate(model, tokenizer, action_ids, recipe: PPORecipe, episodes: int | None = None, plans=None) -> float:
    """Greedy success over the recipe's validation seeds (training seeds the rollouts never use), all levels."""
    gen = torch.Generator().manual_seed(0)
    n = episodes or recipe.val_episodes
    wins = [rollout(model, tokenizer, action_ids, lv, recipe.val_seed(i), gen, recipe.max_steps,
                    recipe.temperature, greedy=True, plans=plans).success for lv in recipe.levels for i in range(n)]
    return sum(wins) / len(wins)


LOSS_METRICS = (("policy_loss", "policy"), ("value_loss", "value"), ("entropy", "entropy"), ("kl_bc", "kl_bc"),
                ("approx_kl", "approx_kl"), ("clip_fraction", "clip_fraction"))


def rollout_bandwidth(fresh: list[Episode], batch: list[Episode], recipe: PPORecipe, shape) -> dict:
    """EchoRL's bandwidth metrics of one iteration (`thrifty.cost.bandwidth`), in attention FLOPs: b(t) and b_eff =
    b(t) - b(t') over the rollouts' decisions, the learner's passes over the batch (the no-grad pass and `epochs`
    grad passes per episode, plus the BC reference's pass over each fresh episode: b(len) each), the prefix hit
    rate, and eta_bw = return / (bw_eff + learner) in return per attention GFLOP."""
    from thrifty.cost.bandwidth import (PrefixHitCounter, attention_flops_per_pair, bandwidth,
                                        bandwidth_efficiency, effective_bandwidth)

    scale = attention_flops_per_pair(shape)
    hits = PrefixHitCounter()
    full = eff = 0.0
    for ep in fresh:
        for t, r in zip(ep.prompt_tokens, ep.reused_tokens):
            full += bandwidth(t, scale)
            eff += effective_bandwidth(t, r, scale)
            hits.add(t, r)
    learner = sum(bandwidth(len(ep.ids), scale) for ep in batch) * (1 + recipe.epochs)
    learner += sum(bandwidth(len(ep.ids), scale) for ep in fresh)  # `prepare`'s reference pass, once per episode
    ret = sum(ep.reward for ep in fresh)
    return {"prefix_hit_rate": round(hits.hit_rate, 5), "bw_full": full, "bw_eff": eff, "bw_learner": learner,
            "eta_bw": bandwidth_efficiency(ret, eff, learner) * 1e9}


def shaping_terms(ep: Episode, gamma: float) -> torch.Tensor:
    """[N] gamma Phi(s_{t+1}) - Phi(s_t) per decision, Phi = -goal distance (0 where it is unknown); the state
    after a terminating step has Phi = 0 (an absorbing state), after a time-out its own distance (a time limit
    is not a state of the task). Potential-based, so the optimal policy is unchanged (Ng, Harada & Russell, 1999);
    it hands each decision credit for approaching the object instead of waiting for the episode's end."""
    phi = [0.0 if d is None else -float(d) for d in ep.goal_distance]
    if ep.terminated:
        phi[-1] = 0.0
    return torch.tensor([gamma * phi[t + 1] - phi[t] for t in range(len(ep.actions))], dtype=torch.float32)


@torch.no_grad()
def prepare(batch: list[Episode], model, reference, value_head, action_ids, recipe: PPORecipe,
            plans=None) -> list[np.ndarray]:
    """Per episode, with the current weights: the values, GAE advantages and returns (recomputed for replayed
    episodes too: their advantages are the current critic's), the BC reference's log-probs (once per episode);
    returns each episode's plan vector for the replay's surprise score (the mean final hidden state of its
    decisions, until latent plans stand in for it)."""
    vectors = []
    for ep in batch:
        _, ep.old_values, hidden, _ = score_episode(model, value_head, ep, action_ids, recipe.temperature, plans)
        if ep.bc_logp is None:
            ep.bc_logp = action_log_probs(reference(input_ids=torch.tensor(ep.ids)[None]).logits[0, ep.positions],
                                          action_ids, recipe.temperature)
        rewards = torch.zeros(len(ep.actions))
        rewards[-1] = ep.reward
        if recipe.shaping:
            rewards += recipe.shaping * shaping_terms(ep, recipe.gamma)
        ep.advantages, ep.returns = gae(rewards, ep.old_values, recipe.gamma, recipe.lam)
        vectors.append(hidden.mean(0).numpy())
    return vectors


def update(batch: list[Episode], weights: list[float], model, value_head, opt, action_ids, recipe: PPORecipe,
           iteration: int, plans=None) -> list[tuple[int, LossTerms]]:
    """`epochs` passes over the batch in minibatches of episodes, one teacher-forced pass per episode. The ratio
    is always against the behaviour log-probabilities stored at acting time, so a replayed episode's clipped
    ratio is its off-policy correction; its loss is also scaled by its prioritized-sampling importance weight."""
    adv = torch.cat([ep.advantages for ep in batch])
    mean, std = float(adv.mean()), (float(adv.std()) if adv.numel() > 1 else 1.0)
    terms = []
    model.train()
    order = torch.Generator().manual_seed(recipe.seed * 100_003 + iteration)
    params = [*model.parameters(), *value_head.parameters(), *(plans.parameters() if plans is not None else ())]
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(batch), generator=order).tolist()
        for k in range(0, len(perm), recipe.minibatch_episodes):
            opt.zero_grad()
            chunk = perm[k:k + recipe.minibatch_episodes]
            n_dec = sum(len(batch[x].actions) for x in chunk)
            for x in chunk:  # the loss weighted by the episode's decisions (a mean over the minibatch's decisions)
                ep = batch[x]
                logp, values, _, z = score_episode(model, value_head, ep, action_ids, recipe.temperature, plans)
                t = ppo_loss(logp, values, torch.tensor(ep.actions), torch.tensor(ep.logp),
                             (ep.advantages - mean) / (std + 1e-8), ep.returns, ep.bc_logp, recipe)
                total = t.total if z is None else t.total + recipe.plan_smooth * smoothing(z)
                (total * weights[x] * len(ep.actions) / n_dec).backward()
                terms.append((len(ep.actions), t))
            nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step()
    return terms


def train_planner_rl(model_dir: str | Path, out: str | Path, run_dir: str | Path, recipe: PPORecipe | None = None,
                     command: str = "", progress: bool = True, stop_at: int | None = None) -> Path:
    """Run PPO from the planner at `model_dir`; resumes from `run_dir/ckpt.pt`; writes the planner to `out`.
    `stop_at` ends this call after that iteration (checkpointed; a later call resumes the same schedule)."""
    recipe = recipe or PPORecipe()
    torch.set_num_threads(recipe.threads)
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_planner_for_rl(model_dir)
    reference, _ = load_planner_for_rl(model_dir)  # the frozen BC planner of the KL guard
    reference.eval().requires_grad_(False)
    action_ids = action_token_ids(tokenizer)
    torch.manual_seed(recipe.seed)
    value_head = ValueHead(model.config.hidden_size, recipe.value_hidden)
    plans = PlanEncoder(model.config.hidden_size, recipe.plan_dim, recipe.plan_window) if recipe.latent_plans else None
    groups = [{"params": model.parameters(), "lr": recipe.lr},
              {"params": value_head.parameters(), "lr": recipe.value_lr}]
    if plans is not None:
        groups.append({"params": plans.parameters(), "lr": recipe.plan_lr})
    opt = torch.optim.Adam(groups)
    source = str(Path(model_dir).resolve())
    buffer = make_replay(recipe)
    replay_rng = np.random.default_rng(recipe.seed)
    state, saved = _resume(run / "ckpt.pt", recipe, model, value_head, opt, source, plans)
    if saved is not None:
        buffer, replay_rng = saved
    metrics_path = run / "metrics.jsonl"
    if state.iteration == 0:
        metrics_path.write_text("")
        model.eval()
        v0 = validate(model, tokenizer, action_ids, recipe, plans=plans)
        state.metrics.append({k: None for k in METRICS} | {"iteration": 0, "episodes": 0, "env_steps": 0,
                                                            "decisions": 0, "wall_s": 0.0, "val_success": v0})
        _append(metrics_path, state.metrics[-1])
    from thrifty.backbones import HFDecoder

    shape = HFDecoder.from_model(model).shape
    if recipe.rollout_workers:
        workers = RayRollouts(recipe.rollout_workers, model_dir, asdict(recipe), model, plans)
    else:
        workers = InProcessRollouts(model, tokenizer, action_ids, asdict(recipe), plans)
    last = min(stop_at or recipe.iterations, recipe.iterations)
    bar = Bar(progress, last, state.iteration)
    while state.iteration < last:
        t0 = time.time()
        model.eval()
        fresh = workers.run([RolloutJob(i, recipe.levels[i % len(recipe.levels)], recipe.rollout_seed(i))
                             for i in range(state.episodes, state.episodes + recipe.episodes_per_iteration)])
        rollout_s = time.time() - t0
        replayed, weights = [], [1.0] * len(fresh)
        if buffer is not None and len(buffer):
            drawn = buffer.sample(recipe.replay_episodes, replay_rng)
            replayed = list(drawn.items)
            weights += drawn.weights.tolist()
        batch = fresh + replayed
        vectors = prepare(batch, model, reference, value_head, action_ids, recipe, plans)
        t1 = time.time()
        terms = update(batch, weights, model, value_head, opt, action_ids, recipe, state.iteration, plans)
        update_s = time.time() - t1
        if buffer is not None:  # this iteration's episodes enter the buffer after the update, scored by surprise
            for ep, plan in zip(fresh, vectors[:len(fresh)]):
                buffer.add(ep, plan, ep.reward)
            buffer.tick()
        state.iteration += 1
        state.episodes += len(fresh)
        state.env_steps += sum(ep.steps for ep in fresh)
        state.wall_s += time.time() - t0
        w = sum(n for n, _ in terms)
        row = {"iteration": state.iteration, "episodes": state.episodes, "env_steps": state.env_steps,
               "decisions": sum(len(ep.actions) for ep in fresh), "wall_s": round(state.wall_s, 2),
               "success": sum(ep.success for ep in fresh) / len(fresh),
               "return_mean": sum(ep.reward for ep in fresh) / len(fresh),
               **{name: sum(n * getattr(t, attr) for n, t in terms) / w for name, attr in LOSS_METRICS},
               "replayed": len(replayed), "replay_size": len(buffer) if buffer is not None else 0,
               "rollout_s": round(rollout_s, 3), "update_s": round(update_s, 3),
               **rollout_bandwidth(fresh, batch, recipe, shape), "val_success": None}
        if state.iteration % recipe.val_every == 0 or state.iteration == recipe.iterations:
            model.eval()
            row["val_success"] = validate(model, tokenizer, action_ids, recipe, plans=plans)
        state.metrics.append(row)
        _append(metrics_path, row)
        _save(run / "ckpt.pt", recipe, model, value_head, opt, state, source, (buffer, replay_rng), plans)
        bar(state.iteration, row)
    bar.close()
    workers.close()
    return export(model, tokenizer, value_head, out, recipe, state, model_dir, command, plans)


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps({k: row.get(k) for k in METRICS}) + "\n")


class Bar:
    """The run's progress bar (rich), with the latest rollout and validation success in its description."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self._bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("PPO {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn())
            self._bar.start()
            self._task = self._bar.add_task("", total=total, completed=done)

    def __call__(self, i: int, row: dict) -> None:
        if self._bar is not None:
            val = "" if row["val_success"] is None else f", val {row['val_success']:.2f}"
            self._bar.update(self._task, completed=i, description=f"success {row['success']:.2f}{val}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def export(model, tokenizer, value_head, out: str | Path, recipe: PPORecipe, state: RunState, source,
           command: str, plans=None) -> Path:
    """The trained planner as a model directory (safetensors + tokenizer + card.json), the value head (and the
    plan encoder, which the planner then needs at acting time) beside it."""
    from safetensors.torch import save_file

    p = Path(out)
    p.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(p)
    tokenizer.save_pretrained(p)
    save_file({k: v.contiguous() for k, v in value_head.state_dict().items()}, str(p / "value_head.safetensors"))
    if plans is not None:
        save_file({k: v.contiguous() for k, v in plans.state_dict().items()}, str(p / "plan_encoder.safetensors"))
    card = {"name": "thrifty BabyAI-Text planner, PPO from behaviour cloning", "command": command,
            "start_model": str(source), "recipe": asdict(recipe), "iterations": state.iteration,
            "episodes": state.episodes, "env_steps": state.env_steps, "train_seconds": round(state.wall_s, 1),
            "metrics": state.metrics}
    (p / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return p


def plot_metrics(metrics: Sequence[dict], out: str | Path) -> Path:
    """Rollout and validation success against environment steps and against wall time (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, x, label in ((axes[0], "env_steps", "environment steps"), (axes[1], "wall_s", "wall time (s)")):
        rows = [m for m in metrics if m.get("success") is not None]
        ax.plot([m[x] for m in rows], [m["success"] for m in rows], label="rollouts (sampled)", alpha=0.7)
        val = [m for m in metrics if m.get("val_success") is not None]
        ax.plot([m[x] for m in val], [m["val_success"] for m in val], "o-", label="validation (greedy)")
        ax.set_xlabel(label)
        ax.set_ylabel("success")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
