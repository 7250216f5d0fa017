import json
import warnings

import pytest
from typer.testing import CliRunner

from thrifty.agents.planner import WARMUP_DECISIONS
from thrifty.bench import SHIPPED_PLANNER, Job, ResultsFile, get_suite, run_jobs
from thrifty.bench.suites import PRUNING_TECHNIQUES, BenchConfig, Suite, episode_fn
from thrifty.cli import app
from thrifty.envs import BabyAITextEnv
from thrifty.techniques.base import forget_warnings
from thrifty.techniques.pruning_common import PruningNoOpWarning

runner = CliRunner()
DETERMINISTIC = ("success", "steps", "decisions", "unparseable", "actions", "tokens_context_mean", "flops_total")


def test_unknown_suite_lists_the_suites():
    r = runner.invoke(app, ["bench", "nosuch"])
    assert r.exit_code == 2 and "unknown suite 'nosuch'" in r.output and "demo" in r.output


def test_unknown_level_lists_the_levels():
    r = runner.invoke(app, ["bench", "demo", "--level", "Moon"])
    assert r.exit_code == 2 and "unknown BabyAI-Text level 'Moon'" in r.output and "GoToLocal" in r.output


def test_missing_model_directory(tmp_path):
    r = runner.invoke(app, ["bench", "demo", "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no model directory" in r.output


def test_results_file_from_another_suite_is_refused_and_kept(tmp_path, tiny_planner_dir, tiny_pruner_path,
                                                            tiny_exit_head_dir):
    out = tmp_path / "r.jsonl"
    ResultsFile(out, "replan", meta={})
    before = out.read_bytes()
    r = runner.invoke(app, ["bench", "demo", "--out", str(out), "--model", str(tiny_planner_dir),
                            "--pruner", str(tiny_pruner_path), "--exit-head", str(tiny_exit_head_dir)])
    assert r.exit_code == 2 and "replan" in r.output and "demo" in r.output
    assert out.read_bytes() == before


def test_token_pruning_suite_on_another_model_needs_its_pruner(tmp_path, tiny_planner_dir):
    out = tmp_path / "demo.jsonl"
    r = runner.invoke(app, ["bench", "demo", "--out", str(out), "--model", str(tiny_planner_dir)])
    assert r.exit_code == 2 and "--pruner" in r.output and "trained for" in r.output
    assert not out.exists()  # refused before any episode ran


def test_early_exit_suite_on_another_model_needs_its_exit_head(tmp_path, tiny_planner_dir, tiny_pruner_path):
    out = tmp_path / "demo.jsonl"
    r = runner.invoke(app, ["bench", "demo", "--out", str(out), "--model", str(tiny_planner_dir),
                            "--pruner", str(tiny_pruner_path)])
    assert r.exit_code == 2 and "exit head" in r.output and "thrifty train exits" in r.output
    assert "--exit-head" in r.output and not out.exists()


def test_bench_end_to_end_writes_results_table_and_plot(tmp_path, tiny_planner_dir, tiny_pruner_path,
                                                       tiny_exit_head_dir):
    out = tmp_path / "demo.jsonl"
    args = ["bench", "demo", "--out", str(out), "--model", str(tiny_planner_dir), "--episodes", "1",
            "--level", "GoToLocal", "--threads", "1", "--max-steps", "10", "--pruner", str(tiny_pruner_path),
            "--exit-head", str(tiny_exit_head_dir)]
    forget_warnings()  # as in a fresh process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    noop = [str(w.message).split(":")[0] for w in caught if issubclass(w.category, PruningNoOpWarning)]
    assert sorted(noop) == sorted(PRUNING_TECHNIQUES)  # once per technique, not per decision or configuration
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["kind"] == "header" and lines[0]["suite"] == "demo"
    configs = [c.name for c in get_suite("demo").configs]
    assert [x["config"] for x in lines[1:]] == configs and all(x["level"] == "GoToLocal" for x in lines[1:])
    assert out.with_suffix(".png").stat().st_size > 0
    assert "success" in r.output and "distinct" in r.output
    env = BabyAITextEnv("GoToLocal")  # every row names its episode: one seed, the same episode for all configs
    env.reset(seed=lines[1]["seed"])
    assert {x["episode_key"] for x in lines[1:]} == {env.episode_key}
    assert all(x["warmup_decisions"] == WARMUP_DECISIONS for x in lines[1:]) and "warm-up left out" in r.output
    paired = json.loads(out.with_name("demo_paired.json").read_text())  # every config against full, same seed
    assert [x["config"] for x in paired] == configs[1:] and all(x["pairs"] == 1 for x in paired)
    # resuming runs nothing new
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0 and len(out.read_text().splitlines()) == 1 + len(configs)


@pytest.mark.filterwarnings("ignore::thrifty.techniques.pruning_common.PruningNoOpWarning")  # 4-step contexts
def test_memory_suite_runs_its_level_and_pins_its_own_planner_and_pruner(tmp_path, tiny_planner_dir,
                                                                        tiny_pruner_path, monkeypatch):
    """`memory` defaults to the memory planner and pruner (not the BabyAI ones) and prunes from layer 0 on; it runs
    end to end on MemoryVariedTyped (here with the tiny 3-layer planner, so at its one prunable layer)."""
    import dataclasses

    from thrifty.bench.suites import MEMORY_PLANNER, MEMORY_PRUNE_LAYERS, MEMORY_PRUNER, SUITES

    spec = get_suite("memory")
    assert spec.model == MEMORY_PLANNER and spec.levels == ("MemoryVariedTyped",)
    pruned = [c for c in spec.configs if c.technique != "full"]
    assert pruned and all(c.settings["layers"] == list(MEMORY_PRUNE_LAYERS) for c in pruned)
    assert all(c.settings["pruner"] == str(MEMORY_PRUNER) for c in pruned if c.technique == "token_pruning")
    tiny = tuple(dataclasses.replace(c, settings={k: v for k, v in c.settings.items() if k not in ("layers", "pruner")})
                 for c in spec.configs)
    monkeypatch.setitem(SUITES, "memory", dataclasses.replace(spec, configs=tiny))
    out = tmp_path / "memory.jsonl"
    r = runner.invoke(app, ["bench", "memory", "--out", str(out), "--model", str(tiny_planner_dir), "--episodes", "1",
                            "--threads", "1", "--max-steps", "4", "--pruner", str(tiny_pruner_path)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert [x["config"] for x in lines] == [c.name for c in spec.configs]
    assert all(x["level"] == "MemoryVariedTyped" and x["steps"] <= 4 for x in lines)


def test_suites_and_techniques_are_listed():
    assert "demo" in runner.invoke(app, ["suites"]).output
    assert "full" in runner.invoke(app, ["techniques"]).output


@pytest.mark.own_process
def test_ray_gives_the_same_episodes_as_in_process(tmp_path, tiny_planner_dir):
    import ray

    suite = Suite("t", "test", (BenchConfig("full"),), levels=("GoToLocal", "PickupLoc"), episodes=2)
    jobs = suite.jobs()
    fn = episode_fn(suite, tiny_planner_dir, threads=1, max_steps=8)
    local = run_jobs(jobs, fn, ResultsFile(tmp_path / "a.jsonl", "t"), progress=False)
    try:
        remote = run_jobs(jobs, fn, ResultsFile(tmp_path / "b.jsonl", "t"), use_ray=True, progress=False)
    finally:
        ray.shutdown()
    assert [{k: r[k] for k in DETERMINISTIC} for r in local] == [{k: r[k] for k in DETERMINISTIC} for r in remote]


def test_demo_suite_is_defined():
    assert get_suite("demo").configs[0].name == "full"


def test_demo_and_pruning_suites_hold_token_pruning_and_its_matched_baselines():
    for name in ("demo", "pruning"):
        configs = get_suite(name).configs
        techniques = {c.technique for c in configs}
        assert {"full", "token_pruning", "random_pruning", "recency_pruning", "sink_window"} <= techniques
        # the baselines run at keep ratios token_pruning also runs at, so token counts match
        tp = {c.settings["keep_ratio"] for c in configs if c.technique == "token_pruning"}
        assert all(c.settings["keep_ratio"] in tp for c in configs if c.technique in
                   ("random_pruning", "recency_pruning", "sink_window"))
    assert {0.9, 0.8, 0.7} <= {c.settings.get("keep_ratio") for c in get_suite("pruning").configs}


@pytest.mark.parametrize("args, message", [
    (["profile", "--model", "tiny-3x64", "--keep", "1.5", "--lengths", "32"], "keep_ratio"),
    (["profile", "--model", "tiny-3x64", "--keep", "0.7,x"], "--keep must be comma-separated numbers"),
    (["profile", "--model", "tiny-3x64", "--mode", "decode", "--lengths", "32"], "mode must be one of"),
    (["train", "pruner", "--saliency", "/nonexistent/s.safetensors"], "run `thrifty train saliency"),
    (["train", "saliency", "--layers", "1,a"], "--layers must be comma-separated"),
])
def test_pruning_commands_refuse_bad_input_clearly(args, message):
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and message in r.output, r.output


@pytest.mark.skipif(not (SHIPPED_PLANNER / "card.json").exists(), reason="shipped planner not built yet")
def test_shipped_planner_has_a_complete_card_and_loads():
    from thrifty.agents.planner import TextPlanner

    card = json.loads((SHIPPED_PLANNER / "card.json").read_text())
    for key in ("recipe", "command", "data", "seed", "training", "success"):
        assert key in card, key
    assert sum(f.stat().st_size for f in SHIPPED_PLANNER.iterdir()) <= 20 * 2**20
    planner = TextPlanner.load(SHIPPED_PLANNER)
    assert planner.backbone.family == "llama"


def test_write_card_records_measured_success_per_level(tmp_path, tiny_planner_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_planner_dir, model)
    args = ["bench", "planner", "--out", str(tmp_path / "p.jsonl"), "--model", str(model), "--episodes", "1",
            "--level", "GoToLocal", "--threads", "1", "--max-steps", "4", "--write-card"]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "card.json does not exist" in r.output
    (model / "card.json").write_text('{"name": "tiny"}')
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    card = json.loads((model / "card.json").read_text())
    assert card["name"] == "tiny" and card["success"]["GoToLocal"]["episodes"] == 1
    assert card["success_measured_by"]["command"].startswith("thrifty bench planner")


def test_bench_coop_refuses_options_of_the_babyai_suites():
    r = runner.invoke(app, ["bench", "coop", "--level", "GoToLocal"])
    assert r.exit_code == 2 and "bench-coop --help" in r.output
    assert "coop" in runner.invoke(app, ["suites"]).output


def test_bench_coop_refuses_prune_layers_the_model_or_pruner_lacks(tmp_path):
    out = tmp_path / "coop.jsonl"
    r = runner.invoke(app, ["bench-coop", "--layers", "1,3", "--out", str(out)])
    assert r.exit_code == 2 and "out of range" in r.output and not out.exists()
    r = runner.invoke(app, ["bench-coop", "--layers", "0,x", "--out", str(out)])
    assert r.exit_code == 2 and "--layers must be comma-separated" in r.output


def test_bench_coop_refuses_an_unknown_decoding_and_a_file_decoded_otherwise(tmp_path):
    from thrifty.bench.results import ResultsFile

    out = tmp_path / "coop.jsonl"
    r = runner.invoke(app, ["bench-coop", "--decoding", "beam", "--out", str(out)])
    assert r.exit_code == 2 and "--decoding must be one of free, constrained" in r.output and not out.exists()
    ResultsFile(out, "coop", meta={"decoding": "free"})
    before = out.read_text()
    r = runner.invoke(app, ["bench-coop", "--config", "full", "--sizes", "2", "--episodes", "1", "--out", str(out)])
    assert r.exit_code == 2 and "decoded 'free', not 'constrained'" in r.output and "--decoding free" in r.output
    assert out.read_text() == before


def test_train_planner_refuses_an_unknown_level_and_a_level_without_an_episode_count(tmp_path):
    r = runner.invoke(app, ["train", "planner", "--levels", "MemoryS99", "--run-dir", str(tmp_path)])
    assert r.exit_code == 2 and "unknown BabyAI-Text level 'MemoryS99'" in r.output and "MemoryS13" in r.output
    r = runner.invoke(app, ["train", "planner", "--levels", "MemoryS13", "--run-dir", str(tmp_path)])
    assert r.exit_code == 2 and "pass --episodes N" in r.output
    assert not any(tmp_path.iterdir())  # nothing collected or trained
    r = runner.invoke(app, ["train", "planner", "--episodes", "GoToLocal=10,Nowhere=3", "--run-dir", str(tmp_path)])
    assert r.exit_code == 2 and "LEVEL=N" in r.output and "'Nowhere=3'" in r.output
    r = runner.invoke(app, ["train", "planner", "--episodes", "GoToLocal=0", "--run-dir", str(tmp_path)])
    assert r.exit_code == 2 and "N >= 1" in r.output
    assert not any(tmp_path.iterdir())
    r = runner.invoke(app, ["train", "planner", "--init", str(tmp_path), "--run-dir", str(tmp_path / "run")])
    assert r.exit_code == 2 and "not a planner directory" in r.output and not (tmp_path / "run").exists()


def test_train_coop_pruner_refuses_closed_loop_team_sizes_out_of_range(tmp_path):
    r = runner.invoke(app, ["train", "coop-pruner", "--closed-loop-sizes", "4,9", "--run-dir", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--closed-loop-sizes must be team sizes in 2..8" in r.output
    assert not (tmp_path / "run").exists()  # refused before any transcript is written


def test_config_picks_planner_suite_configurations_and_keeps_the_reference(tmp_path, tiny_planner_dir,
                                                                          tiny_exit_head_dir):
    r = runner.invoke(app, ["bench", "exits", "--config", "nosuch", "--model", str(tiny_planner_dir)])
    assert r.exit_code == 2 and "no configuration ['nosuch']" in r.output and "prefix_reuse" in r.output
    out = tmp_path / "exits.jsonl"
    r = runner.invoke(app, ["bench", "exits", "--config", "reuse+exit r=1 propagate", "--model", str(tiny_planner_dir),
                            "--exit-head", str(tiny_exit_head_dir), "--episodes", "1", "--level", "GoToLocal",
                            "--max-steps", "3", "--threads", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    assert [x["config"] for x in rows] == ["prefix_reuse", "reuse+exit r=1 propagate"]
