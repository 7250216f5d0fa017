"""LRAM action models: tokenisation round trip, acting step by step equals the parallel forward, bad inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from thrifty.agents.action_model import (ARCHS, ActionModel, ActionModelConfig, ActionModelLoadError,
                                         ActionModelPolicy, ActionTokenizer, load_action_model, save_action_model)


@given(st.lists(st.floats(-1.0, 1.0, width=32), min_size=1, max_size=16), st.integers(2, 512))
def test_tokenisation_round_trips_within_half_a_bin(xs, bins):
    tok = ActionTokenizer(bins)
    x = torch.tensor(xs)
    idx = tok.encode(x)
    assert int(idx.min()) >= 0 and int(idx.max()) < bins
    assert (tok.decode(idx) - x).abs().max().item() <= tok.width / 2 + 1e-6


def _model(arch: str, window=None) -> ActionModel:
    torch.manual_seed(0)
    return ActionModel(ActionModelConfig(arch, d_model=32, layers=2, heads=4, context_steps=8, window=window)).eval()


def _acted_logits(model: ActionModel, states, rtgs, rewards) -> list[torch.Tensor]:
    """Logits the policy computes when acting step by step (its own feeding of r_{t-1}, s_t, R_t)."""
    policy = ActionModelPolicy(model)
    policy.reset("reach-v3", "reach the goal")
    out = []
    for t in range(states.shape[1]):
        policy.rtg = float(rtgs[0, t])
        act = policy.act({"state": states[0, t].numpy()})
        with torch.no_grad():
            out.append(act)
        policy.observe_reward(float(rewards[0, t]))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_acting_step_by_step_equals_the_parallel_forward(arch):
    model = _model(arch)
    g = torch.Generator().manual_seed(1)
    states, rtgs, rewards = torch.randn(1, 7, 39, generator=g), 50 * torch.rand(1, 7, generator=g), torch.rand(1, 7)
    with torch.no_grad():
        expected = model.tokenizer.decode(model(states, rtgs, rewards)[0].argmax(-1))  # (T, A)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated transformers argument from our calls
        acted = _acted_logits(model, states, rtgs, rewards)
    for t, step in enumerate(acted):
        assert np.array_equal(step.action, expected[t].numpy()), t
        assert step.cost.flops > 0 and step.cost.kv_bytes > 0


def test_dt_sliding_window_keeps_the_newest_steps_only():
    model = _model("dt", window=2)
    policy = ActionModelPolicy(model)
    policy.reset("reach-v3", "")
    for _ in range(5):
        policy.act({"state": np.zeros(39, np.float32)})
        policy.observe_reward(1.0)
    assert all(layer.keys.shape[-2] == 6 for layer in policy.state.layers)  # 2 steps x 3 tokens


def test_recurrent_state_does_not_grow_with_the_context():
    policy = ActionModelPolicy(_model("xlstm"))
    policy.reset("reach-v3", "")
    sizes = []
    for _ in range(12):  # past the 8-step training length: the state is never truncated
        sizes.append(policy.act({"state": np.zeros(39, np.float32)}).cost.kv_bytes)
        policy.observe_reward(0.5)
    assert len(set(sizes)) == 1


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown action-model architecture 'lstm'"):
        ActionModelConfig("lstm")
    with pytest.raises(ValueError, match="window"):
        ActionModelConfig("dt", window=0)
    model = _model("dt")
    with pytest.raises(ValueError, match="built for 8"):
        model(torch.zeros(1, 9, 39), torch.zeros(1, 9), torch.zeros(1, 9))
    with pytest.raises(ValueError, match="metaworld state has 39 dimensions, got 40"):
        model(torch.zeros(1, 2, 40), torch.zeros(1, 2), torch.zeros(1, 2))
    path = save_action_model(model, tmp_path / "dt", {"target_returns": {"reach-v3": 10.0}})
    assert isinstance(load_action_model(path)[0], ActionModel)
    with pytest.raises(ActionModelLoadError, match="is a 'dt' action model, not 'xlstm'"):
        load_action_model(path, arch="xlstm")
    with pytest.raises(ActionModelLoadError, match="no action model"):
        load_action_model(tmp_path / "none")
    policy = ActionModelPolicy.load(path)
    with pytest.raises(ValueError, match="not on 'push-v3'"):
        policy.reset("push-v3", "")


def test_profile_rows_show_constant_recurrent_state_and_growing_kv():
    from thrifty.bench.action_profile import ProfileLimits, profile_arm

    rows = {a: profile_arm(_model(a.split("-")[0]), [4, 20, 40], repeats=1, warmup=0,
                           window=2 if a.endswith("window") else None, limits=ProfileLimits(time_limit_s=60))
            for a in ("xlstm", "mamba", "dt", "dt-window")}
    for arch in ("xlstm", "mamba"):
        assert len({r["state_bytes"] for r in rows[arch]}) == 1
        assert len({r["flops_per_step"] for r in rows[arch]}) == 1  # constant work per step
    kv = [r["state_bytes"] for r in rows["dt"]]
    assert kv[0] < kv[1] < kv[2]  # the whole history: KV grows with the context
    assert len({r["state_bytes"] for r in rows["dt-window"]}) == 1  # a window: it does not
    assert rows["dt"][2]["flops_per_step"] > rows["dt"][0]["flops_per_step"]
    stopped = profile_arm(_model("dt"), [4, 20], repeats=1, warmup=0, limits=ProfileLimits(memory_limit_mb=1e-6))
    assert len(stopped) == 1 and "MB >" in stopped[0]["stopped"]


def test_interleaved_profile_times_every_arm_and_context_from_its_own_state():
    from thrifty.bench.action_profile import Arm, ProfileLimits, profile_interleaved

    arms = [Arm("xlstm", _model("xlstm")), Arm("mamba", _model("mamba")), Arm("dt", _model("dt")),
            Arm("dt-window", _model("dt"), window=2)]
    rows = profile_interleaved(arms, [20, 4, 40], repeats=2, warmup=1, min_warmup_s=0,
                               limits=ProfileLimits(time_limit_s=60))
    by = {a.label: [r for r in rows if r["arch"] == a.label] for a in arms}
    for label, got in by.items():
        assert [r["context_steps"] for r in got] == [4, 20, 40] and all(r["interleaved"] for r in got)
        assert all(r["latency_median_s"] > 0 and r["stopped"] is None for r in got)
    for label in ("xlstm", "mamba", "dt-window"):
        assert len({r["state_bytes"] for r in by[label]}) == 1  # a fixed-size state, or a window
    kv = [r["state_bytes"] for r in by["dt"]]  # at the context the timed steps start from
    assert kv[1] == 5 * kv[0] and kv[2] == 10 * kv[0]
    assert by["dt"][2]["flops_per_step"] > by["dt"][0]["flops_per_step"]
    stopped = profile_interleaved([Arm("xlstm", _model("xlstm"))], [4, 5000], repeats=1, warmup=0, min_warmup_s=0,
                                  limits=ProfileLimits(prefill_limit_s=0.0))
    assert stopped[-1]["latency_median_s"] is None and "not read within" in stopped[-1]["stopped"]


def test_passes_combine_to_the_median_per_context_with_their_range():
    from thrifty.bench.action_profile import combine_passes, flatness

    def row(p, ctx, lat, stopped=None):
        return {"arch": "xlstm", "batch": 1, "context_steps": ctx, "latency_median_s": lat, "state_bytes": 8,
                "flops_per_step": 1.0, "stopped": stopped, "pass": p}

    rows = [row(0, 50, 1.0), row(1, 50, 3.0), row(2, 50, 2.0), row(0, 900, 2.0), row(1, 900, None, "too slow")]
    by_ctx = {r["context_steps"]: r for r in combine_passes(rows)}
    assert (by_ctx[50]["latency_median_s"], by_ctx[50]["latency_min_s"], by_ctx[50]["latency_max_s"],
            by_ctx[50]["passes"]) == (2.0, 1.0, 3.0, 3)
    assert by_ctx[900]["passes"] == 1 and by_ctx[900]["stopped"] == "too slow" and "pass" not in by_ctx[900]
    assert flatness(rows, "xlstm") == 1.0  # medians 2.0 and 2.0
    assert flatness(rows, "dt") is None


def test_multi_domain_vocabulary_keeps_discrete_and_continuous_ids_apart():
    from thrifty.agents.action_model import DOMAINS

    cfg = ActionModelConfig.for_domains("xlstm", ("metaworld", "babyai"), d_model=32, layers=1, heads=4,
                                        context_steps=8)
    assert (cfg.max_state_dim, cfg.max_act_dim, cfg.discrete_actions, cfg.vocab) == (151, 4, 7, 263)
    model = ActionModel(cfg).eval()
    cont = model.targets(torch.tensor([[-1.0, -0.999, 0.0, 1.0]]), "metaworld")
    assert cont.min() >= 7 and cont.max() < 263  # continuous bins sit after the 7 discrete ids
    assert model.targets(torch.tensor([[3.0]]), "babyai").tolist() == [[3]]
    for bad in (7.0, -1.0, 2.5):
        with pytest.raises(ValueError, match=r"whole numbers in \[0, 7\)"):
            model.targets(torch.tensor([[bad]]), "babyai")
    logits = torch.randn(5, 4, 263)
    logits[..., :7] += 100.0  # even when the discrete ids score highest, a Meta-World action stays continuous
    assert model.decode(logits, "metaworld").abs().max() <= 1.0
    logits = torch.randn(5, 4, 263)
    logits[..., 7:] += 100.0
    assert set(model.decode(logits, "babyai").flatten().tolist()) <= set(range(DOMAINS["babyai"].discrete))
    loss = model.loss(torch.randn(2, 3, 151), torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3, 1), "babyai")
    assert torch.isfinite(loss)


def test_a_model_refuses_a_domain_it_was_not_built_for(tmp_path):
    model = _model("xlstm")  # Meta-World only
    path = save_action_model(model, tmp_path / "m", {})
    policy = ActionModelPolicy.load(path)
    with pytest.raises(ValueError, match=r"acts in \['metaworld'\], not in 'babyai'"):
        policy.reset("babyai-UnlockLocal", "")
    with pytest.raises(ValueError, match="unknown domains"):
        ActionModelConfig("xlstm", domains=("atari",))
    with pytest.raises(ValueError, match="max_state_dim >= 151"):
        ActionModelConfig("xlstm", domains=("metaworld", "babyai"))


def test_profile_command_writes_rows_and_plot_and_refuses_unknown_arms(tmp_path):
    import json

    from typer.testing import CliRunner

    from thrifty.cli import app

    runner = CliRunner()
    out = tmp_path / "profile.json"
    r = runner.invoke(app, ["profile-action-models", "--arch", "xlstm", "--arch", "dt-window3", "--contexts", "4,8",
                            "--repeats", "1", "--min-warmup", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    # interleaved: each context is timed from its own copy of the state, at exactly that context
    assert [row["context_steps"] for row in rows if row["arch"] == "dt-window3"] == [4, 8]
    assert [row["context_steps"] for row in rows if row["arch"] == "xlstm"] == [4, 8]
    r = runner.invoke(app, ["profile-action-models", "--arch", "dt", "--contexts", "4,8", "--repeats", "1",
                            "--min-warmup", "0", "--no-interleave", "--out", str(tmp_path / "seq.json")])
    assert r.exit_code == 0, r.output  # one context after the other: 4, then 4 + 5 warm-up + 1 timed + 9 spacing
    assert [row["context_steps"] for row in json.loads((tmp_path / "seq.json").read_text())] == [4, 19]
    assert out.with_suffix(".png").stat().st_size > 0
    r = runner.invoke(app, ["profile-action-models", "--arch", "xlstm", "--contexts", "4", "--repeats", "1",
                            "--min-warmup", "0", "--passes", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "already in" in r.output  # pass 1 was measured above; only pass 2 runs
    rows = json.loads(out.read_text())
    assert sorted(row.get("pass", 0) for row in rows if row["arch"] == "xlstm") == [0, 0, 1]
    assert "median of 2 passes" in r.output
    for bad in ("dt-compiled", "gru", "xlstm-window4"):
        r = runner.invoke(app, ["profile-action-models", "--arch", bad, "--out", str(out)])
        assert r.exit_code == 2 and "unknown arm" in r.output, bad
