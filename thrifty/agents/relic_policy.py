"""The ReLIC policy (Elawady et al. 2024): a small Llama-architecture transformer over one token per environment
step of a whole trial, with actor and critic heads, for in-context RL on the Darkroom family.

Token of step t (ReLIC's token builder, §3.1 of research/seed-relic.md):
    in_proj(concat[obs_t scaled to [0, 1], previous reward, embed(previous action)]) + step_embed(step in episode)
where the previous-action index is 0 at the first step of an episode ("start") and a + 1 otherwise, and the
previous reward is 0 there. Then the decoder layers of a `transformers` LlamaForCausalLM (driven layer by layer
through `HFDecoder`, its embedding and LM head unused), its final RMSNorm, Linear + ReLU, and the heads:
actor logits [A] and a critic value.

Positions (computed by one function, `trial_positions`, for the whole sequence and for each cached step):
- the step index within the episode (learned embedding, reset at every episode start; clipped to the table);
- the rotary phase: the episode index within the trial (ReLIC's default, `rope="episode"`: attention logits
  depend on how many episodes apart two steps are) or the step index within the trial (`rope="token"`).

Attention: always an explicit additive mask (never `is_causal`, never no mask: the released ReLIC code attends to
the future on its non-flash path): causal, and with `inter_episode=False` block-diagonal by episode as well.
Sink (`thrifty.techniques.sink_kv`): `zero`, `k`, `v`, `kv` add the Sink-KV column inside attention (never masked,
never cached, no position); `token` prepends one learned input embedding at the start of every trial, visible to
every later step even with inter-episode attention off (it has a position and is cached like a step); `none`.

Acting and training run the same `_run` over a `TrialState`: `forward` is one `_run` of the whole trial from a
fresh state; acting is `start` then one `step` per environment step, the keys and values of earlier steps in the
state's `TrialCache`. The two agree (tests/test_relic_policy.py).

Example:
    >>> import torch
    >>> from thrifty.envs.darkroom import DarkroomVectorEnv
    >>> env = DarkroomVectorEnv("darkroom-ad", num_envs=2)
    >>> policy = RelicPolicy(RelicConfig.for_spaces(env.single_observation_space, env.single_action_space))
    >>> state = policy.start(batch=2)
    >>> obs, _ = env.reset(seed=0)
    >>> logits, value = policy.step(state, torch.as_tensor(obs)[:, None], torch.zeros(2, 1, dtype=torch.long),
    ...                             torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool))
    >>> tuple(logits.shape), tuple(value.shape), state.cache.length
    ((2, 1, 5), (2, 1), 1)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from thrifty.backbones import HFDecoder
from thrifty.techniques.sink_kv import SinkKV, check_variant

CONFIG_FILE = "relic_policy.json"
WEIGHTS_FILE = "model.safetensors"


class ObservationSpaceMismatchError(ValueError):
    """A checkpoint built for another observation space than the one it is loaded for."""


def describe_space(space: Any) -> dict[str, Any]:
    """A JSON description of a gymnasium Box: {"type": "Box", "shape", "low", "high", "dtype"} (what a checkpoint
    records and `RelicPolicy.load` compares)."""
    import gymnasium as gym

    if not isinstance(space, gym.spaces.Box) or len(space.shape) != 1:
        raise TypeError(f"the ReLIC policy takes a 1-D Box observation space, got {space}")
    return {"type": "Box", "shape": list(space.shape), "low": np.asarray(space.low, float).tolist(),
            "high": np.asarray(space.high, float).tolist(), "dtype": str(space.dtype)}


class SpacesConfig:
    """What a trial policy's config knows of its environment: `observation_space` (`describe_space`) and
    `n_actions`; `for_spaces` builds one from gymnasium spaces."""

    observation_space: dict[str, Any]
    n_actions: int

    @classmethod
    def for_spaces(cls, observation_space: Any, action_space: Any, **kw: Any):
        return cls(observation_space=describe_space(observation_space), n_actions=int(action_space.n), **kw)

    @property
    def obs_dim(self) -> int:
        return int(self.observation_space["shape"][0])


@dataclass
class RelicConfig(SpacesConfig):
    """The policy's shape and switches (defaults: ReLIC's Darkroom "tiny" transformer, research/seed-relic.md §3.2)."""

    observation_space: dict[str, Any]
    """`describe_space` of the environment's single observation space (Box, 1-D)"""
    n_actions: int
    """discrete actions"""
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 8
    d_ff: int = 256
    max_episode_steps: int = 512
    """rows of the within-episode step embedding; later steps share the last row"""
    rope: Literal["episode", "token"] = "episode"
    """rotary phase: the episode index in the trial (ReLIC) or the step index in the trial"""
    inter_episode: bool = True
    """attend across episodes of the trial (ReLIC); False: block-diagonal by episode"""
    sink: str = "kv"
    """a `thrifty.techniques.sink_kv` variant: none, zero, k, v, kv, token"""
    reward_input: bool = True
    """the previous reward is part of the token"""
    rope_theta: float = 10000.0
    seed: int = 0
    """initialisation seed (the global RNG is left untouched)"""

    def __post_init__(self) -> None:
        check_variant(self.sink)
        if self.rope not in ("episode", "token"):
            raise ValueError(f"rope must be 'episode' or 'token', got {self.rope!r}")
        if self.n_heads % self.n_kv_heads or self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads}: "
                             "heads must divide d_model and KV heads must divide heads")



