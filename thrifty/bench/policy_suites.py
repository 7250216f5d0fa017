"""Policy suites: named sets of policies x Meta-World tasks x evaluation layouts, and the episode function.

The same harness as the planner suites (`thrifty.bench.suites`): jobs, one JSON line per episode in a results file,
resume, Ray. A job's `level` field holds the task name and its `seed` the evaluation layout (eval_seed(i)).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from thrifty.bench.results import Job

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_BC_POLICY = ASSETS / "bc_policy"
"""The behaviour-cloned MLP policy on Meta-World MT10 (`thrifty train policy`, see its card)."""
SHIPPED_DEER_POLICY = ASSETS / "deer_policy"
"""DeeR-VLA's multi-exit Llama policy on Meta-World MT10 (`thrifty train deer`, see its card and docs/deer.md)."""
POLICY_MAX_STEPS = 200
"""Step cap of the policy suites: the MT10 experts need at most ~150 steps on evaluation layouts (docs/policies.md)."""


@dataclass(frozen=True)
class PolicyConfig:
    name: str
    policy: str
    """a name in POLICIES"""
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "policy": self.policy, "settings": dict(self.settings)}


def _expert(settings: dict):
    from thrifty.agents.policy import ExpertPolicy

    return ExpertPolicy()


def _bc_mlp(settings: dict):
    from thrifty.agents.mlp_policy import MLPPolicy

    return MLPPolicy.load(settings.get("path") or SHIPPED_BC_POLICY)


def _action_model(settings: dict):
    from thrifty.agents.action_model import ActionModelPolicy

    arch = settings["arch"]
    return ActionModelPolicy.load(settings.get("path") or ASSETS / settings.get("model", f"action_model_{arch}"),
                                  arch=arch, window=settings.get("window"), compile=settings.get("compile", False))


def _deer(settings: dict, mode: str | None = None):
    """DeeR's policy: `exit_ratio` (average-compute budget: thresholds solved on the checkpoint's demonstration
    scores), `max_layer` (peak budget: only that many layers built and loaded), `thresholds` (explicit, one per
    allowed exit), `seed` (random exits); `path` (default: the shipped asset)."""
    from thrifty.agents.deer_policy import DeerPolicy

    known = {"path", "exit_ratio", "max_layer", "thresholds", "seed", "name", "mean_layers"}
    unknown = set(settings) - known
    if unknown:
        raise ValueError(f"unknown deer settings {sorted(unknown)}; known: {sorted(known)}")
    if mode == "random" and (settings.get("exit_ratio") is None) == (settings.get("mean_layers") is None):
        raise ValueError("deer-random needs an exit_ratio (exits drawn from the geometric target DeeR's thresholds "
                         "realise on the demonstrations) or a mean_layers (the target of that mean depth), one of them")
    return DeerPolicy.load(settings.get("path") or SHIPPED_DEER_POLICY, exit_ratio=settings.get("exit_ratio"),
                           max_layer=settings.get("max_layer"), thresholds=settings.get("thresholds"),
                           mode=mode, seed=settings.get("seed", 0), name=settings.get("name"),
                           mean_layers=settings.get("mean_layers"))


def _deer_full(settings: dict):
    if settings.get("exit_ratio") is not None or settings.get("thresholds") is not None:
        raise ValueError("deer-full always takes the last allowed exit: give it no exit_ratio or thresholds "
                         "(only max_layer)")
    return _deer(settings, mode="full")


STATIC_DEER_LAYERS = (2, 4, 6)
"""Depths of the static shallow DeeR models in the `deer` suite (DeeR's RoboFlamingo++ comparison)."""


def static_deer_dir(layers: int) -> Path:
    return Path("runs") / f"deer_static{layers}" / "export"


def static_deer_command(layers: int) -> str:
    return (f"thrifty train deer --data runs/demos_mt10_n03 --run-dir runs/deer_static{layers} --out "
            f"{static_deer_dir(layers)} --steps 700 --layers {layers} --threads 1")


