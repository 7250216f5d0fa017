"""`thrifty collect metaworld`, `thrifty train policy` and the policy suites of `thrifty bench` (Meta-World)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from thrifty.cli._app import app, console, fail, train_app

collect_app = typer.Typer(no_args_is_help=True, help="Collect expert demonstrations.")
app.add_typer(collect_app, name="collect")


@collect_app.command("metaworld")
def collect_metaworld_cmd(
    out: Path = typer.Option(..., help="demonstration directory (manifest.json + shards/)"),
    tasks: str = typer.Option("MT10", help="task sets (MT10, MT50) and/or task names, comma-separated"),
    episodes: int = typer.Option(100, min=1, help="episodes per task, on training layouts train_seed(0..N-1)"),
    noise: float = typer.Option(0.0, min=0.0, max=1.0, help="probability of executing a random action instead of "
                                "the expert's (the label stays the expert's)"),
    max_steps: int = typer.Option(200, min=1, max=500, help="step cap per episode"),
    first_seed: int = typer.Option(0, min=0, help="first training layout index"),
    frames: bool = typer.Option(False, help="also record an RGB frame per step"),
    camera: str = typer.Option("corner", help="camera for --frames"),
    size: int = typer.Option(64, help="frame size in pixels for --frames"),
) -> None:
    """Play Meta-World's scripted experts on training layouts and write resumable, memory-mappable shards."""
    from thrifty.envs.metaworld import UnknownTaskError, resolve_tasks
    from thrifty.train.demos import CollectSettings

    try:
        settings = CollectSettings(tasks=resolve_tasks(tasks), episodes=episodes, noise=noise, max_steps=max_steps,
                                   first_seed=first_seed, frames=frames, camera=camera, size=size)
    except (UnknownTaskError, ValueError) as e:
        fail(str(e))
    _collect(out, settings)


@collect_app.command("babyai")
def collect_babyai_cmd(
    out: Path = typer.Option(..., help="demonstration directory (manifest.json + shards/)"),
    tasks: str = typer.Option("babyai-UnlockLocal", help="BabyAI grid tasks (babyai-<Level>, a level whose mission "
                              "is fixed), comma-separated"),
    episodes: int = typer.Option(1000, min=1, help="episodes per task, on training seeds train_seed(0..N-1)"),
    noise: float = typer.Option(0.0, min=0.0, max=1.0, help="probability of executing a random turn or step forward "
                                "instead of the bot's action (the label stays the bot's)"),
    first_seed: int = typer.Option(0, min=0, help="first training seed index"),
) -> None:
    """Play minigrid's BabyAI bot with grid observations (the action models' second domain) into shards."""
    from thrifty.envs.babyai_levels import UnknownLevelError
    from thrifty.envs.babyai_grid import BabyAIGridEnv
    from thrifty.train.demos import CollectSettings

    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    try:
        settings = CollectSettings(tasks=names, episodes=episodes, noise=noise, first_seed=first_seed,
                                   domain="babyai")
        for t in names:
            BabyAIGridEnv(t).close()
    except (UnknownLevelError, ValueError) as e:
        fail(str(e))
    _collect(out, settings)


def _collect(out: Path, settings) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from thrifty.train.demos import DemoDirError, collect

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn())
    try:
        with bar:
            t = bar.add_task(f"expert episodes -> {out}", total=settings.episodes * len(settings.tasks))
            manifest = collect(out, settings, progress=lambda n: bar.advance(t, n))
    except (DemoDirError, ValueError) as e:
        fail(str(e))
    counts = manifest.counts()
    for task, c in counts["per_task"].items():
        console.print(f"{task}: {c['episodes']} episodes, {c['steps']} steps, expert success {c['expert_success']:.2f}")
    console.print(f"{counts['episodes']} episodes, {counts['steps']} steps in {out}")


@train_app.command("policy")
def train_policy_cmd(
    data: Path = typer.Option(..., help="demonstration directory (`thrifty collect metaworld`)"),
    out: Optional[Path] = typer.Option(None, help="policy directory to write (default: the shipped asset's place)"),
    run_dir: Path = typer.Option(Path("runs/bc_policy"), help="resumable checkpoint"),
    steps: Optional[int] = typer.Option(None, min=1, help="optimisation steps (default: the recipe's)"),
    hidden: Optional[int] = typer.Option(None, min=1, help="hidden width (default: the recipe's)"),
    layers: Optional[int] = typer.Option(None, min=1, help="hidden layers (default: the recipe's)"),
    threads: int = typer.Option(2, min=1, help="torch threads"),
) -> None:
    """Behaviour-clone the MLP policy on Meta-World demonstrations (resumes from RUN_DIR)."""
    from thrifty.bench.policy_suites import SHIPPED_BC_POLICY
    from thrifty.train.demos import DemoDirError
    from thrifty.train.policy import BCRecipe, train_policy

    recipe = BCRecipe(threads=threads)
    for name, value in (("steps", steps), ("hidden", hidden), ("layers", layers)):
        if value is not None:
            setattr(recipe, name, value)
    try:
        path = train_policy(recipe, data, out or SHIPPED_BC_POLICY, run_dir, command="thrifty " + " ".join(sys.argv[1:]))
    except DemoDirError as e:
        fail(str(e))
    console.print(f"policy written to {path}; measure it with `thrifty bench metaworld --policy {path}`")


