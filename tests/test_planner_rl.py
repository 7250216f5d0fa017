"""PPO on the LM planner (issue 19, part 1): the ratio before any update, the loss and GAE against hand
computations, determinism and resume, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from thrifty.train.planner_policy import (PlannerRLError, ValueHead, action_token_ids, load_planner_for_rl, rollout,
                                          score_episode)
from thrifty.train.planner_rl import METRICS, PPORecipe, train_planner_rl
from thrifty.train.ppo import gae, ppo_loss

TINY = PPORecipe(levels=("GoToLocal",), iterations=2, episodes_per_iteration=2, minibatch_episodes=1, epochs=1,
                 max_steps=5, val_every=1, val_episodes=1, threads=1, value_hidden=8, lr=1e-3)


@pytest.fixture(scope="module")
def tiny(tiny_planner_dir):
    model, tokenizer = load_planner_for_rl(tiny_planner_dir)
    return model.eval(), tokenizer, action_token_ids(tokenizer)


def test_the_ratio_is_one_before_the_first_update(tiny):
    """The log-probabilities stored while acting (incremental session) equal the teacher-forced pass's."""
    model, tokenizer, ids = tiny
    gen = torch.Generator().manual_seed(0)
    ep = rollout(model, tokenizer, ids, "GoToLocal", 11, gen, max_steps=6)
    assert len(ep.actions) == len(ep.positions) == len(ep.logp) == ep.steps
    with torch.no_grad():
        logp, values, _, _ = score_episode(model, ValueHead(model.config.hidden_size, 8), ep, ids, 1.0)
    taken = logp.gather(-1, torch.tensor(ep.actions)[:, None]).squeeze(-1)
    ratio = torch.exp(taken - torch.tensor(ep.logp))
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    assert values.shape == (ep.steps,)
    # each decision position is the prompt's last token: the next token in the context is the action's
    for p, a in zip(ep.positions, ep.actions):
        assert ep.ids[p + 1] == int(ids[a])


def test_the_loss_matches_a_hand_computation():
    recipe = dataclasses.replace(TINY, clip=0.2, value_coef=0.5, entropy_coef=0.1, kl_coef=0.3)
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    bc = torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.5, 0.3]])
    logp, bc_logp = p.log(), bc.log()
    actions = torch.tensor([0, 1])
    old = torch.tensor([0.4, 0.6]).log()  # ratios 1.25 (clipped to 1.2) and 1.0
    adv = torch.tensor([1.0, -2.0])
    values, returns = torch.tensor([0.1, 0.5]), torch.tensor([0.3, 0.0])
    t = ppo_loss(logp, values, actions, old, adv, returns, bc_logp, recipe)
    policy = -(min(1.25 * 1.0, 1.2 * 1.0) + min(1.0 * -2.0, 1.0 * -2.0)) / 2
    value = ((0.1 - 0.3) ** 2 + (0.5 - 0.0) ** 2) / 2
    entropy = -sum(float((r * r.log()).sum()) for r in p) / 2
    kl = sum(float((r * (r.log() - b.log())).sum()) for r, b in zip(p, bc)) / 2
    assert t.policy == pytest.approx(policy, abs=1e-6)
    assert t.value == pytest.approx(value, abs=1e-6)
    assert t.entropy == pytest.approx(entropy, abs=1e-6)
    assert t.kl_bc == pytest.approx(kl, abs=1e-6)
    assert float(t.total) == pytest.approx(policy + 0.5 * value - 0.1 * entropy + 0.3 * kl, abs=1e-6)
    assert t.clip_fraction == pytest.approx(0.5)


def test_gae_matches_a_hand_computation():
    r, v = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.5, 0.6, 0.7])
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.7
    d1 = 0.0 + g * 0.7 - 0.6
    d0 = 0.0 + g * 0.6 - 0.5
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    adv, ret = gae(r, v, g, lam)
    torch.testing.assert_close(adv, torch.tensor([a0, a1, a2]))
    torch.testing.assert_close(ret, adv + v)
    adv1, _ = gae(r, v, 1.0, 1.0)  # gamma = lambda = 1: advantage = return - value
    torch.testing.assert_close(adv1, torch.tensor([1.0, 1.0, 1.0]) - v)