def _deer_static(settings: dict):
    """A DeeR model trained at fewer layers (`layers`), run at its full depth; `path` (default
    runs/deer_static<layers>/export, made by `static_deer_command(layers)`)."""
    unknown = set(settings) - {"layers", "path"}
    if unknown or "layers" not in settings:
        raise ValueError(f"deer-static takes layers (required) and path, got {sorted(settings)}")
    path = Path(settings.get("path") or static_deer_dir(int(settings["layers"])))
    if not (path / "card.json").is_file():
        raise ValueError(f"no static {settings['layers']}-layer DeeR model at {path}: train it with "
                         f"`{static_deer_command(int(settings['layers']))}` (demonstrations: `thrifty collect "
                         "metaworld --tasks MT10 --episodes 150 --noise 0.3 --out runs/demos_mt10_n03`)")
    return _deer_full({"path": str(path)})


POLICIES: dict[str, Callable[[dict], Any]] = {"deer-static": _deer_static, "expert": _expert, "bc-mlp": _bc_mlp, "action-model": _action_model,
                                              "deer": _deer, "deer-full": _deer_full,
                                              "deer-random": partial(_deer, mode="random")}
"""Policy builders by name: settings dict -> an object with the policy protocol (thrifty.agents.policy)."""


@dataclass(frozen=True)
class PolicySuite:
    name: str
    description: str
    configs: tuple[PolicyConfig, ...]
    tasks: tuple[str, ...]
    episodes: int = 30
    """episodes per (config, task), on evaluation layouts eval_seed(0..episodes-1)"""
    max_steps: int = POLICY_MAX_STEPS
    reference: str = "expert"
    """the configuration every other one is paired with"""

    def jobs(self, episodes: int | None = None, tasks: tuple[str, ...] | None = None) -> list[Job]:
        from thrifty.envs.metaworld import eval_seed

        n = self.episodes if episodes is None else episodes
        return [Job(self.name, c.name, t, eval_seed(i), i) for c in self.configs for t in (tasks or self.tasks)
                for i in range(n)]


def _mt10() -> tuple[str, ...]:
    from thrifty.envs.metaworld import TASK_SETS

    return TASK_SETS["MT10"]


_EXPERT = PolicyConfig("expert", "expert")
_BC = PolicyConfig("bc-mlp", "bc-mlp")

POLICY_SUITES: dict[str, PolicySuite] = {
    "metaworld": PolicySuite("metaworld", "Meta-World MT10: the scripted expert and the shipped BC MLP policy on "
                             "evaluation layouts", (_EXPERT, _BC), _mt10(), episodes=30),
    "lram": PolicySuite("lram", "LRAM's action models on Meta-World MT10: xLSTM "
                        "and Mamba stepping with a fixed-size state, against a Decision Transformer over the whole "
                        "history and over a 50-step window",
                        (_EXPERT, PolicyConfig("lram-xlstm", "action-model", {"arch": "xlstm"}),
                         PolicyConfig("lram-mamba", "action-model", {"arch": "mamba"}),
                         PolicyConfig("lram-dt", "action-model", {"arch": "dt"}),
                         PolicyConfig("lram-dt-window50", "action-model", {"arch": "dt", "window": 50})),
                        _mt10(), episodes=30),
    "lram-2domain": PolicySuite("lram-2domain", "one Decision Transformer over two domains (LRAM's multi-domain "
                                "layout): Meta-World MT10 and BabyAI UnlockLocal (grid observations, discrete "
                                "actions), with the experts",
                                (_EXPERT, PolicyConfig("lram-dt-2domain", "action-model",
                                                       {"arch": "dt", "model": "action_model_dt_2domain"})),
                                (*_mt10(), "babyai-UnlockLocal"), episodes=30),
    "deer": PolicySuite("deer", "DeeR-VLA's multi-exit Llama policy on Meta-World MT10: full depth (12 layers), "
                        "dynamic exits by action consistency at exit ratios 0.05, 0.1, 0.2 and 0.5 (average-compute "
                        "budget), random exits drawn from the same target distribution as ratio 0.1, and maximum "
                        "exit layers 6 and 2 (peak budget: the deeper layers not loaded)",
                        (PolicyConfig("deer-full", "deer-full"),
                         PolicyConfig("deer-r0.05", "deer", {"exit_ratio": 0.05}),
                         PolicyConfig("deer-r0.1", "deer", {"exit_ratio": 0.1}),
                         PolicyConfig("deer-r0.2", "deer", {"exit_ratio": 0.2}),
                         PolicyConfig("deer-r0.5", "deer", {"exit_ratio": 0.5}),
                         PolicyConfig("deer-random-r0.1", "deer-random", {"exit_ratio": 0.1}),
                         PolicyConfig("deer-max6", "deer-full", {"max_layer": 6}),
                         PolicyConfig("deer-max2", "deer-full", {"max_layer": 2}),
                         PolicyConfig("deer-max6-r0.5", "deer", {"exit_ratio": 0.5, "max_layer": 6}),
                         *(PolicyConfig(f"deer-static{n}", "deer-static", {"layers": n}) for n in STATIC_DEER_LAYERS)),
                        _mt10(), episodes=30, reference="deer-full"),
    # metaworld-demo: what `make demo` adds, a few seconds: one policy row beside the planner's
    "metaworld-demo": PolicySuite("metaworld-demo", "the shipped BC MLP policy and the expert on three MT10 tasks",
                                  (_EXPERT, _BC), ("reach-v3", "drawer-close-v3", "button-press-topdown-v3"),
                                  episodes=3),
}


