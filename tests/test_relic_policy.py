"""The ReLIC policy (thrifty.agents.relic_policy): no future leakage, cached acting equals the whole-trial forward,
positions computed alike in both modes, the sink under the episode mask, checkpoints and their refusals."""

import doctest

import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.agents import relic_policy
from thrifty.agents.relic_policy import ObservationSpaceMismatchError, RelicConfig, RelicPolicy, trial_positions
from thrifty.envs.darkroom import DarkroomVectorEnv

pytestmark = [pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("error::DeprecationWarning")]

OBS = gym.spaces.Box(0, 8, shape=(2,), dtype=np.int64)
ACT = gym.spaces.Discrete(5)


def _policy(sink="kv", inter_episode=True, rope="episode", seed=0):
    policy = RelicPolicy(RelicConfig.for_spaces(OBS, ACT, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                                sink=sink, inter_episode=inter_episode, rope=rope, seed=seed))
    if policy.sink_kv is not None:  # non-zero trainable sinks, so that they matter; frozen ones stay zero
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for t in policy.sink_kv.parameters():
                t.copy_(torch.randn(t.shape, generator=g))
    return policy.eval()


def _trial(b=2, horizons=((4, 3, 5), (5, 5, 2)), seed=0):
    """Inputs of a trial of B envs, env i's episodes of the given lengths (the same total T)."""
    g = torch.Generator().manual_seed(seed)
    t = sum(horizons[0])
    start = torch.zeros(b, t, dtype=torch.bool)
    for i, hs in enumerate(horizons[:b]):
        start[i, np.cumsum((0,) + hs[:-1])] = True
    obs = torch.randint(0, 9, (b, t, 2), generator=g)
    act = torch.randint(0, 5, (b, t), generator=g)
    rew = (torch.rand(b, t, generator=g) < 0.3).float()
    return obs, act, rew, start


VARIANTS = [("none", True, "episode"), ("kv", True, "episode"), ("k", False, "episode"), ("token", True, "token"),
            ("token", False, "episode"), ("zero", True, "token"), ("v", False, "token")]


@pytest.mark.parametrize("sink,iea,rope", VARIANTS)
def test_cached_acting_equals_the_whole_trial_forward(sink, iea, rope):
    policy = _policy(sink, iea, rope)
    obs, act, rew, start = _trial()
    with torch.no_grad():
        want_logits, want_values = policy(obs, act, rew, start)
        state = policy.start(2)
        steps = [policy.step(state, obs[:, t:t + 1], act[:, t:t + 1], rew[:, t:t + 1], start[:, t:t + 1])
                 for t in range(obs.shape[1])]
    logits = torch.cat([s[0] for s in steps], 1)
    values = torch.cat([s[1] for s in steps], 1)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(values, want_values, atol=1e-5, rtol=0)
    assert state.cache.length == obs.shape[1] + (sink == "token")  # the Sink-KV column is never cached


@pytest.mark.parametrize("sink,iea,rope", VARIANTS)
def test_changing_a_future_step_never_changes_an_earlier_output(sink, iea, rope):
    policy = _policy(sink, iea, rope)
    obs, act, rew, start = _trial()
    t0 = 6
    obs2, act2, rew2 = obs.clone(), act.clone(), rew.clone()
    obs2[:, t0:] = (obs2[:, t0:] + 3) % 9
    act2[:, t0:] = (act2[:, t0:] + 1) % 5
    rew2[:, t0:] = 1 - rew2[:, t0:]
    with torch.no_grad():
        a_logits, a_values = policy(obs, act, rew, start)
        b_logits, b_values = policy(obs2, act2, rew2, start)
    assert torch.equal(a_logits[:, :t0], b_logits[:, :t0]) and torch.equal(a_values[:, :t0], b_values[:, :t0])
    assert (a_logits[:, t0:] - b_logits[:, t0:]).abs().max() > 1e-4