def bench_policy_suite(suite: str, out: Optional[Path], episodes: Optional[int], tasks: Optional[list[str]],
                       policy: Optional[Path], threads: Optional[int], max_steps: Optional[int], ray: bool,
                       ray_address: Optional[str], write_card: bool, configs: Optional[list[str]] = None) -> None:
    """`thrifty bench SUITE` for a policy suite: one JSON line per episode, tables per task and overall, a plot."""
    from thrifty.agents.action_model import ActionModelLoadError
    from thrifty.agents.mlp_policy import PolicyLoadError
    from thrifty.bench import ResultsFile, ResultsMismatchError, run_jobs, write_summary_json
    from thrifty.bench.paired import paired_rows, print_paired
    from thrifty.bench.policy_report import policy_plot, print_policy_table, summarize_policy
    from thrifty.bench.policy_suites import (POLICY_SUITES, SHIPPED_BC_POLICY, build_policy, policy_episode_fn,
                                             with_policy_path)
    from thrifty.envs.metaworld import UnknownTaskError, resolve_tasks

    spec = with_policy_path(POLICY_SUITES[suite], policy)
    if configs:
        unknown = [c for c in configs if c not in {x.name for x in spec.configs}]
        if unknown:
            fail(f"suite {suite} has no configuration {unknown}; it has {', '.join(c.name for c in spec.configs)}")
        spec = dataclasses.replace(spec, configs=tuple(c for c in spec.configs if c.name in configs))
    try:
        chosen = resolve_tasks(tasks) if tasks else None
    except UnknownTaskError as e:
        fail(str(e))
    path = policy or SHIPPED_BC_POLICY
    for c in spec.configs:  # build every policy once before any episode, so a bad checkpoint fails at once
        try:
            build_policy(c.as_dict())
        except (PolicyLoadError, ActionModelLoadError, ValueError) as e:
            fail(f"{c.name}: {e}" + ("" if policy else " (rebuild it with the command its guide in docs/ gives)"))
    out = out or Path("results") / f"{suite}.jsonl"
    jobs = spec.jobs(episodes, chosen)
    fn = policy_episode_fn(spec, threads=threads if threads else (1 if ray else None), max_steps=max_steps)
    meta = {"configs": [c.as_dict() for c in spec.configs], "max_steps": max_steps or spec.max_steps, "ray": ray}
    try:
        results = ResultsFile(out, suite, meta=meta)
    except (ResultsMismatchError, ValueError) as e:
        fail(str(e))
    console.print(f"[bold]{suite}[/]: {spec.description}; {len(jobs)} episodes -> {out}")
    records = run_jobs(jobs, fn, results, use_ray=ray, ray_address=ray_address)
    rows = summarize_policy(records, by_task=True, reference=spec.reference)
    overall = summarize_policy(records, by_task=False, reference=spec.reference)
    print_policy_table(rows, console, f"thrifty bench {suite}: per task")
    print_policy_table(overall, console, f"thrifty bench {suite}: all tasks")
    paired = paired_rows(records, reference=spec.reference)
    print_paired(paired, console, f"thrifty bench {suite}: paired with {spec.reference} (same tasks and layouts)")
    plot = policy_plot(rows, out.with_suffix(".png"), f"thrifty bench {suite}")
    summary = write_summary_json(rows + overall, out.with_name(out.stem + "_summary.json"))
    if write_card:
        card_file = Path(path) / "card.json"
        card = json.loads(card_file.read_text())
        name = next(c.name for c in spec.configs if c.policy == "bc-mlp")
        card["success"] = {r["task"]: {k: r[k] for k in ("success", "success_lo", "success_hi", "episodes", "steps",
                                                          "relative_to_reference")}
                           for r in rows + overall if r["config"] == name}
        card["expert_success"] = {r["task"]: r["success"] for r in rows + overall if r["config"] == spec.reference}
        card["success_measured_by"] = "thrifty " + " ".join(sys.argv[1:])
        card_file.write_text(json.dumps(card, indent=2) + "\n")
        console.print(f"success per task written to {card_file}")
    console.print(f"results: {out}\nplot: {plot}\nsummary: {summary}")