def with_policy_path(suite: PolicySuite, path: str | Path | None) -> PolicySuite:
    """The suite with its policies read from `path` (unchanged when None): a BC policy directory for `bc-mlp`
    configs, and for `action-model` configs a directory holding `action_model_<arch>` (what `thrifty train
    action-model` writes under runs/action_models by default), or the config's own `model` name such as
    `action_model_dt_2domain`."""
    if path is None:
        return suite

    def moved(c: PolicyConfig) -> PolicyConfig:
        if c.policy == "bc-mlp":
            return PolicyConfig(c.name, c.policy, {**c.settings, "path": str(path)})
        if c.policy.startswith("deer") and c.policy != "deer-static":  # static models live in their own dirs
            return PolicyConfig(c.name, c.policy, {**c.settings, "path": str(path)})
        if c.policy == "action-model":
            model = c.settings.get("model", f"action_model_{c.settings['arch']}")
            return PolicyConfig(c.name, c.policy, {**c.settings, "path": str(Path(path) / model)})
        return c

    return PolicySuite(suite.name, suite.description, tuple(moved(c) for c in suite.configs), suite.tasks,
                       suite.episodes, suite.max_steps, suite.reference)


def build_policy(config: dict):
    if config["policy"] not in POLICIES:
        raise ValueError(f"unknown policy {config['policy']!r}; policies: {', '.join(POLICIES)}")
    return POLICIES[config["policy"]](config["settings"])


# --- the episode function (top level and plain-data arguments, so Ray can ship it) --------------------------------
_CACHE: dict[tuple, Any] = {}


def run_policy_job(job: Job, configs: dict[str, dict], threads: int, max_steps: int) -> dict:
    """Play the episode `job` names with its policy; returns the result dict."""
    import torch

    from thrifty.agents.policy import make_env, run_policy_episode

    torch.set_num_threads(threads)
    config = configs[job.config]
    pkey = ("policy", job.config, repr(sorted(config["settings"].items())))
    if pkey not in _CACHE:
        _CACHE[pkey] = build_policy(config)
    ekey = ("env", job.level, max_steps)
    if ekey not in _CACHE:
        _CACHE[ekey] = make_env(job.level, max_steps=max_steps)
    result = run_policy_episode(_CACHE[pkey], job.level, job.seed, max_steps=max_steps, env=_CACHE[ekey])
    result["threads"] = threads
    return result


def policy_episode_fn(suite: PolicySuite, threads: int | None = None, max_steps: int | None = None):
    threads = threads or min(2, os.cpu_count() or 1)
    return partial(run_policy_job, configs={c.name: c.as_dict() for c in suite.configs}, threads=threads,
                   max_steps=max_steps or suite.max_steps)
