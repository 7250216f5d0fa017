"""LRAM's action models: one sequence layout over three backbones (xLSTM, Mamba, a Decision Transformer).

LRAM (Schmied et al., 2024). Per environment step t the model reads three tokens, [s_t, R_t, r_t]: the state, the
return-to-go and the reward (no action token). The action is predicted from the output at the return-to-go token
(it has seen s_t and R_t, not r_t), all action dimensions at once by one shared head over a discrete vocabulary:

    state (B, T, S) -> Linear -> (B, T, d) ┐
    rtg   (B, T, 1) -> Linear -> (B, T, d) ├─ interleave -> (B, 3T, d) -> LayerNorm -> backbone -> (B, 3T, d)
    rew   (B, T, 1) -> Linear -> (B, T, d) ┘
    outputs at the rtg tokens (B, T, d) -> Linear -> (B, T, A, bins) logits; cross-entropy against the bins

Continuous actions in [-1, 1] are cut into `bins` uniform bins per dimension (`ActionTokenizer`; decoding returns
the bin centre, so the round trip is within half a bin: LRAM's MinMaxTokenizer returns the lower edge).

Several domains share one model (LRAM's multi-domain layout, `DOMAINS`): states are zero-padded to
`max_state_dim`, actions to `max_act_dim`, rewards divided by the domain's scale, and the action vocabulary is
one list of `discrete_actions` ids for discrete domains (BabyAI's 7 actions: ids 0..6, one dimension) followed by
the `bins` ids of the continuous bins (Meta-World: discrete_actions + bin, per dimension). The cross-entropy runs
over the whole vocabulary and only over the domain's action dimensions; decoding takes the argmax within the
domain's part of it. Training takes one batch per domain per optimiser step (`thrifty.train.action_model`).

Acting (`ActionModelPolicy`): xLSTM and Mamba step token by token with their fixed-size state, never truncated
(LRAM's length extrapolation); the transformer appends each step's tokens to a KV cache, either over the whole
history or over a sliding window of the last `window` steps (the oldest step's keys and values are dropped).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from thrifty.backbones.recurrent import RecurrentConfig, build_recurrent, state_bytes
from thrifty.cost import CostRecord, Stopwatch

KIND = "thrifty-action-model"
ARCHS = ("xlstm", "mamba", "dt")
TOKENS_PER_STEP = 3


@dataclass(frozen=True)
class Domain:
    name: str
    state_dim: int
    act_dim: int
    discrete: int
    """number of discrete actions (ids 0..discrete-1 of the vocabulary); 0 for continuous actions in [-1, 1]"""
    reward_scale: float
    """rewards and returns are divided by this (LRAM: Meta-World 200)"""


DOMAINS = {"metaworld": Domain("metaworld", 39, 4, 0, 200.0), "babyai": Domain("babyai", 151, 1, 7, 1.0)}
"""The action models' domains: Meta-World (39-D state, 4-D continuous actions) and BabyAI grid tasks
(`thrifty.envs.babyai_grid`: 151-D state, one of 7 actions)."""


def _domain_specs(names) -> list[Domain]:
    unknown = [n for n in names if n not in DOMAINS]
    if unknown or not names:
        raise ValueError(f"unknown domains {unknown or '(none)'}; domains: {', '.join(DOMAINS)}")
    return [DOMAINS[n] for n in names]


def domain_of(task: str) -> str:
    return "babyai" if task.startswith("babyai-") else "metaworld"


class ActionTokenizer:
    """Uniform bins over [low, high] per action dimension: x -> bin index; index -> bin centre."""

    def __init__(self, bins: int = 256, low: float = -1.0, high: float = 1.0) -> None:
        if bins < 2 or not high > low:
            raise ValueError(f"need bins >= 2 and high > low, got bins={bins}, low={low}, high={high}")
        self.bins, self.low, self.high = bins, low, high
        self.width = (high - low) / bins

    def encode(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        return ((x - self.low) / self.width).floor().clamp(0, self.bins - 1).long()

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        return self.low + (idx.float() + 0.5) * self.width


@dataclass(frozen=True)
class ActionModelConfig:
    arch: str = "xlstm"
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    max_state_dim: int = 39
    max_act_dim: int = 4
    bins: int = 256
    context_steps: int = 50
    """training sequence length in environment steps (3 tokens each); the DT's positions are built for it"""
    window: int | None = None
    """DT acting: keep the last `window` steps in the KV cache (None: the whole history)"""
    domains: tuple[str, ...] = ("metaworld",)
    """the domains (names in DOMAINS) this model acts in"""
    discrete_actions: int = 0
    """ids reserved for discrete actions before the continuous bins (the largest discrete domain's count)"""
    slstm_at: tuple[int, ...] = ()
    dt_mlp_width: int | None = None
    """DT: the MLP's hidden width; None sizes it so the DT backbone has as many parameters as the xLSTM backbone
    of the same d_model and layers (LRAM compares the backbones at equal parameters)"""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown action-model architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 step (or None for the whole history), got {self.window}")
        if self.arch == "dt" and self.dt_mlp_width is None:  # fixed here, so a saved card holds the number
            object.__setattr__(self, "dt_mlp_width", matched_mlp_width(self))
        for d in _domain_specs(self.domains):
            if d.state_dim > self.max_state_dim or d.act_dim > self.max_act_dim or d.discrete > self.discrete_actions:
                raise ValueError(f"domain {d.name} needs max_state_dim >= {d.state_dim}, max_act_dim >= {d.act_dim} "
                                 f"and discrete_actions >= {d.discrete}; got {self.max_state_dim}, "
                                 f"{self.max_act_dim}, {self.discrete_actions}")

    @property
    def vocab(self) -> int:
        return self.discrete_actions + self.bins

    @staticmethod
    def for_domains(arch: str, domains: tuple[str, ...], **kwargs) -> "ActionModelConfig":
        """A config sized for `domains`: the largest state, action dimension and discrete action count."""
        specs = _domain_specs(domains)
        return ActionModelConfig(arch, max_state_dim=max(d.state_dim for d in specs),
                                 max_act_dim=max(d.act_dim for d in specs),
                                 discrete_actions=max(d.discrete for d in specs), domains=tuple(domains), **kwargs)


