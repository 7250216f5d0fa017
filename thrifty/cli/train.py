"""`thrifty train ...`: rebuild the shipped assets with their recipes (resumable, with progress bars)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from thrifty.cli._app import comma_list, console, fail, train_app


@train_app.command("planner")
def train_planner_cmd(
    out: Path = typer.Option(None, help="model directory to write (default: the shipped asset's place)"),
    run_dir: Path = typer.Option(Path("runs/planner"), help="transcripts and resumable checkpoints"),
    steps: Optional[int] = typer.Option(None, min=0, help="phase-1 (window) optimisation steps (default: the recipe's)"),
    threads: int = typer.Option(2, min=1, help="torch threads"),
    stop_at: Optional[int] = typer.Option(None, min=1, help="stop at this step of the schedule and export"),
    levels: Optional[str] = typer.Option(None, help="levels to learn, e.g. MemoryS13 (default: the recipe's four "
                                         "BabyAI levels)"),
    episodes: Optional[str] = typer.Option(None, help="expert episodes per level: N for every level, or "
                                           "LEVEL=N,... (levels not named keep the recipe's count)"),
    finetune_steps: Optional[int] = typer.Option(None, min=0, help="phase-2 (whole-episode) steps (default: the "
                                                 "recipe's)"),
    memory_repeat: Optional[int] = typer.Option(None, min=0, help="phase 2 repeats each episode's memory decisions "
                                                "(MemoryS13's junction) this many extra times (default: 0)"),
    init: Optional[Path] = typer.Option(None, help="continue from this planner directory (its weights and "
                                        "tokenizer) instead of a new model; e.g. --steps 0 --finetune-steps 0 "
                                        "--dagger-rounds 4 runs DAgger on it"),
    aux_weight: Optional[float] = typer.Option(None, min=0, help="weight of the auxiliary loss naming where the "
                                               "observation shows the mission's object (whole-episode phases; "
                                               "default 0: off)"),
    dagger_rounds: Optional[int] = typer.Option(None, min=0, help="phase-3 DAgger rounds (default: the recipe's 0)"),
    dagger_episodes: Optional[int] = typer.Option(None, min=1, help="planner episodes per level per DAgger round"),
    dagger_steps: Optional[int] = typer.Option(None, min=1, help="optimisation steps after each DAgger round"),
    dagger_repeat: Optional[int] = typer.Option(None, min=1, help="DAgger episodes enter the batch pool this many "
                                                "times"),
) -> None:
    """Rebuild the BabyAI-Text planner (behaviour cloning on expert transcripts); resumes from RUN_DIR."""
    from thrifty.bench import SHIPPED_PLANNER
    from thrifty.envs.babyai_text import UnknownLevelError, level_id
    from thrifty.train.planner import PlannerRecipe, train_planner

    recipe = PlannerRecipe(threads=threads)
    if steps is not None:
        recipe.steps = steps
    if init is not None:
        from thrifty.train.planner import init_weights_hash

        try:
            init_weights_hash(init)
        except FileNotFoundError as e:
            fail(str(e))
        recipe.init = str(init)
    for name, value in (("aux_weight", aux_weight), ("dagger_rounds", dagger_rounds),
                        ("dagger_episodes_per_level", dagger_episodes), ("dagger_steps", dagger_steps),
                        ("dagger_repeat", dagger_repeat)):
        if value is not None:
            setattr(recipe, name, value)
    if finetune_steps is not None:
        recipe.finetune_steps = finetune_steps
    if memory_repeat is not None:
        recipe.memory_repeat = memory_repeat
    if levels:
        recipe.levels = [lv.strip() for lv in levels.split(",") if lv.strip()]
        try:
            for lv in recipe.levels:
                level_id(lv)
        except UnknownLevelError as e:
            fail(str(e))
    counts = _episode_counts(episodes, recipe.levels) if episodes else {}
    if levels and any(lv not in recipe.episodes_per_level and lv not in counts for lv in recipe.levels):
        fail(f"--levels {levels}: pass --episodes N (expert episodes per level); the recipe has counts only "
             f"for {', '.join(recipe.episodes_per_level)}")
    if counts:
        recipe.episodes_per_level = {lv: counts.get(lv, recipe.episodes_per_level.get(lv)) for lv in recipe.levels}
    path = train_planner(recipe, out or SHIPPED_PLANNER, run_dir, command="thrifty " + " ".join(sys.argv[1:]),
                         stop_at=stop_at)
    console.print(f"planner written to {path}; measure it with `thrifty bench planner --model {path}`")


def _episode_counts(text: str, levels: list[str]) -> dict[str, int]:
    """--episodes: "N" (every level) or "LEVEL=N,..." (the named levels, each one of `levels`)."""
    if text.strip().isdigit():
        n = int(text)
        if n < 1:
            fail(f"--episodes must be >= 1, got {n}")
        return {lv: n for lv in levels}
    counts = {}
    for part in text.split(","):
        name, _, n = part.partition("=")
        name = name.strip()
        if name not in levels or not n.strip().isdigit() or int(n) < 1:
            fail(f"--episodes must be N or LEVEL=N,... with LEVEL one of {', '.join(levels)} and N >= 1, got "
                 f"{part.strip()!r}")
        counts[name] = int(n)
    return counts


def _layers(text: Optional[str]) -> Optional[tuple[int, ...]]:
    if not text:
        return None
    return comma_list(text, int, "--layers")


@train_app.command("saliency")
def train_saliency_cmd(
    model: Optional[Path] = typer.Option(None, help="model directory (default: the shipped planner)"),
    data: Optional[Path] = typer.Option(None, help="Dolly-15k style JSONL (instruction, context, response); "
                                                   "default: the planner's own expert transcripts"),
    out: Path = typer.Option(Path("runs/pruner/saliency.safetensors"), help="saliency file to write"),
    layers: Optional[str] = typer.Option(None, help="prune layers, e.g. 1,2,3 (default: derived from depth)"),
    samples: int = typer.Option(1500, min=1, help="decision samples"),
    memory_share: float = typer.Option(0.5, help="share of cuts at the memory steps of episodes that have them "
                                                 "(the Memory levels' junction)"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, min=1, help="torch threads"),
) -> None:
    """E-RECAP Stage 1: per-token saliency (gradient x hidden state) at the prune layers."""
    from thrifty.backbones import ModelLoadError
    from thrifty.bench import SHIPPED_PLANNER
    from thrifty.train.saliency import train_saliency

    try:
        path = train_saliency(model or SHIPPED_PLANNER, out, data=data, layers=_layers(layers), samples=samples,
                              seed=seed, threads=threads, command="thrifty " + " ".join(sys.argv[1:]),
                              memory_share=memory_share)
    except (ModelLoadError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    console.print(f"saliency written to {path}; next: `thrifty train pruner --saliency {path}`")


@train_app.command("pruner")
def train_pruner_cmd(
    model: Optional[Path] = typer.Option(None, help="model directory (default: the shipped planner)"),
    saliency: Path = typer.Option(Path("runs/pruner/saliency.safetensors"), help="Stage 1 file"),
    out: Optional[Path] = typer.Option(None, help="pruner directory to write (default: the shipped asset's place)"),
    keep_ratio: float = typer.Option(0.6, help="compounding per-layer keep ratio the budget term aims at"),
    max_kept: Optional[int] = typer.Option(None, min=1, help="token cap to train for: at most this many prunable "
                                           "tokens survive each prune layer (inference's max_kept)"),
    steps: int = typer.Option(300, min=1, help="optimisation steps"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, min=1, help="torch threads"),
) -> None:
    """E-RECAP Stage 2: one scorer per prune layer, trained against the frozen model (KL + ranking + budget)."""
    from thrifty.backbones import ModelLoadError
    from thrifty.bench import SHIPPED_PLANNER
    from thrifty.techniques.token_pruning import SHIPPED_PRUNER
    from thrifty.train.pruner import train_pruner

    if not saliency.exists():
        fail(f"no saliency file at {saliency}: run `thrifty train saliency --out {saliency}` first (Stage 1)")
    try:
        path = train_pruner(model or SHIPPED_PLANNER, saliency, out or SHIPPED_PRUNER.parent, keep_ratio=keep_ratio,
                            steps=steps, seed=seed, threads=threads, command="thrifty " + " ".join(sys.argv[1:]),
                            max_kept=max_kept)
    except (ModelLoadError, ValueError, FileNotFoundError) as e:
        fail(str(e))
    console.print(f"pruner written to {path}")


@train_app.command("exits")
def train_exits_cmd(
    model: Path = typer.Option(None, help="planner directory (default: the shipped planner)"),
    out: Path = typer.Option(None, help="exit-head directory to write (default: the shipped asset's place, "
                             "thrifty/assets/planner_exits)"),
    run_dir: Path = typer.Option(Path("runs/exits"), help="recorded rollout features (a rerun reuses them)"),
    levels: Optional[str] = typer.Option(None, help="levels to roll out on (default: the recipe's four BabyAI levels)"),
    episodes: Optional[int] = typer.Option(None, min=2, help="closed-loop episodes per level (default: the recipe's)"),
    steps: Optional[int] = typer.Option(None, min=1, help="optimisation steps (default: the recipe's)"),
    seed: int = typer.Option(0, help="seed of the split, the initialisation and the batches"),
    threads: int = typer.Option(1, min=1, help="torch threads"),
) -> None:
    """Train the planner's shared exit head for the `early_exit` technique (DeeR-VLA), by self-distillation on
    the planner's own closed-loop decisions; writes the head with its held-out consistency scores and card."""
    from thrifty.backbones.hf import ModelLoadError
    from thrifty.bench import SHIPPED_PLANNER
    from thrifty.envs.babyai_text import UnknownLevelError, level_id
    from thrifty.techniques.early_exit import SHIPPED_EXIT_HEAD
    from thrifty.train.exits import ExitsRecipe, train_exits

    recipe = ExitsRecipe(threads=threads, seed=seed)
    if levels:
        recipe.levels = [lv.strip() for lv in levels.split(",") if lv.strip()]
        try:
            for lv in recipe.levels:
                level_id(lv)
        except UnknownLevelError as e:
            fail(str(e))
    if episodes:
        recipe.episodes_per_level = episodes
    if steps:
        recipe.steps = steps
    try:
        path = train_exits(model or SHIPPED_PLANNER, out or SHIPPED_EXIT_HEAD, run_dir, recipe,
                           command="thrifty " + " ".join(sys.argv[1:]))
    except (ModelLoadError, OSError, ValueError) as e:
        fail(str(e))
    console.print(f"exit head written to {path}; use it with technique early_exit (settings head={path})")


