"""Online refinement of DeeR's thresholds by Bayesian optimisation (`thrifty tune deer`), with `optuna`.

DeeR-VLA's third budget (its `bayesian_optimization.py`, read in ../shared/research/seed-deer-lram.md A3.4; our own
code): start from the thresholds an exit ratio solves on the demonstrations, evaluate them in closed loop, and let
a Bayesian optimiser move them. Reads top to bottom:
1. trial 0 is the solved thresholds themselves (enqueued); its realised mean depth in closed loop is the budget
   (DeeR: "evaluating the initial thresholds online sets the budget");
2. every later trial draws each threshold that may fire (not the last one, nor one at -inf: no exit there) on a log
   scale within [t0 / box, t0 * box] around its solved value (DeeR: a box of +-0.02 / +-0.002);
3. the objective (maximised) is closed-loop success on the tuning layouts minus `penalty` x the mean exit index in
   excess of the budget (exits, not layers, as DeeR's 1.0 x (avg_exit - budget));
4. the tuning layouts are training layouts never used by the demonstrations (train_seed(first_layout + i)), never
   the evaluation layouts the suites report on;
5. trials live in optuna's own storage (sqlite under runs/ by default): a rerun with the same study name resumes
   and runs only the trials still missing. The best trial's thresholds go to a JSON file that the `deer` policy
   reads (`{"thresholds": "results/deer_bo.json"}`).
Metric names (trial user attributes): `success`, `mean_layers`, `mean_exit`, `budget_mean_exit`, `objective`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class BORecipe:
    exit_ratio: float = 0.2
    """the initial thresholds: those this exit ratio solves on the demonstration scores"""
    max_layer: int | None = None
    trials: int = 20
    """trials in all, the initial one included (a resumed study runs only the missing ones)"""
    episodes_per_task: int = 3
    first_layout: int = 5000
    """tuning layouts train_seed(first_layout + i): above the demonstrations' train_seed(0..episodes-1)"""
    penalty: float = 1.0
    """objective = success - penalty x max(0, mean exit index - the budget's)"""
    box: float = 2.0
    """each threshold is searched in [t0 / box, t0 * box] (log scale)"""
    seed: int = 0
    max_steps: int = 200


def _episodes(policy, tasks, recipe: BORecipe) -> tuple[float, float]:
    """(success rate, mean layers run per step) over the tuning layouts."""
    from thrifty.agents.policy import make_env, run_policy_episode
    from thrifty.envs.seeds import train_seed

    wins, layers, steps = 0, 0.0, 0
    for task in tasks:
        env = make_env(task, max_steps=recipe.max_steps)
        for i in range(recipe.episodes_per_task):
            r = run_policy_episode(policy, task, train_seed(recipe.first_layout + i), recipe.max_steps, env=env)
            wins += r["success"]
            layers += r["exit_layer_mean"] * r["steps"]
            steps += r["steps"]
        env.close()
    return wins / (len(tasks) * recipe.episodes_per_task), layers / steps


def tune_deer(recipe: BORecipe, policy_dir: str | Path, storage: str, study_name: str, out: str | Path,
              tasks: tuple[str, ...] | None = None, progress=None) -> dict:
    """Run (or resume) the study; write and return the best trial's thresholds and figures."""
    try:
        import optuna
    except ImportError as e:
        raise ValueError("`thrifty tune deer` needs optuna: pip install 'thrifty[tune]' (or optuna)") from e
    from thrifty.agents.deer_policy import DeerPolicy, load_deer

    init = DeerPolicy.load(policy_dir, exit_ratio=recipe.exit_ratio, max_layer=recipe.max_layer)
    net, t0 = init.net, list(init.thresholds)
    tasks = tasks or tuple(init.card.get("data", {}).get("tasks") or ())
    if not tasks:
        raise ValueError(f"{policy_dir}: its card names no tasks; pass the tasks to tune on")
    free = [k for k in range(len(t0) - 1) if math.isfinite(t0[k]) and t0[k] > 0]
    exit_every = net.cfg.exit_every
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=recipe.seed)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", sampler=sampler,
                                load_if_exists=True)
    settings = {k: v for k, v in asdict(recipe).items() if k != "trials"} | {"policy": str(policy_dir),
                                                                           "tasks": list(tasks)}
    saved = study.user_attrs.get("settings")
    if saved is not None and saved != settings:
        raise ValueError(f"study {study_name!r} in {storage} was run with other settings {saved}; pass another "
                         "--study-name to start a new one (more --trials resume it)")
    study.set_user_attr("settings", settings)
    study.set_user_attr("initial_thresholds", [float(x) for x in t0])
    if not study.trials:
        study.enqueue_trial({f"t{k}": t0[k] for k in free})

    def objective(trial) -> float:
        t = list(t0)
        for k in free:
            t[k] = trial.suggest_float(f"t{k}", t0[k] / recipe.box, t0[k] * recipe.box, log=True)
        policy = DeerPolicy(net, init.card, mode="consistency", thresholds=t, name="deer-bo")
        success, layers = _episodes(policy, tasks, recipe)
        mean_exit = layers / exit_every
        budget = study.user_attrs.get("budget_mean_exit")
        if budget is None:  # the initial trial sets the budget
            budget = mean_exit
            study.set_user_attr("budget_mean_exit", budget)
        value = success - recipe.penalty * max(0.0, mean_exit - budget)
        for k, v in {"success": success, "mean_layers": layers, "mean_exit": mean_exit, "budget_mean_exit": budget,
                     "objective": value, "thresholds": [float(x) for x in t]}.items():
            trial.set_user_attr(k, v)
        if progress:
            progress(trial.number, value, success, layers)
        return value

    done = len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE])
    if done < recipe.trials:
        study.optimize(objective, n_trials=recipe.trials - done)
    best = study.best_trial
    trials = [{"number": t.number, **{k: t.user_attrs.get(k) for k in ("objective", "success", "mean_layers")}}
              for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    initial = trials[0] if trials else None
    result = {"thresholds": best.user_attrs["thresholds"], "best_trial": best.number,
              "success": best.user_attrs["success"], "mean_layers": best.user_attrs["mean_layers"],
              "budget_mean_layers": study.user_attrs["budget_mean_exit"] * exit_every,
              "initial": initial, "initial_thresholds": [float(x) for x in t0], "trials": trials,
              "recipe": asdict(recipe), "policy": str(policy_dir), "storage": storage, "study_name": study_name,
              "tasks": list(tasks), "exit_layers": list(net.exit_layers),
              "note": "success on the tuning layouts (train_seed(first_layout + i)); measure the thresholds on the "
                      "evaluation layouts with the suite (config deer-bo)"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=lambda x: float(x) if isinstance(x, np.floating) else x)
                   + "\n")
    return result
