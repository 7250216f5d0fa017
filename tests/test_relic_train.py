"""ReLIC's partial-update PPO (thrifty/train/relic.py, relic_buffer.py), the RL² baseline and the evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.agents.rl2_policy import RL2Config, RL2Policy, load_trial_policy
from thrifty.envs.darkroom import DarkroomVectorEnv, optimal_return
from thrifty.train.relic import RelicTrainConfig, make_policy, ppo_update, refresh, train_relic
from thrifty.train.relic_buffer import TrialBuffer, gae

TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 32}


def test_gae_equals_a_hand_computation():
    g, lam = 0.9, 0.5
    r = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    v = torch.tensor([[0.5, 1.0, 0.2, 0.4]])
    end = torch.tensor([[False, True, False, True]])  # two episodes of two steps
    adv, ret = gae(r, v, end, g, lam)
    d1 = 0.0 - 1.0  # last step of episode 1: no bootstrap
    d0 = 1.0 + g * 1.0 - 0.5
    d3 = 0.0 - 0.4
    d2 = 2.0 + g * 0.4 - 0.2
    want = torch.tensor([[d0 + g * lam * d1, d1, d2 + g * lam * d3, d3]])
    assert torch.allclose(adv, want) and torch.allclose(ret, want + v)
    with pytest.raises(ValueError, match="episode boundaries"):
        gae(r, v, torch.zeros_like(end), g, lam)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=6), st.integers(0, 2**16))
def test_gae_with_unit_discount_is_the_reward_to_go_of_each_episode(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    r, v = torch.rand(1, t, generator=gen), torch.rand(1, t, generator=gen)
    end = torch.zeros(1, t, dtype=torch.bool)
    end[0, np.cumsum(lengths) - 1] = True
    _, ret = gae(r, v, end, 1.0, 1.0)
    i = 0
    for n in lengths:
        want = r[0, i:i + n].flip(0).cumsum(0).flip(0)
        assert torch.allclose(ret[0, i:i + n], want, atol=1e-5)
        i += n


def _buffer(lengths_per_env, seed=0):
    """A filled TrialBuffer whose episodes have the given lengths per env; every field carries its step index."""
    t = sum(lengths_per_env[0])
    buf = TrialBuffer(len(lengths_per_env), t, 2)
    rng = np.random.default_rng(seed)
    starts = torch.zeros(buf.batch, t, dtype=torch.bool)
    for b, lengths in enumerate(lengths_per_env):
        starts[b, np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    for i in range(t):
        buf.add(i, rng.integers(0, 9, size=(buf.batch, 2)), torch.full((buf.batch,), i % 5),
                torch.full((buf.batch,), -float(i)), torch.full((buf.batch,), float(i)),
                torch.full((buf.batch,), float(i)), starts[:, i])
    return buf


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=7), st.integers(0, 2**16))
def test_shuffling_keeps_each_episode_and_its_start_flag_together(lengths, seed):
    buf = _buffer([lengths, lengths[::-1]])
    t = buf.filled
    before = {name: getattr(buf, name).clone() for name in buf.FIELDS}
    buf.shuffle_episodes(t, torch.Generator().manual_seed(seed))
    for b in range(buf.batch):
        def episodes(fields):
            starts = torch.nonzero(fields["episode_start"][b]).flatten().tolist() + [t]
            return sorted(tuple(tuple(fields[n][b, s:e].flatten().tolist()) for n in buf.FIELDS)
                          for s, e in zip(starts, starts[1:]))
        after = {name: getattr(buf, name) for name in buf.FIELDS}
        assert episodes(after) == episodes(before)  # the same episodes, whole, in some order
        assert bool(after["episode_start"][b, 0])
        steps = after["value"][b]  # the step index each field carries: runs of +1 inside an episode
        inside = ~after["episode_start"][b, 1:]
        assert torch.all((steps[1:] - steps[:-1])[inside] == 1)


def test_inputs_shift_the_previous_action_and_reward():
    buf = _buffer([[3, 2]])
    obs, prev_action, prev_reward, start = buf.inputs(5)
    assert prev_action[0].tolist() == [0, 0, 1, 2, 3] and prev_reward[0].tolist() == [0, 0, 1, 2, 3]
    assert start[0].tolist() == [True, False, False, True, False]
    assert buf.episode_end(5)[0].tolist() == [False, False, True, False, True]


@pytest.mark.parametrize("kw, match", [
    ({"updates_per_trial": 3}, "must divide"),
    ({"trial_steps": 10, "updates_per_trial": 1}, "shorter than one"),
    ({"trial_steps": 60, "updates_per_trial": 2}, "whole darkroom-ad episodes"),
    ({"arch": "gru"}, "unknown arch"),
    ({"num_envs": 6, "minibatch_envs": 4}, "must divide num_envs"),
])
def test_bad_training_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        RelicTrainConfig(**kw).check()


def test_an_unknown_sink_variant_is_refused():
    env = DarkroomVectorEnv("darkroom-ad")
    with pytest.raises(ValueError, match="variant"):
        make_policy(RelicTrainConfig(model={**TINY, "sink": "sinkhole"}), env)


def _rollout_buffer(policy, env, t, seed=0):
    obs, _ = env.reset(seed=seed)
    buf = TrialBuffer(env.num_envs, t, 2)
    start, pa, pr = torch.ones(env.num_envs, dtype=torch.bool), torch.zeros(env.num_envs, dtype=torch.long), \
        torch.zeros(env.num_envs)
    state = policy.start(env.num_envs)
    gen = torch.Generator().manual_seed(seed)
    from thrifty.agents.relic_policy import sample_action

    for i in range(t):
        x = torch.as_tensor(obs, dtype=torch.float32)
        with torch.no_grad():
            logits, value = policy.step(state, x[:, None], pa[:, None], pr[:, None], start[:, None])
        a, logp = sample_action(logits[:, 0], gen)
        obs, r, _, trunc, _ = env.step(a.numpy())
        buf.add(i, x, a, logp, value[:, 0], r, start)
        pa, pr, start = a, torch.as_tensor(r, dtype=torch.float32), torch.as_tensor(trunc)
    return buf


@pytest.mark.parametrize("arch", ["relic", "rl2"])
def test_a_partial_update_ignores_the_steps_before_its_chunk(arch):
    """The loss of a partial update covers only [loss_start, t): the behaviour log-probabilities of older steps
    do not change the update; with loss_start = 0 (the full update) they do."""
    cfg = RelicTrainConfig(arch=arch, num_envs=2, minibatch_envs=1, epochs=1, model=TINY if arch == "relic" else
                           {"d_model": 16, "hidden": 16})
    env = DarkroomVectorEnv("darkroom-ad", num_envs=2)
    base = make_policy(cfg, env)
    buf = _rollout_buffer(base, env, 40)
    weights = {}
    for loss_start in (20, 0):
        for tag, shift in (("same", 0.0), ("old logp moved", 3.0)):
            policy = make_policy(cfg, env)
            policy.load_state_dict(base.state_dict())
            b = _rollout_buffer(base, env, 40)
            b.logp[:, :20] += shift
            opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
            ppo_update(policy, opt, b, 40, loss_start, cfg, torch.Generator().manual_seed(1))
            weights[loss_start, tag] = torch.cat([p.detach().flatten() for p in policy.parameters()])
    assert torch.equal(weights[20, "same"], weights[20, "old logp moved"])
    assert not torch.equal(weights[0, "same"], weights[0, "old logp moved"])
    assert buf.filled == 40


@pytest.mark.parametrize("arch", ["relic", "rl2"])
def test_refresh_gives_the_state_a_fresh_forward_of_the_prefix_gives(arch):
    cfg = RelicTrainConfig(arch=arch, num_envs=2, model=TINY if arch == "relic" else {"d_model": 16, "hidden": 16})
    env = DarkroomVectorEnv("darkroom-ad", num_envs=2)
    policy = make_policy(cfg, env).eval()
    buf = _rollout_buffer(policy, env, 40)
    buf.value[:] = 123.0
    state = refresh(policy, buf, 40)
    with torch.no_grad():
        _, values = policy(*buf.inputs(40))
        assert torch.allclose(buf.value, values, atol=1e-5)
        nxt = [torch.zeros(2, 1, 2), torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1),
               torch.ones(2, 1, dtype=torch.bool)]
        logits_cached, _ = policy.step(state, *nxt)
        full = [torch.cat([a, b], 1) for a, b in zip(buf.inputs(40), nxt)]
        logits_full, _ = policy(*full)
    assert torch.allclose(logits_cached[:, 0], logits_full[:, -1], atol=1e-5)


def test_rl2_steps_equal_its_whole_trial_forward_and_round_trip(tmp_path):
    env = DarkroomVectorEnv("darkroom-ad", num_envs=2)
    policy = RL2Policy(RL2Config.for_spaces(env.single_observation_space, env.single_action_space, d_model=16,
                                            hidden=16)).eval()
    buf = _rollout_buffer(policy, env, 45)
    with torch.no_grad():
        whole, v_whole = policy(*buf.inputs(45))
        state = policy.start(2)
        parts = [policy.step(state, *[x[:, i:i + 1] for x in buf.inputs(45)]) for i in range(45)]
    assert torch.allclose(whole, torch.cat([p[0] for p in parts], 1), atol=1e-5)
    assert torch.allclose(v_whole, torch.cat([p[1] for p in parts], 1), atol=1e-5)
    policy.save(tmp_path / "rl2")
    again = load_trial_policy(tmp_path / "rl2", env.single_observation_space)
    assert isinstance(again, RL2Policy)
    with torch.no_grad():
        assert torch.equal(again(*buf.inputs(45))[0], whole)
    from thrifty.agents.relic_policy import ObservationSpaceMismatchError

    with pytest.raises(ObservationSpaceMismatchError, match="observation space"):
        load_trial_policy(tmp_path / "rl2", DarkroomVectorEnv("darkroom").single_observation_space)
    with pytest.raises(FileNotFoundError, match="thrifty train relic"):
        load_trial_policy(tmp_path / "none")


def test_training_resumes_to_the_same_weights_and_refuses_another_config(tmp_path):
    kw = dict(num_envs=2, minibatch_envs=1, trial_steps=40, updates_per_trial=2, epochs=1, model=TINY)
    straight = train_relic(RelicTrainConfig(trials=2, **kw), tmp_path / "a", progress=False)
    train_relic(RelicTrainConfig(trials=2, **kw), tmp_path / "b", progress=False, stop_at=1)  # interrupted
    resumed = train_relic(RelicTrainConfig(trials=2, **kw), tmp_path / "b", progress=False, out=tmp_path / "out")
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    import json

    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in rows] == [1, 2]
    assert {"return_episode_first", "policy_loss", "approx_kl", "clip_fraction", "env_steps"} <= set(rows[0])
    assert json.loads((tmp_path / "out" / "relic_card.json").read_text())["env_steps"] == 160
    with pytest.raises(ValueError, match="another configuration"):
        train_relic(RelicTrainConfig(trials=3, lr=1e-3, **kw), tmp_path / "b", progress=False)
    longer = train_relic(RelicTrainConfig(trials=3, **kw), tmp_path / "b", progress=False)  # lengthened: resumes
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 3 and longer is not None


def test_the_expert_episodes_of_a_few_shot_trial_score_the_optimal_return():
    from thrifty.bench.relic_eval import curve_summary, evaluate_trials

    env = DarkroomVectorEnv("darkroom-ad")
    policy = make_policy(RelicTrainConfig(model=TINY), env)
    r = evaluate_trials(policy, "darkroom-ad", episodes=20, trials=3, num_envs=2, expert_episodes=2)
    ret = np.asarray(r["returns"])
    want = [optimal_return("darkroom-ad", k) for k in r["tasks"]]
    assert ret.shape == (3, 20) and np.allclose(ret[:, 0], want) and np.allclose(ret[:, 1], want)
    s = curve_summary(r)
    assert s["episode_1"] == pytest.approx(ret[:, 2].mean())
    assert s["episodes_15_20"] == pytest.approx(ret[:, 14:20].mean())
    with pytest.raises(ValueError, match="expert_episodes"):
        evaluate_trials(policy, episodes=3, expert_episodes=3)
    with pytest.raises(ValueError, match="too few"):
        curve_summary({**r, "returns": ret[:, :10].tolist()})


def test_the_profile_reports_the_cache_bytes_of_its_context():
    from thrifty.bench.relic_profile import acting_throughput, long_trial

    env = DarkroomVectorEnv("darkroom")
    policy = make_policy(RelicTrainConfig(variant="darkroom", model=TINY), env)
    row = acting_throughput(policy, batch=3, context=50, repeats=2, warmup=1, chunk=16)
    c = policy.config
    per_step = c.n_layers * 2 * c.n_kv_heads * (c.d_model // c.n_heads) * 4  # keys and values, float32
    assert row["kv_bytes"] == 3 * 50 * per_step and row["actions_per_s"] > 0
    trial = long_trial(policy, steps=30)
    assert trial["kv_bytes"] == 30 * per_step and trial["peak_rss_bytes"] > 0
