"""`thrifty train relic` and `thrifty eval-relic`: ReLIC's partial-update PPO on the Darkroom family, and its
in-context curve on held-out tasks."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from thrifty.cli._app import app, console, fail, train_app


@train_app.command("relic")
def train_relic_cmd(
    run_dir: Path = typer.Option(Path("runs/relic"), help="metrics.jsonl and the resumable checkpoint"),
    out: Optional[Path] = typer.Option(None, help="where to save the final policy and its card"),
    variant: str = typer.Option("darkroom-ad", help="darkroom, darkroom-ad, darkroom-hard or key-to-door"),
    arch: str = typer.Option("relic", help="relic (transformer) or rl2 (LSTM baseline)"),
    trials: int = typer.Option(200, min=1),
    num_envs: int = typer.Option(8, min=1),
    trial_steps: int = typer.Option(400, min=1, help="N: steps per trial"),
    updates_per_trial: int = typer.Option(4, min=1, help="K: an update every N / K steps, the last one full "
                                          "(1: no partial updates)"),
    epochs: int = typer.Option(4, min=1),
    minibatch_envs: int = typer.Option(4, min=1),
    lr: float = typer.Option(3e-4),
    entropy_coef: float = typer.Option(0.01),
    sink: str = typer.Option("kv", help="Sink-KV variant: none, zero, k, v, kv, token"),
    inter_episode: bool = typer.Option(True, help="attend across the trial's episodes (off: one episode)"),
    shuffle: bool = typer.Option(True, help="shuffle completed episodes after each partial update"),
    d_model: int = typer.Option(64),
    layers: int = typer.Option(2),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, min=1),
    stop_at: Optional[int] = typer.Option(None, min=1, help="stop after this many trials (resume later)"),
) -> None:
    """Train a ReLIC policy (or the RL² baseline) with partial-update PPO; resumes from RUN_DIR."""
    from thrifty.envs.darkroom import UnknownDarkroomVariantError
    from thrifty.train.relic import RelicTrainConfig, train_relic

    model = {"d_model": d_model}
    if arch == "relic":
        model.update(n_layers=layers, sink=sink, inter_episode=inter_episode)
    cfg = RelicTrainConfig(variant=variant, arch=arch, num_envs=num_envs, trial_steps=trial_steps,
                           updates_per_trial=updates_per_trial, trials=trials, epochs=epochs,
                           minibatch_envs=minibatch_envs, lr=lr, entropy_coef=entropy_coef, shuffle_episodes=shuffle,
                           seed=seed, threads=threads, model=model)
    try:
        cfg.check()
        train_relic(cfg, run_dir, out=out)
    except (ValueError, UnknownDarkroomVariantError) as e:
        fail(str(e))
    console.print(f"metrics: {run_dir / 'metrics.jsonl'}" + (f"\npolicy: {out}" if out else ""))


@app.command("eval-relic")
def eval_relic_cmd(
    policy: Optional[list[Path]] = typer.Option(None, help="a trained policy directory (ReLIC or RL²); repeat to "
                                                "compare (default: the shipped thrifty/assets/relic_policy)"),
    variant: str = typer.Option("darkroom-ad"),
    episodes: int = typer.Option(30, min=1, help="episodes per trial (training used fewer: ReLIC evaluates longer)"),
    trials: int = typer.Option(40, min=1, help="trials, spread evenly over the held-out tasks"),
    expert_episodes: int = typer.Option(0, min=0, help="the expert acts for the first k episodes (few-shot)"),
    split: str = typer.Option("heldout", help="heldout or train tasks"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(1, min=1),
    out: Path = typer.Option(Path("results/relic_eval.json"), help="results (JSON); a plot beside it"),
) -> None:
    """The in-context curve: return per episode index on held-out tasks, mean and standard error."""
    import torch

    from thrifty.agents.rl2_policy import load_trial_policy
    from thrifty.bench.relic_eval import curve_summary, evaluate_trials, plot_curves
    from thrifty.envs.darkroom import DarkroomVectorEnv

    from thrifty.bench.policy_suites import ASSETS

    torch.set_num_threads(threads)
    space = DarkroomVectorEnv(variant).single_observation_space
    results = {}
    for path in policy or [ASSETS / "relic_policy"]:
        try:
            model = load_trial_policy(path, space)
            r = evaluate_trials(model, variant, episodes=episodes, trials=trials, split=split, seed=seed,
                                expert_episodes=expert_episodes)
        except (ValueError, FileNotFoundError) as e:
            fail(str(e))
        r["summary"] = curve_summary(r) if episodes >= 20 else None
        results[str(path)] = r
        s = r["summary"]
        first = f"after {expert_episodes} expert episode(s), first own episode" if expert_episodes else "episode 1"
        console.print(f"{path}: {first} {r['mean'][expert_episodes]:.2f}, last {r['mean'][-1]:.2f}, optimal "
                      f"{r['optimal']:.2f}" + (f"; episodes 15-20 {s['episodes_15_20']:.2f} "
                                               f"({s['late_over_first']:.1f}x episode 1, "
                                               f"{s['late_over_optimal']:.2f} of optimal)" if s else ""))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    console.print(f"results: {out}\nplot: {plot_curves(results, out.with_suffix('.png'))}")


@app.command("profile-relic")
def profile_relic_cmd(
    policy: Optional[Path] = typer.Option(None, help="a trained ReLIC policy (default: the shipped one)"),
    variant: str = typer.Option("darkroom-ad", help="the environment whose spaces and horizon the steps follow"),
    batch: int = typer.Option(20, min=1),
    context: int = typer.Option(8192, min=1, help="steps of history before the timed steps"),
    repeats: int = typer.Option(50, min=1),
    long_trial_steps: int = typer.Option(65536, min=0, help="then act one trial of this many steps (0: skip)"),
    threads: int = typer.Option(1, min=1),
    out: Path = typer.Option(Path("results/relic_profile.json")),
) -> None:
    """Acting throughput (actions/s) and KV-cache bytes at BATCH x CONTEXT, and one long trial step by step."""
    import torch
    from rich.progress import Progress

    from thrifty.agents.relic_policy import RelicPolicy
    from thrifty.bench.relic_profile import acting_throughput, long_trial
    from thrifty.bench.policy_suites import ASSETS
    from thrifty.envs.darkroom import DarkroomVectorEnv, UnknownDarkroomVariantError, get_spec

    torch.set_num_threads(threads)
    try:
        spec, env = get_spec(variant), DarkroomVectorEnv(variant)
        model = RelicPolicy.load(policy or ASSETS / "relic_policy", env.single_observation_space)
    except (ValueError, FileNotFoundError, UnknownDarkroomVariantError) as e:
        fail(str(e))
    params = sum(p.numel() for p in model.parameters())
    result = {"policy": str(policy or ASSETS / "relic_policy"), "parameters": params,
              "variant": variant}
    row = acting_throughput(model, batch=batch, context=context, repeats=repeats, horizon=spec.horizon)
    result["acting"] = row
    console.print(f"batch {batch}, {context} steps of context: {row['actions_per_s']:.0f} actions/s "
                  f"({row['step_median_s'] * 1e3:.2f} ms a step), KV cache {row['kv_bytes'] / 2**20:.1f} MiB "
                  f"({row['kv_dtype']}), {params:,} parameters")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if long_trial_steps:
        with Progress(console=console) as bar:
            task = bar.add_task(f"one trial of {long_trial_steps} steps", total=long_trial_steps)
            trial = long_trial(model, steps=long_trial_steps, horizon=spec.horizon,
                               progress=lambda n: bar.advance(task, n))
        result["long_trial"] = trial
        console.print(f"one {long_trial_steps}-step trial: {trial['wall_s']:.0f} s ({trial['steps_per_s']:.0f} "
                      f"steps/s), KV cache {trial['kv_bytes'] / 2**20:.1f} MiB, peak RSS "
                      f"{trial['peak_rss_bytes'] / 2**30:.2f} GiB")
        out.write_text(json.dumps(result, indent=1))
    console.print(f"results: {out}")