def test_same_seed_same_run_and_a_resume_continues_it(tiny_planner_dir, tmp_path):
    straight = train_planner_rl(tiny_planner_dir, tmp_path / "a_out", tmp_path / "a", TINY, progress=False)
    one = dataclasses.replace(TINY, iterations=1)
    # a run stopped after one iteration, resumed with the whole recipe: its checkpoint's recipe differs
    train_planner_rl(tiny_planner_dir, tmp_path / "b_out", tmp_path / "b", one, progress=False)
    with pytest.raises(PlannerRLError, match="another recipe"):
        train_planner_rl(tiny_planner_dir, tmp_path / "b_out", tmp_path / "b", TINY, progress=False)
    again = train_planner_rl(tiny_planner_dir, tmp_path / "c_out", tmp_path / "c", TINY, progress=False)
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    c = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [list(x) for x in a] == [list(METRICS)] * 3
    timed = ("wall_s", "rollout_s", "update_s")
    assert [{k: v for k, v in x.items() if k not in timed} for x in a] == \
           [{k: v for k, v in x.items() if k not in timed} for x in c]
    wa = (straight / "model.safetensors").read_bytes()
    assert wa == (again / "model.safetensors").read_bytes()
    card = json.loads((straight / "card.json").read_text())
    assert card["iterations"] == 2 and card["recipe"]["iterations"] == 2
    # an interrupted run (stopped after iteration 1 of 2) resumes from its checkpoint to the same end
    train_planner_rl(tiny_planner_dir, tmp_path / "d_out", tmp_path / "d", TINY, progress=False, stop_at=1)
    assert torch.load(tmp_path / "d" / "ckpt.pt", weights_only=False)["state"]["iteration"] == 1
    resumed = train_planner_rl(tiny_planner_dir, tmp_path / "d_out", tmp_path / "d", TINY, progress=False)
    assert (resumed / "model.safetensors").read_bytes() == wa
    d = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in d] == [0, 1, 2]


def test_bad_inputs(tiny_planner_dir, tmp_path):
    for f in tiny_planner_dir.iterdir():
        if not f.name.startswith("tokenizer") and f.name != "special_tokens_map.json":
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(PlannerRLError, match="has no tokenizer"):
        load_planner_for_rl(tmp_path)
    with pytest.raises(PlannerRLError, match="no planner"):
        load_planner_for_rl(tmp_path / "nothing")
    with pytest.raises(PlannerRLError, match="clip"):
        PPORecipe(clip=1.5)
    with pytest.raises(PlannerRLError, match="iterations"):
        PPORecipe(iterations=0)
    with pytest.raises(PlannerRLError, match="at least one level"):
        PPORecipe(levels=())
    with pytest.raises(PlannerRLError, match="gamma"):
        PPORecipe(gamma=0.0)