def matched_mlp_width(cfg: ActionModelConfig) -> int:
    """The Llama MLP width w that gives the DT backbone the xLSTM backbone's parameter count: a Llama layer holds
    4 d^2 (attention) + 3 d w (gated MLP) + 2 d (norms), plus one final norm of d."""
    xlstm = build_recurrent(RecurrentConfig("xlstm", d_model=cfg.d_model, layers=cfg.layers, heads=cfg.heads,
                                            context_length=TOKENS_PER_STEP * cfg.context_steps))
    target = sum(p.numel() for p in xlstm.parameters())
    d = cfg.d_model
    return max(1, round(((target - d) / cfg.layers - 4 * d * d - 2 * d) / (3 * d)))


class ActionModel(nn.Module):
    def __init__(self, cfg: ActionModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed_state = nn.Linear(cfg.max_state_dim, d)
        self.embed_rtg = nn.Linear(1, d)
        self.embed_reward = nn.Linear(1, d)
        self.embed_ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.max_act_dim * cfg.vocab)
        self.tokenizer = ActionTokenizer(cfg.bins)
        if cfg.arch == "dt":
            from transformers import LlamaConfig, LlamaModel

            self.backbone = LlamaModel(LlamaConfig(
                vocab_size=2, hidden_size=d, intermediate_size=cfg.dt_mlp_width,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                max_position_embeddings=TOKENS_PER_STEP * cfg.context_steps, attn_implementation="eager",
                bos_token_id=None, eos_token_id=None, pad_token_id=None))
            params = inspect.signature(self.backbone.forward).parameters
            self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.24
        else:
            self.backbone = build_recurrent(RecurrentConfig(
                cfg.arch, d_model=d, layers=cfg.layers, heads=cfg.heads, slstm_at=cfg.slstm_at,
                context_length=TOKENS_PER_STEP * cfg.context_steps))

    # ------------------------------------------------------------------ tokens
    def domain(self, name: str) -> Domain:
        if name not in self.cfg.domains:
            raise ValueError(f"this action model acts in {list(self.cfg.domains)}, not in {name!r}")
        return DOMAINS[name]

    def tokens(self, state: torch.Tensor, rtg: torch.Tensor, reward: torch.Tensor,
               domain: str = "metaworld") -> torch.Tensor:
        """state (B, T, S<=max_state_dim), rtg (B, T), reward (B, T) -> tokens (B, 3T, d), order s, R, r per step."""
        b, t, s = state.shape
        if s != self.domain(domain).state_dim:
            raise ValueError(f"a {domain} state has {self.domain(domain).state_dim} dimensions, got {s}")
        state = nn.functional.pad(state, (0, self.cfg.max_state_dim - s))
        scale = self.domain(domain).reward_scale
        toks = torch.stack([self.embed_state(state), self.embed_rtg(rtg.unsqueeze(-1) / scale),
                            self.embed_reward(reward.unsqueeze(-1) / scale)], dim=2)  # (B, T, 3, d)
        return self.embed_ln(toks.reshape(b, TOKENS_PER_STEP * t, -1))

    def logits(self, h_rtg: torch.Tensor) -> torch.Tensor:
        """outputs at rtg tokens (..., d) -> (..., max_act_dim, vocab)."""
        return self.head(h_rtg).unflatten(-1, (self.cfg.max_act_dim, self.cfg.vocab))

    def targets(self, action: torch.Tensor, domain: str) -> torch.Tensor:
        """actions (..., act_dim) of `domain` -> vocabulary ids (..., act_dim)."""
        d = self.domain(domain)
        if d.discrete:
            a = action[..., : d.act_dim]
            if not bool(((a >= 0) & (a < d.discrete) & (a == a.round())).all()):
                raise ValueError(f"{domain} actions are whole numbers in [0, {d.discrete}), got values in "
                                 f"[{float(a.min())}, {float(a.max())}]")
            return a.long()
        return self.tokenizer.encode(action[..., : d.act_dim]) + self.cfg.discrete_actions

    def decode(self, logits: torch.Tensor, domain: str) -> torch.Tensor:
        """logits (..., max_act_dim, vocab) -> actions (..., act_dim): the argmax within the domain's ids."""
        d = self.domain(domain)
        if d.discrete:
            return logits[..., : d.act_dim, : d.discrete].argmax(-1).float()
        return self.tokenizer.decode(logits[..., : d.act_dim, self.cfg.discrete_actions:].argmax(-1))

    def forward(self, state: torch.Tensor, rtg: torch.Tensor, reward: torch.Tensor,
                domain: str = "metaworld") -> torch.Tensor:
        """Parallel over a whole window: -> logits (B, T, max_act_dim, vocab)."""
        x = self.tokens(state, rtg, reward, domain)
        if self.cfg.arch == "dt":
            if x.shape[1] > TOKENS_PER_STEP * self.cfg.context_steps:
                raise ValueError(f"{x.shape[1] // 3} steps in one window, but the model was built for "
                                 f"{self.cfg.context_steps} (context_steps)")
            h = self.backbone(inputs_embeds=x, use_cache=False).last_hidden_state
        else:
            h = self.backbone(x)
        return self.logits(h[:, 1::TOKENS_PER_STEP])

    def loss(self, state, rtg, reward, action, domain: str = "metaworld",
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy over the vocabulary for the domain's action dimensions; mask (B, T) marks real steps."""
        act_dim = self.domain(domain).act_dim
        logits = self.forward(state, rtg, reward, domain)[..., :act_dim, :]  # (B, T, A, vocab)
        target = self.targets(action, domain)
        ce = nn.functional.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none")
        ce = ce.view(target.shape).mean(-1)
        if mask is None:
            return ce.mean()
        return (ce * mask).sum() / mask.sum().clamp_min(1)

    def flops_per_token(self, context_tokens: int = 0) -> int:
        """Analytic FLOPs per token of the backbone's matmuls (2 x parameters of its linear layers), plus, for the
        transformer, attention over `context_tokens` keys (2 x 2 x d per key and layer)."""
        linear = sum(2 * m.in_features * m.out_features for m in self.backbone.modules() if isinstance(m, nn.Linear))
        attn = 4 * self.cfg.d_model * self.cfg.layers * context_tokens if self.cfg.arch == "dt" else 0
        return linear + attn


def save_action_model(model: ActionModel, out: str | Path, card: dict) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    cfg = asdict(model.cfg)
    (out / "card.json").write_text(json.dumps({"kind": KIND, "config": cfg, **card}, indent=2) + "\n")
    return out


class ActionModelLoadError(ValueError):
    pass


def load_action_model(path: str | Path, arch: str | None = None) -> tuple[ActionModel, dict]:
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / "card.json").is_file() or not (p / "model.safetensors").is_file():
        raise ActionModelLoadError(f"no action model at {p}: expected card.json and model.safetensors "
                                   "(build one with `thrifty train action-model`)")
    card = json.loads((p / "card.json").read_text())
    if card.get("kind") != KIND:
        raise ActionModelLoadError(f"{p} holds a {card.get('kind')!r} checkpoint, not an action model")
    cfg = card["config"]
    if arch is not None and cfg["arch"] != arch:
        raise ActionModelLoadError(f"{p} is a {cfg['arch']!r} action model, not {arch!r}")
    cfg["slstm_at"] = tuple(cfg.get("slstm_at") or ())
    cfg["domains"] = tuple(cfg.get("domains") or ("metaworld",))
    cfg.pop("reward_scale", None)  # cards written before DOMAINS held Meta-World's scale (200) here
    weights = load_file(str(p / "model.safetensors"))
    gate = weights.get("backbone.layers.0.mlp.gate_proj.weight")
    if cfg["arch"] == "dt" and cfg.get("dt_mlp_width") is None and gate is not None:
        cfg["dt_mlp_width"] = int(gate.shape[0])  # cards from before the width was written down
    try:
        model = ActionModel(ActionModelConfig(**cfg))
        model.load_state_dict(weights)
    except (TypeError, RuntimeError) as e:
        raise ActionModelLoadError(f"{p}: its weights do not fit the configuration in its card.json ({e})") from e
    return model.eval(), card


