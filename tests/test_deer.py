"""DeeR-VLA's early exit (issue 16): the invariants of docs/deer.md on a tiny multi-exit policy, and its bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thrifty.agents.deer_policy import (DeerConfig, DeerLoadError, DeerNet, DeerPolicy, load_deer, save_deer,
                                        word_vocabulary)
from thrifty.techniques.early_exit import (ExitBudget, exit_indices, solve_thresholds, target_distribution)

INSTRUCTIONS = {"reach-v3": "reach the goal", "pick-place-v3": "pick up the puck and place it at the goal"}


def tiny_config(**kw) -> DeerConfig:
    return DeerConfig(words=word_vocabulary(INSTRUCTIONS.values()), d_model=16, layers=6, heads=2, kv_heads=1,
                      d_ff=32, exit_every=2, instruction_tokens=10, lstm_hidden=8, mlp_hidden=8, **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = DeerNet(tiny_config())
    scores = torch.rand(len(net.exit_layers), 500)
    return save_deer(net, tmp_path_factory.mktemp("deer") / "policy", {"data": {"tasks": list(INSTRUCTIONS)}},
                     scores=scores)


def episode(policy, steps: int = 6, task: str = "pick-place-v3", seed: int = 0):
    rng = np.random.default_rng(seed)
    policy.reset(task, INSTRUCTIONS[task])
    return [policy.act({"state": rng.normal(size=39).astype(np.float32)}) for _ in range(steps)]


def test_forced_last_exit_equals_the_full_model(checkpoint):
    full = DeerPolicy.load(checkpoint)
    forced = DeerPolicy.load(checkpoint, thresholds=[-np.inf] * 3)  # consistency never met: the last exit
    a, b = episode(full), episode(forced)
    assert [s.cost.exit_layer for s in b] == [6] * 6
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.action, y.action)
    assert torch.equal(full.state[0], forced.state[0]) and torch.equal(full.state[1], forced.state[1])


def test_layer_by_layer_features_equal_the_models_own_forward(checkpoint):
    net, _ = load_deer(checkpoint)
    ids = net.word_ids(INSTRUCTIONS["pick-place-v3"])[None]
    state = torch.randn(3, 39)
    feats = net.exit_features(ids, state)
    h, valid = net.embed(ids, state)
    with torch.no_grad():
        out = net.llm.model(inputs_embeds=h, attention_mask=net.attention_mask(valid),
                            position_ids=net.token_positions(ids.shape[1])[None], output_hidden_states=True)
    hidden = out.hidden_states  # the last one has the final norm applied by the model
    last = out.last_hidden_state.masked_fill(~valid[..., None], torch.finfo(h.dtype).min).amax(1)
    torch.testing.assert_close(feats[-1], last, rtol=1e-5, atol=1e-5)
    for k, e in enumerate(net.exit_layers[:-1]):
        torch.testing.assert_close(feats[1 + k], net.pool(hidden[e], valid), rtol=1e-5, atol=1e-5)


def test_padding_changes_nothing(checkpoint):
    net, _ = load_deer(checkpoint)
    state = torch.randn(2, 39)
    padded = net.exit_features(net.word_ids(INSTRUCTIONS["reach-v3"])[None], state)
    real = net.exit_features(net.word_ids(INSTRUCTIONS["reach-v3"], pad=False)[None], state)
    torch.testing.assert_close(padded, real, rtol=1e-5, atol=1e-5)


def test_peek_never_changes_the_head_state(checkpoint):
    net, _ = load_deer(checkpoint)
    state = net.head.peek(torch.randn(1, 16))[2]
    before = tuple(t.clone() for t in state)
    for _ in range(3):
        out = net.head.peek(torch.randn(1, 16), state)
    assert all(torch.equal(a, b) for a, b in zip(before, state))
    assert not torch.equal(out.state[0], state[0])
    policy = DeerPolicy.load(checkpoint, thresholds=[0.0, 0.0, 0.0])
    episode(policy, steps=3)
    committed = tuple(t.clone() for t in policy.state)
    policy.net.head.peek(torch.randn(1, 16), policy.state)
    assert all(torch.equal(a, b) for a, b in zip(committed, policy.state))


@pytest.mark.parametrize("quantile", [0.3, 0.6])
def test_exits_taken_follow_the_rule_on_every_exits_score(checkpoint, quantile):
    """Differential: the acting path's exit (its batched first check and early stop) equals the exit rule applied
    to every exit's score computed the slow way (all exits' features, one peek each from the committed state)."""
    from thrifty.techniques.early_exit import consistency_score

    net, _ = load_deer(checkpoint)
    ids = net.word_ids(INSTRUCTIONS["pick-place-v3"])[None]
    rng = np.random.default_rng(7)
    states = rng.normal(size=(30, 39)).astype(np.float32)

    def every_score(s, committed):
        with torch.no_grad():
            feats = net.exit_features(ids, torch.from_numpy(s)[None])  # (1 + E, 1, d)
            arms = torch.stack([net.head.peek(f, committed, gripper=False).arm[0] for f in feats])
        return consistency_score(arms[1:], arms[:-1]).numpy(), arms  # (E,), (1 + E, A)

    # thresholds at a quantile of this untrained model's own scores, so that every exit gets taken
    thresholds = np.quantile(np.stack([every_score(s, None)[0] for s in states]), quantile, axis=0)
    thresholds[-1] = np.inf
    policy = DeerPolicy(net, mode="consistency", thresholds=thresholds.tolist())
    policy.reset("pick-place-v3", INSTRUCTIONS["pick-place-v3"])
    taken = []
    for s in states:
        scores, arms = every_score(s, policy.state)
        want = net.exit_layers[int(exit_indices(scores[:, None], thresholds)[0])]
        step = policy.act({"state": s})
        assert step.cost.exit_layer == want
        k = net.exit_layers.index(want)
        np.testing.assert_allclose(step.action[:-1], arms[k + 1].numpy(), rtol=1e-5, atol=1e-6)
        taken.append(want)
    assert len(set(taken)) > 1  # the rule was exercised past the first exit


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0, 2.0])
def test_solved_thresholds_give_the_target_distribution(ratio):
    rng = np.random.default_rng(1)
    scores = rng.random((6, 1000))
    probs = target_distribution(ratio, 6)
    t = solve_thresholds(scores, probs)
    counts = np.bincount(exit_indices(scores, t), minlength=6)
    want = np.floor(1000 * np.asarray(probs) + 1e-9).astype(int)
    assert counts[:-1].tolist() == want[:-1].tolist()
    assert counts[-1] == 1000 - want[:-1].sum()
    solved = ExitBudget(exit_ratio=ratio).resolve(scores, (2, 4, 6, 8, 10, 12))
    assert np.allclose(solved["realised"], counts / 1000)
    assert abs(solved["realised_mean_layers"] - solved["target_mean_layers"]) < 6 * 2 / 1000 * 6


def test_the_budget_is_met_in_closed_loop_on_its_own_scores(checkpoint):
    policy = DeerPolicy.load(checkpoint, exit_ratio=0.3)
    assert policy.budget["realised"] == pytest.approx(policy.budget["target"], abs=0.01)
    assert policy.thresholds[-1] == np.inf


def test_max_layer_model_equals_the_full_models_exit_there(checkpoint):
    small = DeerPolicy.load(checkpoint, max_layer=4)
    full_net, _ = load_deer(checkpoint)
    assert small.net.n_layers == 4 and len(small.net.llm.model.layers) == 4
    assert small.net.weight_bytes() < full_net.weight_bytes()
    forced = DeerPolicy(full_net, mode="random", probs=[0.0, 1.0, 0.0])  # always the exit at layer 4
    a, b = episode(small), episode(forced)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.action, y.action, rtol=1e-6, atol=1e-6)
        assert x.cost.exit_layer == y.cost.exit_layer == 4
    report = small.episode_report()
    assert report["layers_built"] == 4 and report["flops_max_step"] == 4 * small._layer_flops


def test_costs_count_layers_run_and_head_apart(checkpoint):
    policy = DeerPolicy.load(checkpoint, exit_ratio=0.5)
    steps = episode(policy, steps=8)
    r = policy.episode_report()
    assert r["backbone_flops_total"] == sum(s.cost.exit_layer for s in steps) * policy._layer_flops
    assert r["backbone_flops_total"] + r["head_flops_total"] == sum(s.cost.flops for s in steps)
    assert sum(r["exit_counts"]) == 8


def test_random_exits_replay_alike(checkpoint):
    a = [s.cost.exit_layer for s in episode(DeerPolicy.load(checkpoint, exit_ratio=1.0, mode="random"), 20)]
    b = [s.cost.exit_layer for s in episode(DeerPolicy.load(checkpoint, exit_ratio=1.0, mode="random"), 20)]
    assert a == b and len(set(a)) > 1


# ---------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("ratio", [0.0, -0.5, float("nan")])
def test_exit_ratio_must_be_positive(checkpoint, ratio):
    with pytest.raises(ValueError, match="exit ratio must be a finite number > 0"):
        DeerPolicy.load(checkpoint, exit_ratio=ratio)


@pytest.mark.parametrize("layer", [0, 3, 8])
def test_max_layer_outside_the_model(checkpoint, layer):
    with pytest.raises(ValueError, match=r"max_layer .* is not an exit layer of this model; choose one of \[2, 4, 6\]"):
        DeerPolicy.load(checkpoint, max_layer=layer)


def test_thresholds_of_the_wrong_length(checkpoint):
    with pytest.raises(ValueError, match="one threshold per allowed exit: 3"):
        DeerPolicy.load(checkpoint, thresholds=[0.1, 0.2])
    with pytest.raises(ValueError, match="one threshold per allowed exit: 2"):
        DeerPolicy.load(checkpoint, thresholds=[0.1, 0.2, 0.3], max_layer=4)


def test_a_checkpoint_of_another_model(checkpoint, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    card = json.loads((other / "card.json").read_text())
    card["config"]["d_model"] = 32
    card["config"]["heads"] = 4
    (other / "card.json").write_text(json.dumps(card))
    with pytest.raises(DeerLoadError, match="does not fit the model its card describes"):
        load_deer(other)
    card["kind"] = "thrifty-mlp-policy"
    (other / "card.json").write_text(json.dumps(card))
    with pytest.raises(DeerLoadError, match="not a DeeR policy"):
        load_deer(other)
    with pytest.raises(DeerLoadError, match="no DeeR policy at"):
        load_deer(tmp_path / "nothing")


def test_the_suite_policies_build(checkpoint):
    from thrifty.bench.policy_suites import POLICY_SUITES, build_policy, with_policy_path

    suite = with_policy_path(POLICY_SUITES["deer"], checkpoint)
    for c in suite.configs:
        if c.settings.get("max_layer", 0) > 6 or c.policy == "deer-static":
            continue
        p = build_policy(c.as_dict())
        assert p.net.exit_layers[-1] == c.settings.get("max_layer", 6)
    with pytest.raises(ValueError, match="deer-random needs an exit_ratio .* or a mean_layers"):
        build_policy({"policy": "deer-random", "settings": {"path": str(checkpoint)}})
    static = [c for c in suite.configs if c.policy == "deer-static"]
    assert [c.settings["layers"] for c in static] == [2, 4, 6] and all("path" not in c.settings for c in static)
    p = build_policy({"policy": "deer-static", "settings": {"layers": 6, "path": str(checkpoint)}})
    assert p.net.exit_layers[-1] == 6 and p.mode == "full"


def test_a_missing_static_model_names_the_command_that_makes_it(tmp_path):
    from thrifty.bench.policy_suites import build_policy

    with pytest.raises(ValueError, match="train it with `thrifty train deer .* --layers 4"):
        build_policy({"policy": "deer-static", "settings": {"layers": 4, "path": str(tmp_path / "none")}})
    with pytest.raises(ValueError, match="deer-static takes layers"):
        build_policy({"policy": "deer-static", "settings": {}})


def test_training_losses_and_scores_run(tmp_path):
    from thrifty.train.deer import Episodes, consistency_scores, deer_losses

    torch.manual_seed(0)
    net = DeerNet(tiny_config())
    aux = torch.nn.ModuleList(torch.nn.Linear(16, 4) for _ in net.exit_layers)
    b, t = 2, 5
    ids = net.word_ids(INSTRUCTIONS["reach-v3"]).expand(b, t, -1)
    gen = torch.Generator().manual_seed(0)
    losses = deer_losses(net, aux, ids, torch.randn(b, t, 39), torch.rand(b, t, 4) * 2 - 1,
                         torch.ones(b, t, dtype=torch.bool), 0.01, gen)
    losses["total"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    eps = Episodes(torch.randn(9, 39), torch.rand(9, 4), net.word_ids("reach the goal").expand(9, -1),
                   np.array([0, 4]), np.array([4, 5]))
    scores, mse = consistency_scores(net.eval(), eps)
    assert scores.shape == (3, 9) and len(mse) == 3


def test_peeks_step_by_step_equal_the_heads_window_forward(checkpoint):
    net, _ = load_deer(checkpoint)
    feats = torch.randn(2, 7, 16)
    window = net.head(feats)
    state, arms, grips = None, [], []
    for t in range(7):
        out = net.head.peek(feats[:, t], state)
        state = out.state
        arms.append(out.arm)
        grips.append(out.gripper_logit)
    torch.testing.assert_close(torch.stack(arms, 1), window.arm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.stack(grips, 1), window.gripper_logit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state[1], window.state[1], rtol=1e-5, atol=1e-6)


def test_random_exits_matched_to_a_mean_depth(checkpoint):
    policy = DeerPolicy.load(checkpoint, mode="random", mean_layers=3.0)
    assert float(np.dot(policy.probs, policy.net.exit_layers)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="strictly between the first and the last exit"):
        DeerPolicy.load(checkpoint, mode="random", mean_layers=7.0)


def test_bayesian_optimisation_resumes_from_its_storage(checkpoint, tmp_path):
    pytest.importorskip("optuna")
    from thrifty.train.deer_bo import BORecipe, tune_deer

    storage, out = f"sqlite:///{tmp_path / 'bo.db'}", tmp_path / "bo.json"
    recipe = BORecipe(exit_ratio=0.5, trials=2, episodes_per_task=1, max_steps=5)
    first = tune_deer(recipe, checkpoint, storage, "s", out, tasks=("reach-v3",))
    assert len(first["trials"]) == 2 and first["initial"]["number"] == 0
    assert first["initial_thresholds"] == DeerPolicy.load(checkpoint, exit_ratio=0.5).thresholds
    recipe.trials = 3
    again = tune_deer(recipe, checkpoint, storage, "s", out, tasks=("reach-v3",))
    assert len(again["trials"]) == 3 and again["trials"][:2] == first["trials"]
    policy = DeerPolicy.load(checkpoint, thresholds=str(out))
    assert policy.thresholds == again["thresholds"]
    recipe.penalty = 2.0
    with pytest.raises(ValueError, match="was run with other settings"):
        tune_deer(recipe, checkpoint, storage, "s", out, tasks=("reach-v3",))


def test_the_recipe_trains_resumes_and_ships_a_loadable_policy(tmp_path):
    from thrifty.train.deer import DeerRecipe, train_deer
    from thrifty.train.demos import CollectSettings, collect

    collect(tmp_path / "demos", CollectSettings(tasks=("reach-v3", "drawer-close-v3"), episodes=3, noise=0.3,
                                                max_steps=12))
    recipe = DeerRecipe(d_model=16, layers=4, heads=2, kv_heads=1, d_ff=32, lstm_hidden=8, mlp_hidden=8, steps=3,
                        batch_size=2, window=4, heldout_episodes=1, checkpoint_every=1, log_every=1)
    out = train_deer(recipe, tmp_path / "demos", tmp_path / "policy", tmp_path / "run", progress=False)
    card = __import__("json").loads((out / "card.json").read_text())
    assert card["data"]["tasks"] == ["reach-v3", "drawer-close-v3"] and card["final"]["step"] == 3
    assert card["scores"]["shape"] == [2, card["data"]["heldout_steps"]]
    first = (out / "model.safetensors").read_bytes()
    train_deer(recipe, tmp_path / "demos", tmp_path / "policy", tmp_path / "run", progress=False)  # resumes: done
    assert (out / "model.safetensors").read_bytes() == first
    policy = DeerPolicy.load(out, exit_ratio=0.5)
    assert policy.budget["realised"] == pytest.approx(policy.budget["target"], abs=0.1)
    episode(policy, steps=3, task="reach-v3")
