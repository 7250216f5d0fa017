"""The policy bench: BC policy checkpoints, the policy suites through `thrifty bench`, collect and train commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from thrifty.agents.mlp_policy import MLPConfig, MLPPolicy, MLPPolicyNet, PolicyLoadError, save_policy
from thrifty.agents.policy import run_policy_episode
from thrifty.bench import Job, ResultsFile, run_jobs
from thrifty.bench.policy_suites import POLICY_SUITES, policy_episode_fn, with_policy_path
from thrifty.cli import app
from thrifty.envs.metaworld import eval_seed

runner = CliRunner()
DETERMINISTIC = ("success", "steps", "flops_total", "actions_sha", "invalid_actions")


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    torch.manual_seed(0)
    net = MLPPolicyNet(MLPConfig(hidden=16, layers=1, task_dim=4))
    return save_policy(net, tmp_path_factory.mktemp("policy"), {"data": {"tasks": ["reach-v3", "drawer-close-v3",
                                                                                  "button-press-topdown-v3"]}})


def test_mlp_policy_flops_and_checkpoint_round_trip(tiny_policy_dir):
    p = MLPPolicy.load(tiny_policy_dir)
    assert p.net.flops_per_step() == 2 * ((39 + 4) * 16 + 16 * 4)  # hand count: two linear layers
    p.reset("reach-v3", "reach the goal")
    obs = {"state": np.linspace(-1, 1, 39, dtype=np.float32)}
    a, b = p.act(obs), MLPPolicy.load(tiny_policy_dir)
    b.reset("reach-v3", "reach the goal")
    assert np.array_equal(a.action, b.act(obs).action) and a.cost.flops == p.net.flops_per_step()
    with pytest.raises(ValueError, match="trained on"):
        p.reset("push-v3", "push the puck to the goal")


def test_policy_checkpoint_of_another_kind_is_refused(tmp_path, tiny_policy_dir):
    with pytest.raises(PolicyLoadError, match="expected card.json and model.safetensors"):
        MLPPolicy.load(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"kind": "something-else"}))
    (tmp_path / "model.safetensors").write_bytes((tiny_policy_dir / "model.safetensors").read_bytes())
    with pytest.raises(PolicyLoadError, match="not an MLP policy"):
        MLPPolicy.load(tmp_path)
    card = json.loads((tiny_policy_dir / "card.json").read_text())
    card["config"]["hidden"] = 32
    (tmp_path / "card.json").write_text(json.dumps(card))
    with pytest.raises(PolicyLoadError, match="does not match the architecture"):
        MLPPolicy.load(tmp_path)


def test_policy_bench_end_to_end_resumes_and_refuses_a_foreign_file(tmp_path, tiny_policy_dir):
    out = tmp_path / "mw.jsonl"
    args = ["bench", "metaworld-demo", "--policy", str(tiny_policy_dir), "--out", str(out), "--episodes", "1",
            "--max-steps", "20", "--threads", "1"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "per task" in r.output and "paired with expert" in r.output and "bc-mlp" in r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines[0]["kind"] == "header" and len(lines) == 1 + 2 * 3
    assert {x["level"] for x in lines[1:]} == {"reach-v3", "drawer-close-v3", "button-press-topdown-v3"}
    assert all(x["steps"] <= 20 and x["seed"] == eval_seed(0) for x in lines[1:])
    assert out.with_suffix(".png").stat().st_size > 0
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "resuming, 6 done" in again.output
    assert len(out.read_text().splitlines()) == 7
    other = tmp_path / "other.jsonl"
    ResultsFile(other, "demo", meta={})
    before = other.read_bytes()
    r = runner.invoke(app, ["bench", "metaworld-demo", "--out", str(other), "--policy", str(tiny_policy_dir)])
    assert r.exit_code == 2 and "holds results of suite 'demo'" in r.output and other.read_bytes() == before


def test_policy_bench_bad_inputs(tmp_path, tiny_policy_dir):
    r = runner.invoke(app, ["bench", "metaworld", "--task", "opne-door", "--policy", str(tiny_policy_dir)])
    assert r.exit_code == 2 and "unknown Meta-World task 'opne-door'" in r.output
    r = runner.invoke(app, ["bench", "metaworld", "--policy", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no MLP policy" in r.output
    r = runner.invoke(app, ["bench", "metaworld", "--level", "GoToLocal"])
    assert r.exit_code == 2 and "policy suite" in r.output
    r = runner.invoke(app, ["bench", "nosuch"])
    assert r.exit_code == 2 and "metaworld" in r.output
    r = runner.invoke(app, ["collect", "metaworld", "--tasks", "MT11", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "MT10, MT50" in r.output
    r = runner.invoke(app, ["train", "policy", "--data", str(tmp_path / "nodata")])
    assert r.exit_code == 2 and "no demonstrations at" in r.output


def test_collect_and_train_commands(tmp_path):
    data = tmp_path / "demos"
    r = runner.invoke(app, ["collect", "metaworld", "--tasks", "reach", "--episodes", "7", "--noise", "0.2",
                            "--max-steps", "40", "--out", str(data)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["counts"]["episodes"] == 7 and manifest["settings"]["tasks"] == ["reach-v3"]
    r = runner.invoke(app, ["collect", "metaworld", "--tasks", "push", "--episodes", "7", "--out", str(data)])
    assert r.exit_code == 2 and "other settings" in r.output
    out = tmp_path / "policy"
    r = runner.invoke(app, ["train", "policy", "--data", str(data), "--out", str(out), "--run-dir",
                            str(tmp_path / "run"), "--steps", "30", "--hidden", "16", "--layers", "1",
                            "--threads", "1"])
    assert r.exit_code == 0, r.output
    card = json.loads((out / "card.json").read_text())
    assert card["data"]["tasks"] == ["reach-v3"] and card["curve"][-1]["step"] == 30
    assert card["curve"][-1]["losses/heldout_mse"] is not None
    p = MLPPolicy.load(out)
    assert run_policy_episode(p, "reach-v3", eval_seed(0), max_steps=5)["steps"] <= 5


@pytest.mark.own_process
def test_policy_suite_on_ray_matches_in_process(tmp_path, tiny_policy_dir):
    pytest.importorskip("ray")
    suite = with_policy_path(POLICY_SUITES["metaworld-demo"], tiny_policy_dir)
    jobs = [Job(suite.name, c.name, "reach-v3", eval_seed(i), i) for c in suite.configs for i in range(2)]
    fn = policy_episode_fn(suite, threads=1, max_steps=25)
    local = run_jobs(jobs, fn, ResultsFile(tmp_path / "a.jsonl", suite.name, {}), progress=False)
    remote = run_jobs(jobs, fn, ResultsFile(tmp_path / "b.jsonl", suite.name, {}), use_ray=True, progress=False)
    for a, b in zip(local, remote):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}


def test_train_action_model_command(tmp_path):
    data = tmp_path / "demos"
    assert runner.invoke(app, ["collect", "metaworld", "--tasks", "reach", "--episodes", "6", "--max-steps", "30",
                               "--out", str(data)]).exit_code == 0
    r = runner.invoke(app, ["train", "action-model", "--arch", "lstm", "--data", str(data)])
    assert r.exit_code == 2 and "unknown action-model architecture 'lstm'" in r.output
    out = tmp_path / "xlstm"
    r = runner.invoke(app, ["train", "action-model", "--arch", "xlstm", "--data", str(data), "--out", str(out),
                            "--run-dir", str(tmp_path / "run"), "--steps", "3", "--d-model", "32", "--layers", "1",
                            "--batch-size", "2", "--threads", "1"])
    assert r.exit_code == 0, r.output
    from thrifty.agents.action_model import ActionModelPolicy

    card = json.loads((out / "card.json").read_text())
    assert card["config"]["arch"] == "xlstm" and card["curve"][-1]["step"] == 3 and "reach-v3" in card["target_returns"]
    result = run_policy_episode(ActionModelPolicy.load(out, arch="xlstm"), "reach-v3", eval_seed(0), max_steps=4)
    assert result["steps"] == 4 and result["kv_bytes_max"] > 0 and result["flops_total"] > 0


def test_two_domain_action_model_trains_and_acts_in_both(tmp_path):
    mw, grid = tmp_path / "mw", tmp_path / "grid"
    assert runner.invoke(app, ["collect", "metaworld", "--tasks", "reach", "--episodes", "6", "--max-steps", "30",
                               "--out", str(mw)]).exit_code == 0
    r = runner.invoke(app, ["collect", "babyai", "--tasks", "babyai-GoToRedBallGrey", "--episodes", "8",
                            "--noise", "0.3", "--out", str(grid)])
    assert r.exit_code == 0 and "expert success 1.00" in r.output, r.output
    out = tmp_path / "model"
    r = runner.invoke(app, ["train", "action-model", "--arch", "dt", "--data", str(mw), "--data", str(grid),
                            "--out", str(out), "--run-dir", str(tmp_path / "run"), "--steps", "2", "--d-model", "32",
                            "--layers", "1", "--batch-size", "2", "--threads", "1"])
    assert r.exit_code == 0, r.output
    from thrifty.agents.action_model import ActionModelPolicy

    card = json.loads((out / "card.json").read_text())
    assert card["config"]["domains"] == ["metaworld", "babyai"] and card["config"]["discrete_actions"] == 7
    assert {"reach-v3", "babyai-GoToRedBallGrey"} <= set(card["target_returns"])
    assert {"losses/heldout_ce/metaworld", "losses/heldout_ce/babyai"} <= set(card["curve"][-1])
    policy = ActionModelPolicy.load(out)
    grid_run = run_policy_episode(policy, "babyai-GoToRedBallGrey", eval_seed(0))
    assert grid_run["steps"] >= 1 and grid_run["invalid_actions"] == 0 and grid_run["flops_total"] > 0
    assert run_policy_episode(policy, "reach-v3", eval_seed(0), max_steps=3)["steps"] == 3
    r = runner.invoke(app, ["collect", "babyai", "--tasks", "GoToRedBallGrey", "--episodes", "2", "--out",
                            str(tmp_path / "x")])
    assert r.exit_code == 2 and "babyai-<Level>" in r.output


def test_policy_summary_counts_distinct_episodes_once():
    from thrifty.bench.policy_report import summarize_policy

    rows = [{"config": "a", "level": "reach-v3", "success": s, "episode_key": k, "steps": 10, "flops_total": 0}
            for s, k in ((True, "x"), (False, "x"), (True, "y"), (True, "z"))]
    (row,) = summarize_policy(rows, by_task=False, reference=None)
    assert (row["episodes"], row["distinct_episodes"]) == (4, 3)
    assert row["success"] == pytest.approx((0.5 + 1 + 1) / 3)


@pytest.mark.parametrize("name", sorted(POLICY_SUITES))
def test_every_policy_suite_plays_distinct_episodes_on_its_seeds(name):
    """The floor of the policy suites: every evaluation seed of every task is an episode of its own."""
    from thrifty.agents.policy import make_env

    suite = POLICY_SUITES[name]
    jobs = suite.jobs()
    for task in suite.tasks:
        env = make_env(task, max_steps=suite.max_steps)
        seeds = sorted({j.seed for j in jobs if j.level == task})
        keys = set()
        for s in seeds:
            env.reset(seed=s)
            keys.add(env.episode_key)
        assert len(keys) == len(seeds) == suite.episodes, task
        env.close()
