"""The planner's exit head (`thrifty train exits --model DIR`): DeeR-VLA's early exit, trained by self-distillation.

1. Roll the planner out in closed loop on training seeds, through exact prefix reuse, and record at every decision
   the decision token's hidden state after each layer (features [L, d]) and the full model's distribution over the
   action words at the last layer (its logits restricted to the action tokens, softmax).
2. Fit one shared head (`thrifty.agents.planner_exits.PlannerExitHead`) at every intermediate depth 1..L-1 to that
   distribution (soft cross-entropy, averaged over depths: DeeR's per-exit loss with one head; the backbone frozen).
3. On held-out episodes (split by episode): each depth's agreement with the full model's action, and the
   consistency scores (total variation between consecutive depths) the `early_exit` technique solves its
   thresholds on, with what a few exit ratios realise there.

Features are kept in RUN_DIR/features.pt (a rerun with the same recipe skips the rollouts). Same seed, same head.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from thrifty.agents.planner_exits import (ExitHeadConfig, PlannerExitHead, action_token_ids, consistency,
                                          model_fingerprint, save_exit_head)
from thrifty.techniques.early_exit import ExitBudget, exit_indices
from thrifty.techniques.prefix_reuse import PrefixReuse

REPORT_RATIOS = (0.1, 0.3, 0.5, 1.0)


@dataclass
class ExitsRecipe:
    levels: list = field(default_factory=lambda: ["GoToLocal", "PickupLoc", "PutNextLocal", "GoToObjMazeS4"])
    episodes_per_level: int = 60
    max_steps: int = 64
    seed_offset: int = 100_000
    """rollouts on train_seed(seed_offset + i): training seeds (never evaluation ones) past the planner's own data"""
    heldout_share: float = 0.2
    steps: int = 3000
    batch_size: int = 256
    lr: float = 2e-3
    hidden: int = 128
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("the exit-head recipe needs at least one level")
        if self.episodes_per_level < 2:
            raise ValueError(f"episodes_per_level must be >= 2 (some are held out), got {self.episodes_per_level}")
        if not 0 < self.heldout_share < 1:
            raise ValueError(f"heldout_share must be in (0, 1), got {self.heldout_share}")

    def rollout_key(self) -> dict:
        return {k: getattr(self, k) for k in ("levels", "episodes_per_level", "max_steps", "seed_offset")}


class _Recorder(PrefixReuse):
    """Exact prefix reuse that records the decision token's hidden state after every layer of each decision."""

    def __init__(self) -> None:
        super().__init__(store_bytes=0)
        self.decisions: list[list[torch.Tensor]] = []

    def prefill_hook(self, ctx, n_layers, new_from):
        feats: list[torch.Tensor] = []
        self.decisions.append(feats)

        def hook(layer, h, positions):
            feats.append(h[0, -1].clone())
            return None

        return hook


def collect_features(planner, recipe: ExitsRecipe, progress: bool = True) -> dict:
    """Closed-loop rollouts of the full planner; per decision: features [L, d], the LM's action distribution [A],
    the episode index and the action the planner took."""
    from thrifty.agents.planner import EpisodeConfig, TextPlanner, run_episode
    from thrifty.envs.babyai_text import ACTIONS
    from thrifty.envs.seeds import train_seed

    ids = list(action_token_ids(planner.tokenizer, ACTIONS))
    rec = _Recorder()
    runner = TextPlanner(planner.backbone, planner.tokenizer, rec, planner.max_new_tokens)
    feats, targets, episode, taken, success = [], [], [], [], []
    jobs = [(lv, i) for lv in recipe.levels for i in range(recipe.episodes_per_level)]
    bar = _progress(progress, len(jobs), "exit-head rollouts")
    for e, (level, i) in enumerate(jobs):
        rec.decisions = []
        res = run_episode(runner, level, train_seed(recipe.seed_offset + i), EpisodeConfig(max_steps=recipe.max_steps))
        success.append(bool(res["success"]))
        for d, action in zip(rec.decisions, res["actions"]):
            f = torch.stack(d)  # [L, d]
            with torch.no_grad():
                logits = planner.backbone.logits(f[-1:])[0]
            feats.append(f)
            targets.append(torch.softmax(logits[ids], -1))
            episode.append(e)
            taken.append(ACTIONS.index(action))
        bar(e + 1)
    return {"features": torch.stack(feats), "targets": torch.stack(targets), "episode": torch.tensor(episode),
            "taken": torch.tensor(taken), "episodes": len(jobs), "rollout_success": float(np.mean(success)),
            "key": recipe.rollout_key()}


def _progress(enabled: bool, total: int, what: str):
    if not enabled:
        return lambda done: None
    from rich.progress import Progress

    prog = Progress(transient=True)
    prog.start()
    task = prog.add_task(what, total=total)

    def update(done: int) -> None:
        prog.update(task, completed=done)
        if done >= total:
            prog.stop()

    return update