def test_positions_are_the_same_whole_and_step_by_step():
    _, _, _, start = _trial()
    episode, step = trial_positions(start, torch.full((2,), -1), torch.full((2,), -1))
    assert episode[0].tolist() == [0] * 4 + [1] * 3 + [2] * 5
    assert step[1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    e, s = torch.full((2,), -1), torch.full((2,), -1)
    for chunk in torch.split(torch.arange(12), [5, 1, 4, 2]):
        ce, cs = trial_positions(start[:, chunk], e, s)
        assert torch.equal(ce, episode[:, chunk]) and torch.equal(cs, step[:, chunk])
        e, s = ce[:, -1], cs[:, -1]


@pytest.mark.parametrize("sink", ["none", "zero", "k", "v", "kv"])
def test_with_inter_episode_attention_off_an_episode_sees_only_itself_and_the_sink(sink):
    """Block-diagonal by episode: other episodes do not matter (with inter-episode attention on, they do), and
    with a zero sink key the last episode's outputs are those of that episode run as a trial of its own (the
    rotary phase is shared inside an episode). A learned key is not rotated but the queries are, by their
    episode index, so its logit depends on the episode (ReLIC's design, research/seed-relic.md §3.3)."""
    obs, act, rew, start = _trial(b=1, horizons=((4, 3, 5),))
    off, on = _policy(sink, inter_episode=False), _policy(sink, inter_episode=True)
    with torch.no_grad():
        whole, _ = off(obs, act, rew, start)
        alone, _ = off(obs[:, 7:], act[:, 7:], rew[:, 7:], start[:, 7:])
        obs2 = obs.clone()
        obs2[:, :7] = (obs2[:, :7] + 4) % 9
        changed, _ = off(obs2, act, rew, start)
        on_a, _ = on(obs, act, rew, start)
        on_b, _ = on(obs2, act, rew, start)
    if sink in ("none", "zero", "v"):
        torch.testing.assert_close(whole[:, 7:], alone, atol=1e-5, rtol=0)
    else:
        assert (whole[:, 7:] - alone).abs().max() > 1e-5
    torch.testing.assert_close(changed[:, 7:], whole[:, 7:], atol=1e-6, rtol=0)
    assert (on_a[:, 7:] - on_b[:, 7:]).abs().max() > 1e-4
    if sink != "none":
        plain = _policy("none", inter_episode=False)
        plain.load_state_dict({k: v for k, v in off.state_dict().items() if "sink" not in k}, strict=True)
        with torch.no_grad():
            no_sink, _ = plain(obs, act, rew, start)
        assert (no_sink - whole).abs().max() > 1e-4  # the sink is attended under the episode mask


def test_the_sink_token_stays_visible_with_inter_episode_attention_off():
    obs, act, rew, start = _trial(b=1, horizons=((4, 3, 5),))
    policy = _policy("token", inter_episode=False)
    with torch.no_grad():
        a, _ = policy(obs, act, rew, start)
        policy.sink_token.add_(1.0)
        b, _ = policy(obs, act, rew, start)
    for ep in (slice(0, 4), slice(4, 7), slice(7, 12)):  # every episode reads the trial's sink token
        assert (a[:, ep] - b[:, ep]).abs().max() > 1e-4


def test_sink_parameters_get_gradients_from_the_actor_critic_losses():
    policy = _policy("kv").train()
    obs, act, rew, start = _trial()
    logits, values = policy(obs, act, rew, start)
    (logits.logsumexp(-1).mean() + values.square().mean()).backward()
    assert policy.sink_kv.key.grad.abs().sum() > 0 and policy.sink_kv.value.grad.abs().sum() > 0
    assert {n for n, _ in policy.named_parameters() if "sink" in n} == {"sink_kv.key", "sink_kv.value"}


def test_a_checkpoint_round_trips_and_refuses_another_observation_space(tmp_path):
    policy = _policy("kv")
    obs, act, rew, start = _trial()
    policy.save(tmp_path / "p")
    back = RelicPolicy.load(tmp_path / "p", observation_space=OBS).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(obs, act, rew, start), policy(obs, act, rew, start), atol=0, rtol=0)
    other = DarkroomVectorEnv("darkroom", num_envs=1).single_observation_space  # 10x10: high 9, not 8
    with pytest.raises(ObservationSpaceMismatchError, match="built for observation space.*'high': \\[8.0, 8.0\\]"):
        RelicPolicy.load(tmp_path / "p", observation_space=other)
    with pytest.raises(FileNotFoundError, match="no ReLIC policy"):
        RelicPolicy.load(tmp_path / "missing")


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown sink variant 'sinkhole'"):
        RelicConfig.for_spaces(OBS, ACT, sink="sinkhole")
    with pytest.raises(ValueError, match="rope must be"):
        RelicConfig.for_spaces(OBS, ACT, rope="absolute")
    with pytest.raises(TypeError, match="1-D Box"):
        RelicConfig.for_spaces(gym.spaces.Discrete(81), ACT)
    policy = _policy()
    obs, act, rew, start = _trial()
    with pytest.raises(ValueError, match="first step of a trial"):
        policy(obs, act, rew, torch.zeros_like(start))


def test_docstring_example_runs():
    assert doctest.testmod(relic_policy, raise_on_error=True).failed == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=12))
def test_trial_cache_buffers_equal_concatenation(chunks):
    """The preallocated (capacity-doubling) cache holds exactly what concatenating every step would, and never
    reserves more than twice what it holds."""
    from thrifty.agents.relic_policy import TrialCache

    cache, ks, vs = TrialCache(n_layers=2), [], []
    g = torch.Generator().manual_seed(len(chunks))
    for n in chunks:
        k, v = torch.randn(3, 2, n, 4, generator=g), torch.randn(3, 2, n, 4, generator=g)
        ks.append(k)
        vs.append(v)
        for layer in range(2):
            got_k, got_v = cache.update(k, v, layer)
        assert torch.equal(got_k, torch.cat(ks, 2)) and torch.equal(got_v, torch.cat(vs, 2))
    assert cache.length == sum(chunks)
    assert cache.nbytes() == 2 * 2 * 3 * 2 * sum(chunks) * 4 * 4
    assert cache.nbytes() <= cache.reserved_bytes() <= 2 * cache.nbytes()


def test_trial_cache_concatenates_tensors_that_carry_gradients():
    from thrifty.agents.relic_policy import TrialCache

    cache = TrialCache(n_layers=1)
    a = torch.randn(1, 1, 2, 4, requires_grad=True)
    b = torch.randn(1, 1, 3, 4, requires_grad=True)
    cache.update(a, a, 0)
    k, _ = cache.update(b, b, 0)
    k.sum().backward()  # no in-place write into a tensor autograd saved
    assert torch.equal(a.grad, torch.ones_like(a)) and torch.equal(b.grad, torch.ones_like(b))