@train_app.command("action-model")
def train_action_model_cmd(
    arch: str = typer.Option(..., help="xlstm, mamba or dt (a Llama Decision Transformer)"),
    data: list[Path] = typer.Option(..., help="demonstration directory (`thrifty collect metaworld`); repeat it "
                                    "with one directory per domain (`thrifty collect babyai`) for one model over both"),
    out: Optional[Path] = typer.Option(None, help="model directory (default: runs/action_models/action_model_ARCH, "
                                       "what `thrifty bench lram --policy runs/action_models` reads)"),
    run_dir: Optional[Path] = typer.Option(None, help="resumable checkpoint (default: runs/action_model_ARCH)"),
    steps: Optional[int] = typer.Option(None, min=1, help="optimisation steps (default: the recipe's)"),
    d_model: Optional[int] = typer.Option(None, min=8, help="model width (default: the recipe's)"),
    layers: Optional[int] = typer.Option(None, min=1, help="blocks or layers (default: the recipe's)"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="windows per step (default: the recipe's)"),
    threads: int = typer.Option(2, min=1, help="torch threads"),
) -> None:
    """Train one of LRAM's action models (xLSTM, Mamba, Decision Transformer) on demonstrations of one domain or
    several (one batch per domain per step)."""
    from thrifty.train.action_model import ActionModelRecipe, train_action_model
    from thrifty.train.demos import DemoDirError

    try:
        recipe = ActionModelRecipe(arch=arch, threads=threads)
        for name, value in (("steps", steps), ("d_model", d_model), ("layers", layers), ("batch_size", batch_size)):
            if value is not None:
                setattr(recipe, name, value)
        recipe.model_config()
        run = run_dir or Path(f"runs/action_model_{arch}")
        path = train_action_model(recipe, data if len(data) > 1 else data[0], out or Path("runs/action_models") / f"action_model_{arch}", run,
                                  command="thrifty " + " ".join(sys.argv[1:]))
    except (DemoDirError, ValueError) as e:
        fail(str(e))
    console.print(f"action model written to {path}")


def _parse_arm(name: str) -> tuple[str, int | None, bool]:
    """'xlstm', 'mamba-compiled', 'dt-window50' -> (architecture, window or None, compiled); bad names fail."""
    stem, compiled = (name[: -len("-compiled")], True) if name.endswith("-compiled") else (name, False)
    base, _, window = stem.partition("-window")
    if (base not in ("xlstm", "mamba", "dt") or (window and (base != "dt" or not window.isdigit()))
            or (compiled and base == "dt")):
        fail(f"unknown arm {name!r}: use xlstm, mamba, dt, dt-windowN, xlstm-compiled or mamba-compiled")
    return base, int(window) if window else None, compiled