# ---------------------------------------------------------------------- acting
class ActionModelPolicy:
    """The policy protocol over an `ActionModel`: one environment step = feed r_{t-1}, s_t, R_t, read the action.

    `target_returns[task]` is the return the model is conditioned on at the first step (from the card: the best
    training return of that task); R_t then decreases by each reward received."""

    def __init__(self, model: ActionModel, card: dict | None = None, window: int | None = None,
                 compile: bool = False) -> None:
        self.model, self.card = model.eval(), card or {}
        if window is not None and (model.cfg.arch != "dt" or window < 1):
            raise ValueError(f"a window (>= 1 step) applies to the transformer's KV cache only, not to "
                             f"{model.cfg.arch!r} (got {window})")
        if compile:
            if model.cfg.arch == "dt":
                raise ValueError("compile applies to the recurrent models' fixed-shape steps (xlstm, mamba); the "
                                 "transformer's KV cache grows every step")
            model.backbone.compile_step()
        self.window = window if window is not None else model.cfg.window
        self.name = (f"lram-{model.cfg.arch}" + (f"-window{self.window}" if self.window else "")
                     + ("-compiled" if compile else ""))
        self.target_returns = self.card.get("target_returns", {})
        self._per_token = None

    @classmethod
    def load(cls, path: str | Path, arch: str | None = None, window: int | None = None,
             compile: bool = False) -> "ActionModelPolicy":
        return cls(*load_action_model(path, arch), window=window, compile=compile)

    def reset(self, task: str, instruction: str) -> None:
        if self.target_returns and task not in self.target_returns:
            raise ValueError(f"this action model was trained on {sorted(self.target_returns)}, not on {task!r}")
        self.domain = self.model.domain(domain_of(task)).name
        self.rtg = float(self.target_returns.get(task, 0.0))
        self.state = None  # recurrent state or DT cache
        self.steps = 0
        self.last_reward = None
        self.tokens_seen = 0

    def observe_reward(self, reward: float) -> None:
        self.last_reward = float(reward)
        self.rtg -= float(reward)

    @torch.inference_mode()
    def act(self, observation: dict[str, Any]) -> "PolicyStep":
        from thrifty.agents.policy import PolicyStep

        m = self.model
        with Stopwatch() as sw:
            s = torch.as_tensor(np.asarray(observation["state"], np.float32)).view(1, 1, -1)
            # tokens(s_t, R_t, r_{t-1}): a reward token depends on the reward alone, so [..., 2] is step t-1's
            toks = m.tokens(s, torch.tensor([[self.rtg]]), torch.tensor([[self.last_reward or 0.0]]),
                            self.domain)  # (1, 3, d)
            feed = toks[:, :2] if self.last_reward is None else torch.cat([toks[:, 2:3], toks[:, :2]], 1)
            h = self._feed(feed)
            action = m.decode(m.logits(h[:, -1])[0], self.domain).numpy()  # (act_dim,)
        n = feed.shape[1]
        flops = sum(m.flops_per_token(self._context(i)) for i in range(n))
        self.steps += 1
        return PolicyStep(action, CostRecord(flops=int(flops), wall_s=sw.seconds, kv_bytes=state_bytes(self.state),
                                             tokens_in=n, tokens_context=self.tokens_seen))

    def _context(self, i: int) -> int:
        return min(self.tokens_seen - i, TOKENS_PER_STEP * (self.window or 10**12))

    def _feed(self, x: torch.Tensor) -> torch.Tensor:
        """Feed tokens x (1, n, d) after what was seen; returns their outputs (1, n, d)."""
        m = self.model
        self.tokens_seen += x.shape[1]
        if m.cfg.arch != "dt":
            outs = []
            for i in range(x.shape[1]):
                y, self.state = m.backbone.step(x[:, i:i + 1], self.state)
                outs.append(y)
            return torch.cat(outs, 1)
        from transformers import DynamicCache

        if self.state is None:
            self.state = DynamicCache()
            self._next_pos = 0
        pos = torch.arange(self._next_pos, self._next_pos + x.shape[1]).unsqueeze(0)
        self._next_pos += x.shape[1]
        out = m.backbone(inputs_embeds=x, position_ids=pos, use_cache=True, **{m._cache_arg: self.state})
        self.state = getattr(out, "cache", None) or out.past_key_values
        if self.window is not None:
            self._slide(TOKENS_PER_STEP * self.window)
        return out.last_hidden_state

    def _slide(self, keep: int) -> None:
        """Keep only the newest `keep` tokens' keys and values in every layer (RoPE makes attention relative, so
        positions need no shift)."""
        for layer in self.state.layers:
            if layer.keys is not None and layer.keys.shape[-2] > keep:
                layer.keys = layer.keys[..., -keep:, :]
                layer.values = layer.values[..., -keep:, :]