@pytest.mark.parametrize("replay", ["surprise", "uniform"])
def test_replayed_episodes_join_the_update_and_resume_with_the_buffer(tiny_planner_dir, tmp_path, replay):
    recipe = dataclasses.replace(TINY, iterations=3, replay=replay, replay_episodes=2, replay_capacity=3)
    straight = train_planner_rl(tiny_planner_dir, tmp_path / "a_out", tmp_path / "a", recipe, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["replayed"] for r in rows[1:]] == [0, 2, 2]  # the buffer fills after the first update
    assert [r["replay_size"] for r in rows[1:]] == [2, 3, 3]  # capacity 3: evictions from the third on
    train_planner_rl(tiny_planner_dir, tmp_path / "b_out", tmp_path / "b", recipe, progress=False, stop_at=2)
    resumed = train_planner_rl(tiny_planner_dir, tmp_path / "b_out", tmp_path / "b", recipe, progress=False)
    assert (resumed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


def test_the_command_refuses_bad_settings_with_the_reason(tmp_path):
    from typer.testing import CliRunner

    from thrifty.cli import app

    r = CliRunner().invoke(app, ["train", "planner-rl", "--replay", "bogus", "--run-dir", str(tmp_path)])
    assert r.exit_code == 2 and "replay must be one of" in r.output
    r = CliRunner().invoke(app, ["train", "planner-rl", "--levels", "Moon", "--run-dir", str(tmp_path)])
    assert r.exit_code == 2 and "Moon" in r.output
    r = CliRunner().invoke(app, ["train", "planner-rl", "--model", str(tmp_path / "none"), "--run-dir",
                                 str(tmp_path)])
    assert r.exit_code == 2 and "no planner" in r.output


def test_reuse_and_recompute_rollouts_take_the_same_actions_at_less_bandwidth(tiny):
    from thrifty.cost.bandwidth import bandwidth, effective_bandwidth

    model, tokenizer, ids = tiny
    a = rollout(model, tokenizer, ids, "GoToLocal", 5, torch.Generator().manual_seed(3), max_steps=6)
    b = rollout(model, tokenizer, ids, "GoToLocal", 5, torch.Generator().manual_seed(3), max_steps=6, reuse=False)
    assert a.actions == b.actions and a.ids == b.ids
    assert b.reused_tokens == [0] * b.steps and a.reused_tokens[0] == 0 and all(r > 0 for r in a.reused_tokens[1:])
    assert a.prompt_tokens == b.prompt_tokens == [p + 1 for p in a.positions]
    eff = sum(effective_bandwidth(t, r) for t, r in zip(a.prompt_tokens, a.reused_tokens))
    assert eff < sum(bandwidth(t) for t in b.prompt_tokens)


def test_latent_plans_keep_the_prefix_exact_and_start_as_the_bc_planner(tiny):
    from thrifty.train.latent_plan import PlanEncoder

    model, tokenizer, ids = tiny
    d = model.config.hidden_size
    plans = PlanEncoder(d, d_plan=4, window=3)

    def play(**kw):
        return rollout(model, tokenizer, ids, "GoToLocal", 5, torch.Generator().manual_seed(3), max_steps=6, **kw)

    base, zero = play(), play(plans=plans)  # zero-initialised output: exactly the planner without plans
    assert zero.actions == base.actions and zero.logp == base.logp
    torch.manual_seed(1)
    torch.nn.init.normal_(plans.out.weight, std=0.5)
    kept, fresh = play(plans=plans), play(plans=plans, reuse=False)
    assert kept.actions == fresh.actions
    torch.testing.assert_close(torch.tensor(kept.logp), torch.tensor(fresh.logp), atol=1e-5, rtol=0)
    assert kept.logp != base.logp  # the plan does move the policy
    assert kept.reused_tokens[1:] == kept.prompt_tokens[:-1]  # every earlier token still served from the session
    with torch.no_grad():
        logp, _, _, z = score_episode(model, ValueHead(d, 8), kept, ids, 1.0, plans)
    taken = logp.gather(-1, torch.tensor(kept.actions)[:, None]).squeeze(-1)
    torch.testing.assert_close(taken, torch.tensor(kept.logp), atol=1e-5, rtol=0)  # ratio 1 before any update
    assert z.shape == (kept.steps, 4)


def test_a_run_with_latent_plans_trains_the_encoder_and_exports_it(tiny_planner_dir, tmp_path):
    from safetensors.torch import load_file

    recipe = dataclasses.replace(TINY, latent_plans=True, plan_dim=4, plan_window=2)
    out = train_planner_rl(tiny_planner_dir, tmp_path / "out", tmp_path / "run", recipe, progress=False)
    enc = load_file(str(out / "plan_encoder.safetensors"))
    assert float(enc["out.weight"].abs().sum()) > 0  # moved from its zero start


@pytest.mark.own_process
def test_ray_rollout_actors_play_the_same_episodes_as_in_process(tiny, tiny_planner_dir):
    from thrifty.train.rollout_workers import InProcessRollouts, RayRollouts, RolloutJob

    model, tokenizer, ids = tiny
    recipe = dataclasses.asdict(dataclasses.replace(TINY, max_steps=4))
    jobs = [RolloutJob(i, "GoToLocal", 100 + i) for i in range(4)]
    local = InProcessRollouts(model, tokenizer, ids, recipe).run(jobs)
    workers = RayRollouts(2, tiny_planner_dir, recipe, model)
    try:
        remote = workers.run(jobs)
    finally:
        workers.close()
    assert [e.actions for e in remote] == [e.actions for e in local]
    assert [e.seed for e in remote] == [100, 101, 102, 103]
    for a, b in zip(remote, local):
        torch.testing.assert_close(torch.tensor(a.logp), torch.tensor(b.logp), atol=1e-5, rtol=0)


def test_potential_shaping_telescopes_and_follows_the_distance(tiny):
    from thrifty.train.planner_rl import shaping_terms

    model, tokenizer, ids = tiny
    ep = rollout(model, tokenizer, ids, "GoToLocal", 5, torch.Generator().manual_seed(3), max_steps=6)
    assert len(ep.goal_distance) == ep.steps + 1 and all(d is not None for d in ep.goal_distance)
    f = shaping_terms(ep, 1.0)  # gamma 1: the terms sum to Phi(end) - Phi(start)
    end = 0.0 if ep.terminated else -ep.goal_distance[-1]
    assert float(f.sum()) == pytest.approx(end + ep.goal_distance[0])
    assert [float(x) for x in f] == [float(a - b) for a, b in zip(ep.goal_distance[:-1], ep.goal_distance[1:])] \
        or ep.terminated
    from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv

    for level, seed in (("GoToLocal", 3), ("PickupLoc", 4), ("PickupLoc", 7), ("PutNextLocal", 2)):
        env = BabyAITextEnv(level)
        env.reset(seed=seed)
        d = [env.goal_distance()]
        done = False
        while not done:  # reading the distance leaves the expert's mission alone: it still solves the level
            _, r, term, trunc, _ = env.step(ACTIONS.index(env.expert_action()))
            d.append(env.goal_distance())
            done = term or trunc
        assert r > 0, (level, seed)
        assert all(x is not None for x in d[:-1])  # (after a pickup ends the episode its object is carried)
        if level == "GoToLocal":  # the expert walks straight to the object: the distance never grows, ends at 0
            assert d[-1] == 0 and all(b <= a for a, b in zip(d, d[1:]))