@app.command("profile-action-models")
def profile_action_models_cmd(
    models: Optional[Path] = typer.Option(None, help="directory holding action_model_xlstm, _mamba, _dt (default: "
                                         "the shipped ones); an untrained model of the recipe's size when absent"),
    contexts: str = typer.Option("50,200,1000,4000,8000,16000,32000", help="context lengths in environment steps"),
    batches: str = typer.Option("1", help="batch sizes, e.g. 1,8,64 (LRAM's emulated batched inference)"),
    arch: Optional[list[str]] = typer.Option(None, help="arms: xlstm, mamba, dt, dt-windowN, xlstm-compiled, "
                                             "mamba-compiled (default xlstm, xlstm-compiled, mamba, dt, dt-window50)"),
    repeats: int = typer.Option(25, min=1, help="timed steps per context (median kept; 5 more warm-up ones)"),
    time_limit: float = typer.Option(0.5, help="stop an arm once a step takes longer (seconds)"),
    memory_limit_mb: float = typer.Option(2048.0, help="stop an arm once its state/KV is larger (MiB)"),
    prefill_limit: float = typer.Option(300.0, help="stop an arm once reading a context's history takes longer (s)"),
    spacing: int = typer.Option(9, min=0, help="untimed steps after each timed one (spreads the timed steps out)"),
    min_warmup: float = typer.Option(3.0, min=0.0, help="seconds of warm-up steps per arm before the first context"),
    passes: int = typer.Option(1, min=1, help="measure every arm this many times, arms interleaved; the table and "
                               "plot keep the median per context over the passes (steadier on a shared machine)"),
    interleave: bool = typer.Option(True, help="keep every arm's state (or KV cache) at every context and time "
                                    "them in turn, round after round, so a drift of the machine hits all alike "
                                    "(--no-interleave: one arm and context after the other, with --spacing)"),
    threads: int = typer.Option(1, min=1),
    out: Path = typer.Option(Path("results/action_models_profile.json"), help="rows (JSON, written after every "
                             "row); the plot beside it. Arms already in it are kept and skipped (resume)"),
    fresh: bool = typer.Option(False, help="ignore the rows already in OUT and measure every arm again"),
) -> None:
    """Per-step latency and state/KV memory of xLSTM, Mamba and the DT against context length and batch size."""
    import json

    import torch

    from thrifty.agents.action_model import ActionModel, ActionModelConfig, ActionModelLoadError, load_action_model
    from thrifty.bench import write_summary_json
    from thrifty.bench.action_profile import (Arm, ProfileLimits, print_profile_table, profile_arm,
                                              profile_interleaved, profile_plot)
    from thrifty.bench.policy_suites import ASSETS
    from thrifty.cli._app import comma_list

    torch.set_num_threads(threads)
    arms = arch or ["xlstm", "xlstm-compiled", "mamba", "dt", "dt-window50"]
    ctx = sorted(comma_list(contexts, int, "--contexts"))
    sizes = list(comma_list(batches, int, "--batches"))
    parsed = {name: _parse_arm(name) for name in arms}  # every arm checked before any is measured
    rows: list[dict] = []
    if out.exists() and not fresh:
        try:
            rows = json.loads(out.read_text())
            assert isinstance(rows, list) and all({"arch", "batch", "context_steps"} <= set(r) for r in rows)
        except (json.JSONDecodeError, AssertionError):
            fail(f"{out} is not a profile-action-models rows file; pass another --out, or --fresh to overwrite it")

    def show(r):
        lat = "      –" if r["latency_median_s"] is None else f"{r['latency_median_s'] * 1e3:8.2f}"
        console.print(f"{r['arch']:>14} batch {r['batch']:>3} context {r['context_steps']:>6}: {lat} ms/step, "
                      f"{r['state_bytes'] / 2**20:8.2f} MiB" + (f"  stopped: {r['stopped']}" if r["stopped"] else ""))

    loaded: dict[str, ActionModel] = {}

    def model_for(name: str) -> ActionModel:
        """Each arm's model is loaded (and compiled) once and reused by later passes."""
        if name not in loaded:
            base, _, compiled = parsed[name]
            path = (models or ASSETS) / f"action_model_{base}"
            try:
                model = load_action_model(path, arch=base)[0] if path.exists() else ActionModel(ActionModelConfig(base))
            except ActionModelLoadError as e:
                fail(str(e))
            if compiled:
                model.backbone.compile_step()
            loaded[name] = model.eval()
        return loaded[name]

    # pass by pass, every arm and batch in turn: a slow spell of the machine hits one pass of one arm
    for p in range(passes):
        for b in sizes:
            todo = [n for n in arms if not any((r["arch"], r["batch"], r.get("pass", 0)) == (n, b, p) for r in rows)]
            for name in sorted(set(arms) - set(todo), key=arms.index):
                console.print(f"{name} batch {b} pass {p + 1}: already in {out} (skipped; --fresh measures it again)")
            if not todo:
                continue
            limits = ProfileLimits(time_limit, memory_limit_mb, prefill_limit)
            arm_rows: list[dict] = []

            def keep(r):
                show(r)
                write_summary_json(rows + arm_rows + [r], out)
                arm_rows.append(r)

            if interleave:  # every arm and context of this batch timed in turn, over the same seconds
                console.print(f"[bold]{', '.join(todo)}[/bold], batch {b}, pass {p + 1} of {passes}, interleaved")
                profile_interleaved([Arm(n, model_for(n), parsed[n][1]) for n in todo], ctx, batch=b,
                                    repeats=repeats, limits=limits, progress=keep, min_warmup_s=min_warmup,
                                    pass_index=p)
            else:
                for name in todo:
                    console.print(f"[bold]{name}[/bold], batch {b}, pass {p + 1} of {passes}")
                    profile_arm(model_for(name), ctx, batch=b, window=parsed[name][1], repeats=repeats,
                                limits=limits, progress=keep, label=name, spacing=spacing, min_warmup_s=min_warmup,
                                pass_index=p)
            rows += arm_rows
    print_profile_table(rows, console)
    plot = profile_plot(rows, out.with_suffix(".png"))
    console.print(f"rows: {out}\nplot: {plot}")