def fit_head(head: PlannerExitHead, x: torch.Tensor, t: torch.Tensor, recipe: ExitsRecipe) -> list[float]:
    """x [N, D, d] (depths 1..L-1), t [N, A] -> the loss every 100 steps (soft cross-entropy, mean over depths)."""
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.steps)
    curve = []
    for step in range(recipe.steps):
        idx = torch.randint(0, x.shape[0], (min(recipe.batch_size, x.shape[0]),), generator=g)
        logp = torch.log_softmax(head(x[idx]), -1)  # [B, D, A]
        loss = -(t[idx, None] * logp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == recipe.steps - 1:
            curve.append(round(float(loss.detach()), 5))
    return curve


def heldout_scores(head: PlannerExitHead, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, L-1, d] -> (probs [N, L-1, A], scores [L-1, N]: TV between depth d and d-1 for d = 2..L-1; last row 0)."""
    with torch.no_grad():
        p = torch.softmax(head(x), -1)
    tv = consistency(p[:, 1:], p[:, :-1]).T  # [L-2, N]
    return p, torch.cat([tv, torch.zeros(1, x.shape[0])])


def train_exits(model_dir: str | Path, out: str | Path, run_dir: str | Path, recipe: ExitsRecipe | None = None,
                command: str = "", progress: bool = True) -> Path:
    from thrifty.agents.planner import TextPlanner
    from thrifty.envs.babyai_text import ACTIONS

    recipe = recipe or ExitsRecipe()
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    planner = TextPlanner.load(model_dir)

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cache = run / "features.pt"
    data = torch.load(cache) if cache.is_file() else None
    if data is not None and (data.get("key") != recipe.rollout_key()
                             or data.get("model") != model_fingerprint(planner.backbone)):
        data = None  # another recipe or model: collect again
    if data is None:
        data = collect_features(planner, recipe, progress)
        data["model"] = model_fingerprint(planner.backbone)
        torch.save(data, cache)
    x, t, ep = data["features"][:, :-1], data["targets"], data["episode"]
    n_layers = planner.backbone.n_layers
    g = torch.Generator().manual_seed(recipe.seed)
    order = torch.randperm(data["episodes"], generator=g)
    held_eps = order[:max(1, int(round(recipe.heldout_share * data["episodes"])))]
    held = torch.isin(ep, held_eps)
    cfg = ExitHeadConfig(d_model=planner.backbone.shape.d_model, n_layers=n_layers, actions=tuple(ACTIONS),
                         action_token_ids=action_token_ids(planner.tokenizer, ACTIONS), hidden=recipe.hidden)
    head = PlannerExitHead(cfg)
    head.init_from(planner.backbone)
    curve = fit_head(head, x[~held], t[~held], recipe)
    head.eval()
    probs, scores = heldout_scores(head, x[held])
    full_action = t[held].argmax(-1)
    agreement = (probs.argmax(-1) == full_action[:, None]).float().mean(0).tolist()  # per depth 1..L-1
    budgets = []
    head_action = probs.argmax(-1).numpy()  # [N, L-1]: depths 1..L-1
    for r in REPORT_RATIOS:
        b = ExitBudget(exit_ratio=r).resolve(scores.numpy(), list(range(2, n_layers + 1)))
        depth = np.asarray(b["exit_layers"])[exit_indices(scores.numpy(), b["thresholds"])]
        at_exit = head_action[np.arange(len(depth)), np.minimum(depth, n_layers - 1) - 1]
        act = np.where(depth < n_layers, at_exit, full_action.numpy())  # the last layer decodes: full's action
        budgets.append({"exit_ratio": r, "realised_mean_layers": round(b["realised_mean_layers"], 3),
                        "agreement_with_full": round(float((act == full_action.numpy()).mean()), 4)})
    card = {
        "name": "thrifty planner exit head",
        "model": model_fingerprint(planner.backbone),
        "model_dir": str(model_dir),
        "recipe": asdict(recipe),
        "command": command,
        "data": {"episodes": data["episodes"], "decisions": int(x.shape[0]), "heldout_decisions": int(held.sum()),
                 "heldout_episodes": int(held_eps.numel()), "rollout_success": data["rollout_success"],
                 "seeds": f"train_seed({recipe.seed_offset} + i), i < {recipe.episodes_per_level}, per level"},
        "loss_every_100": curve,
        "heldout_agreement_by_depth": {str(d + 1): round(a, 4) for d, a in enumerate(agreement)},
        "heldout_budgets": budgets,
        "parameters": sum(p.numel() for p in head.parameters()),
        "seconds": round(time.time() - t0, 1),
    }
    path = save_exit_head(out, head, scores, card)
    (run / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return path