@dataclass
class TrialCache:
    """Keys and values of the trial's steps so far, per layer [B, Hkv, T, dh] (never the Sink-KV column);
    `update(k, v, layer_idx)` is what a transformers attention module calls.

    Acting appends one step at a time to a trial of thousands: each layer's keys and values live in a buffer
    whose capacity doubles when full, so a step writes its slice instead of copying the whole cache
    (`torch.cat` per step is O(T) a step, O(T^2) a trial). `update` returns views of the filled part. Tensors
    that carry gradients (training through the cache) are concatenated instead, so no in-place write touches
    a tensor autograd saved."""

    n_layers: int
    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = [_Growing(dim=2) for _ in range(self.n_layers)]
        self.values = [_Growing(dim=2) for _ in range(self.n_layers)]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return self.keys[layer_idx].append(k), self.values[layer_idx].append(v)

    @property
    def length(self) -> int:
        return self.keys[0].length if self.keys else 0

    def nbytes(self) -> int:
        """Bytes of the cached keys and values (the filled part)."""
        return sum(g.nbytes() for g in self.keys + self.values)

    def reserved_bytes(self) -> int:
        """Bytes the buffers hold, spare capacity included (at most twice `nbytes`)."""
        return sum(g.reserved_bytes() for g in self.keys + self.values)


class _Growing:
    """A tensor that grows along `dim` in a buffer of doubling capacity; `append` returns the filled view."""

    def __init__(self, dim: int) -> None:
        self.dim, self.buf, self.length = dim, None, 0

    def append(self, x: torch.Tensor) -> torch.Tensor:
        d, n = self.dim, x.shape[self.dim]
        if self.buf is None or x.requires_grad or self.buf.requires_grad:
            self.buf = x if self.buf is None else torch.cat([self.view(), x], d)
            self.length = self.buf.shape[d]
            return self.buf
        if self.length + n > self.buf.shape[d]:
            shape = list(self.buf.shape)
            shape[d] = max(2 * shape[d], self.length + n)
            grown = self.buf.new_empty(shape)
            grown.narrow(d, 0, self.length).copy_(self.view())
            self.buf = grown
        self.buf.narrow(d, self.length, n).copy_(x)
        self.length += n
        return self.view()

    def view(self) -> torch.Tensor:
        return self.buf.narrow(self.dim, 0, self.length)

    def nbytes(self) -> int:
        return 0 if self.buf is None else self.view().numel() * self.buf.element_size()

    def reserved_bytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()


@dataclass
class TrialState:
    """What acting carries from one step to the next, per trial of a batch of B environments."""

    cache: TrialCache
    tokens: int = 0
    """tokens in the cache (steps, plus the sink token if any)"""
    episode: torch.Tensor | None = None
    """[B] index of the current episode in the trial (-1 before the first step)"""
    step: torch.Tensor | None = None
    """[B] index of the last step in its episode"""
    key_episode: _Growing = field(default_factory=lambda: _Growing(dim=1))
    """[B, tokens] episode of every cached token (-1 for the sink token)"""
    key_always: _Growing = field(default_factory=lambda: _Growing(dim=0))
    """[tokens] bool: visible to every later query whatever the episode (the sink token)"""