@train_app.command("planner-rl")
def train_planner_rl_cmd(
    model: Path = typer.Option(None, help="behaviour-cloned planner to start from (default: the shipped planner)"),
    out: Path = typer.Option(Path("runs/planner_rl/export"), help="planner directory to write"),
    run_dir: Path = typer.Option(Path("runs/planner_rl"), help="resumable checkpoint, metrics.jsonl, curves"),
    levels: Optional[str] = typer.Option(None, help="levels to learn on, comma-separated (default: GoToLocal)"),
    iterations: Optional[int] = typer.Option(None, min=1, help="PPO iterations (default: the recipe's)"),
    episodes: Optional[int] = typer.Option(None, min=1, help="rollout episodes per iteration"),
    lr: Optional[float] = typer.Option(None, help="planner learning rate (default: the recipe's)"),
    kl_coef: Optional[float] = typer.Option(None, help="weight of the KL guard against the BC planner"),
    entropy_coef: Optional[float] = typer.Option(None, help="weight of the entropy bonus"),
    temperature: Optional[float] = typer.Option(None, help="the policy's softmax temperature over the action words "
                                                           "(acting and learning alike)"),
    val_episodes: Optional[int] = typer.Option(None, min=1, help="validation episodes per level"),
    replay: Optional[str] = typer.Option(None, help="none | surprise (EchoRL's prioritized hot/cold replay) | "
                                                   "uniform (the ablation)"),
    replay_episodes: Optional[int] = typer.Option(None, min=1, help="replayed episodes per update (with replay)"),
    shaping: Optional[float] = typer.Option(None, min=0, help="weight of the potential-based shaping (approach the "
                                                             "mission's object), 0 = the level's reward alone"),
    rollout_workers: int = typer.Option(0, min=0, help="Ray rollout actors (0: rollouts in this process)"),
    latent_plans: bool = typer.Option(False, help="a trajectory encoder's plan as a soft prompt on each "
                                                  "observation (EchoRL's latent plans)"),
    rollout_reuse: bool = typer.Option(True, help="rollouts through exact prefix reuse (--no-rollout-reuse: "
                                                  "every decision recomputes its context, the bandwidth baseline)"),
    seed: int = typer.Option(0, help="seed of the sampling and the minibatches"),
    threads: int = typer.Option(2, min=1, help="torch threads"),
) -> None:
    """PPO on the planner from its own closed-loop experience (EchoRL's learner): rollouts through exact prefix
    reuse, one teacher-forced pass per episode, GAE, clipped surrogate, value head, entropy bonus, KL guard
    against the BC planner; resumes from RUN_DIR (a run with another recipe is refused)."""
    import dataclasses
    import json

    from thrifty.bench import SHIPPED_PLANNER
    from thrifty.envs.babyai_text import UnknownLevelError, level_id
    from thrifty.train.planner_rl import PlannerRLError, PPORecipe, plot_metrics, train_planner_rl

    changes = {k: v for k, v in {"iterations": iterations, "episodes_per_iteration": episodes, "lr": lr,
                                 "kl_coef": kl_coef, "entropy_coef": entropy_coef, "temperature": temperature,
                                 "val_episodes": val_episodes, "replay": replay, "replay_episodes": replay_episodes,
                                 "rollout_reuse": rollout_reuse, "latent_plans": latent_plans,
                                 "rollout_workers": rollout_workers, "shaping": shaping}.items()
               if v is not None}
    try:
        if levels:
            changes["levels"] = tuple(lv.strip() for lv in levels.split(",") if lv.strip())
            for lv in changes["levels"]:
                level_id(lv)
        recipe = dataclasses.replace(PPORecipe(threads=threads, seed=seed), **changes)
        path = train_planner_rl(model or SHIPPED_PLANNER, out, run_dir, recipe,
                                command="thrifty " + " ".join(sys.argv[1:]))
    except (UnknownLevelError, PlannerRLError, OSError) as e:
        fail(str(e))
    card = json.loads((path / "card.json").read_text())
    plot = plot_metrics(card["metrics"], Path(run_dir) / "curves.png")
    console.print(f"planner written to {path} (curves: {plot}); measure it with "
                  f"`thrifty bench planner --model {path}`")