def trial_positions(episode_start: torch.Tensor, episode_before: torch.Tensor, step_before: torch.Tensor):
    """episode_start [B, T] bool, and the state before the chunk: episode_before [B] (-1 at a trial's start),
    step_before [B] -> (episode index [B, T], step index in the episode [B, T]).

    One function for a whole trial and for each cached step, so both modes see the same positions."""
    t = torch.arange(episode_start.shape[1], device=episode_start.device)
    episode = episode_before[:, None] + episode_start.long().cumsum(1)
    last_start = torch.where(episode_start, t, torch.full_like(t, -1)).cummax(1).values  # [B, T]
    step = torch.where(last_start >= 0, t - last_start, step_before[:, None] + 1 + t)
    return episode, step


def sample_action(logits: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, A] -> (actions [B], their log-probabilities [B]), drawn with `generator`."""
    logp = torch.log_softmax(logits.float(), -1)
    action = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return action, logp.gather(1, action[:, None]).squeeze(1)


class RelicPolicy(nn.Module):
    """Actor-critic transformer over a trial. Inputs per step, each [B, T]: obs [B, T, obs_dim] (raw), prev_action
    (the previous step's action, any value at an episode start), prev_reward, episode_start (bool)."""

    def __init__(self, config: RelicConfig) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.config = config
        c = config
        space = c.observation_space
        self.register_buffer("obs_low", torch.tensor(space["low"], dtype=torch.float32), persistent=False)
        self.register_buffer("obs_span", (torch.tensor(space["high"]) - torch.tensor(space["low"])).clamp(min=1e-6)
                             .float(), persistent=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            llama = LlamaConfig(vocab_size=1, hidden_size=c.d_model, intermediate_size=c.d_ff,
                                num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                                num_key_value_heads=c.n_kv_heads, max_position_embeddings=1 << 16,
                                rope_theta=c.rope_theta, initializer_range=0.02, tie_word_embeddings=False,
                                bos_token_id=None, eos_token_id=None, pad_token_id=None,
                                architectures=["LlamaForCausalLM"])
            self.decoder = LlamaForCausalLM._from_config(llama, attn_implementation="sdpa")
            self.action_embed = nn.Embedding(c.n_actions + 1, c.d_model)  # 0 = episode start
            self.in_proj = nn.Linear(c.obs_dim + int(c.reward_input) + c.d_model, c.d_model)
            self.step_embed = nn.Embedding(c.max_episode_steps, c.d_model)
            self.out_proj = nn.Linear(c.d_model, c.d_model)
            self.actor = nn.Linear(c.d_model, c.n_actions)
            self.critic = nn.Linear(c.d_model, 1)
            for m in (self.action_embed, self.in_proj, self.step_embed, self.out_proj, self.actor, self.critic):
                nn.init.normal_(m.weight, std=0.02)
            self.sink_token = nn.Parameter(torch.randn(c.d_model) * 0.02) if c.sink == "token" else None
        self.backbone = HFDecoder.from_model(self.decoder)
        self.sink_kv = SinkKV(variant=c.sink).attach(self.backbone)  # SinkKVParameters, or None

    # ------------------------------------------------------------------ tokens, masks, the run
    def tokens(self, obs, prev_action, prev_reward, episode_start) -> torch.Tensor:
        """-> input embeddings [B, T, d] (without the step embedding)."""
        obs = (obs.float() - self.obs_low) / self.obs_span
        action = torch.where(episode_start, torch.zeros_like(prev_action), prev_action.long() + 1)
        parts = [obs]
        if self.config.reward_input:
            parts.append(torch.where(episode_start, 0.0, prev_reward.float())[..., None])
        parts.append(self.action_embed(action))
        return self.in_proj(torch.cat(parts, -1))

    def start(self, batch: int) -> TrialState:
        """A new trial for `batch` environments (the sink token, if any, goes into the cache now)."""
        dev = self.obs_low.device
        state = TrialState(TrialCache(self.config.n_layers), episode=torch.full((batch,), -1, device=dev),
                           step=torch.full((batch,), -1, device=dev))
        if self.sink_token is not None:
            h = self.sink_token.expand(batch, 1, -1)
            self._layers(state, h, torch.full((batch, 1), -1, device=dev), torch.ones(1, dtype=torch.bool,
                                                                                       device=dev))
        return state

    def step(self, state: TrialState, obs, prev_action, prev_reward, episode_start):
        """Extend the trial by T >= 1 steps (T = 1 when acting) -> (actor logits [B, T, A], values [B, T])."""
        if state.tokens == 0 or (state.episode < 0).any():
            if not bool(episode_start[:, 0].all()):
                raise ValueError("the first step of a trial must have episode_start=True")
        episode, step = trial_positions(episode_start, state.episode, state.step)
        h = self.tokens(obs, prev_action, prev_reward, episode_start)
        h = h + self.step_embed(step.clamp(max=self.config.max_episode_steps - 1))
        h = self._layers(state, h, episode, torch.zeros(h.shape[1], dtype=torch.bool, device=h.device))
        state.episode, state.step = episode[:, -1], step[:, -1]
        z = torch.relu(self.out_proj(self.backbone.final_norm(h)))
        return self.actor(z), self.critic(z).squeeze(-1)

    def forward(self, obs, prev_action, prev_reward, episode_start):
        """A whole trial from its start in one pass -> (actor logits [B, T, A], values [B, T])."""
        return self.step(self.start(obs.shape[0]), obs, prev_action, prev_reward, episode_start)

    def _layers(self, state: TrialState, h: torch.Tensor, episode: torch.Tensor, always: torch.Tensor):
        """Run the decoder layers on new tokens h [B, q, d] of episodes [B, q], appending them to the cache."""
        b, q, _ = h.shape
        token = torch.arange(state.tokens, state.tokens + q, device=h.device)  # index in the trial's sequence
        key_episode = state.key_episode.append(episode)  # [B, k]
        key_always = state.key_always.append(always)  # [k]
        key_token = torch.arange(state.tokens + q, device=h.device)
        visible = (key_token[None, :] <= token[:, None])[None]  # [1, q, k] causal, explicit
        if not self.config.inter_episode:
            visible = visible & ((key_episode[:, None, :] == episode[:, :, None]) | key_always[None, None, :])
        mask = torch.zeros(visible.shape, dtype=h.dtype, device=h.device)
        mask = mask.masked_fill(~visible, torch.finfo(h.dtype).min)[:, None]  # [B|1, 1, q, k]
        rope = episode.clamp(min=0) if self.config.rope == "episode" else token.expand(b, q)
        pe = self.backbone.rotary(h, rope)
        for i in range(self.backbone.n_layers):
            h = self.backbone.run_layer(i, h, rope, mask, state.cache, position_embeddings=pe)
        state.tokens += q
        return h

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        """Write `relic_policy.json` (the config) and `model.safetensors` into directory `path`."""
        return save_trial_policy(self, path, CONFIG_FILE)

    @classmethod
    def load(cls, path: str | Path, observation_space: Any = None) -> "RelicPolicy":
        """Load a saved policy; with `observation_space`, refuse a checkpoint built for another one."""
        return load_trial_checkpoint(cls, RelicConfig, path, CONFIG_FILE, "ReLIC", observation_space)


def save_trial_policy(policy: nn.Module, path: str | Path, config_file: str) -> Path:
    """A trial policy's config (JSON) and weights (safetensors) into directory `path`."""
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    (p / config_file).write_text(json.dumps(asdict(policy.config), indent=2))
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(p / WEIGHTS_FILE))
    return p


def load_trial_checkpoint(cls, config_cls, path: str | Path, config_file: str, name: str,
                          observation_space: Any = None):
    """`cls(config_cls(**json))` with the weights of directory `path`; with `observation_space`, a checkpoint built
    for another one is refused."""
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / config_file).is_file() or not (p / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no {name} policy in {p}: expected {config_file} and {WEIGHTS_FILE}")
    config = config_cls(**json.loads((p / config_file).read_text()))
    if observation_space is not None:
        want = describe_space(observation_space)
        if want != config.observation_space:
            raise ObservationSpaceMismatchError(
                f"the policy in {p} was built for observation space {config.observation_space}, not for "
                f"{want}; train one for this environment")
    policy = cls(config)
    policy.load_state_dict(load_file(str(p / WEIGHTS_FILE)))
    return policy
