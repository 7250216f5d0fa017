"""DeeR-VLA's multi-exit LLM policy on Meta-World, in thrifty's own code: one Llama decoder, an exit every 2 layers,
one shared recurrent action head, and early exit by action consistency (`thrifty.techniques.early_exit`).

DeeR-VLA (Yue et al., NeurIPS 2024; notes in docs/deer.md). Per control step the decoder reads one step's tokens,
and only them (time is the head's business, through its LSTM):

    instruction words (W ids, padded) -> embed_tokens ------------------┐
    state (39,) -> (s - mean) / std -> Linear(39, O*d) -> O tokens ------┴-> h_0 (B, q = W + O, d)
    h_l = decoder layer l-1 (h_{l-1}), attention among the step's tokens (padding keys masked), RoPE positions 0..q-1
    exit at layer e (every `exit_every` layers):  f_e = max over the step's real tokens of norm(h_e)   (B, d)
    shared head:  f_e -> LSTM (state carried over steps) -> arm MLP -> tanh (B, 3)
                                                        └-> gripper MLP -> logit (B,)  (> 0: close, +1; else -1)

The decoder is a `transformers` LlamaForCausalLM trained from scratch (its vocabulary is the instructions' words; its
LM head is tied and never used) and is driven layer by layer through `thrifty.backbones.HFDecoder`, so layers past
the exit are never run. `ExitHead.peek(f, state)` gives an exit's action and the state it would lead to without
keeping it; the policy keeps (commits) only the state of the exit it takes. The first exit's consistency is measured
against the head on f_0 (the embeddings, a pseudo-exit never taken).

A checkpoint is a directory: `model.safetensors`, `card.json` (config, recipe, data, metrics) and `scores.safetensors`
(the demonstration set's consistency scores, (exits, steps), from which an exit-ratio budget solves thresholds).
Built with a maximum exit layer, the model holds only that many decoder layers: the deeper weights are never read.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from thrifty.cost import CostRecord, LayerWork, Stopwatch, layer_flops
from thrifty.techniques.early_exit import ExitBudget, consistency_score, target_distribution

KIND = "thrifty-deer-policy"
PAD, UNK = "<pad>", "<unk>"


def instruction_words(text: str) -> list[str]:
    """'Pick up the puck.' -> ['pick', 'up', 'the', 'puck']."""
    return re.findall(r"[a-z0-9]+", text.lower())


def word_vocabulary(instructions) -> tuple[str, ...]:
    """The padding and unknown-word tokens, then every word of the instructions (sorted): the decoder's vocabulary."""
    return (PAD, UNK, *sorted({w for s in instructions for w in instruction_words(s)}))


class DeerLoadError(ValueError):
    """A DeeR policy directory that is missing, incomplete, or holds another model."""


@dataclass(frozen=True)
class DeerConfig:
    words: tuple[str, ...]
    """the vocabulary: PAD, UNK, then the instructions' words (`word_vocabulary`)"""
    d_model: int = 128
    layers: int = 12
    heads: int = 4
    kv_heads: int = 2
    d_ff: int = 256
    exit_every: int = 2
    """an exit after every `exit_every` decoder layers; `layers` must be a multiple of it"""
    instruction_tokens: int = 10
    """instruction words per step (cut or padded to this many)"""
    obs_tokens: int = 2
    """tokens the 39-D state is projected to"""
    state_dim: int = 39
    arm_dim: int = 3
    """Meta-World's 4-D action without the gripper"""
    lstm_hidden: int = 128
    mlp_hidden: int = 128

    def __post_init__(self) -> None:
        ints = ("d_model", "layers", "heads", "kv_heads", "d_ff", "exit_every", "instruction_tokens", "obs_tokens",
                "state_dim", "arm_dim", "lstm_hidden", "mlp_hidden")
        bad = [n for n in ints if getattr(self, n) < 1]
        if bad:
            raise ValueError(f"DeerConfig fields {bad} must be >= 1, got {[getattr(self, n) for n in bad]}")
        if self.layers % self.exit_every:
            raise ValueError(f"layers ({self.layers}) must be a multiple of exit_every ({self.exit_every})")
        if self.d_model % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"d_model {self.d_model} must divide by heads {self.heads}, and heads by kv_heads "
                             f"{self.kv_heads}")
        if len(self.words) < 3 or self.words[:2] != (PAD, UNK):
            raise ValueError(f"words must start with {PAD!r}, {UNK!r} and hold at least one word "
                             "(build it with word_vocabulary)")

    @property
    def exit_layers(self) -> tuple[int, ...]:
        """Layers run at each exit (1-based): (2, 4, ..., layers) for an exit every 2 layers."""
        return tuple(range(self.exit_every, self.layers + 1, self.exit_every))

    @property
    def tokens_per_step(self) -> int:
        return self.instruction_tokens + self.obs_tokens


class HeadOutput(NamedTuple):
    arm: torch.Tensor
    """(B, arm_dim) in [-1, 1] (a window: (B, T, arm_dim))"""
    gripper_logit: torch.Tensor | None
    """(B,) (a window: (B, T)); None when the peek skipped it (`ExitHead.gripper_of` computes it later)"""
    state: tuple[torch.Tensor, torch.Tensor]
    """the LSTM state (h, c), each (B, H), after this step: what committing this exit keeps"""
    y: torch.Tensor
    """the LSTM output (B, H) the two MLPs read"""


class ExitHead(nn.Module):
    """The shared action head of every exit: LSTM over time, arm MLP with tanh, gripper MLP (a logit)."""

    def __init__(self, cfg: DeerConfig) -> None:
        super().__init__()
        d, h, m = cfg.d_model, cfg.lstm_hidden, cfg.mlp_hidden
        self.lstm = nn.LSTM(d, h, batch_first=True)
        self.arm = nn.Sequential(nn.Linear(h, m), nn.ReLU(), nn.Linear(m, cfg.arm_dim))
        self.gripper = nn.Sequential(nn.Linear(h, m), nn.ReLU(), nn.Linear(m, 1))

    def forward(self, feats: torch.Tensor, state=None) -> HeadOutput:
        """A window (training): feats (B, T, d) -> arm (B, T, A), gripper logit (B, T), the state after step T."""
        y, (h, c) = self.lstm(feats, None if state is None else (state[0][None], state[1][None]))  # y (B, T, H)
        return HeadOutput(self.arm_of(y), self.gripper_of(y), (h[0], c[0]), y[:, -1])

    def peek(self, feat: torch.Tensor, state=None, gripper: bool = True) -> HeadOutput:
        """One step from `state` on feat (B, d): the action and the next state, one LSTM cell step with the LSTM's
        own weights; `state` itself is never modified (the caller commits by keeping `.state`). gripper=False
        leaves the gripper logit out (the consistency check reads the arm only). A state of batch 1 serves a
        feat of any batch (every row steps from it)."""
        lstm = self.lstm
        if state is None:
            zeros = feat.new_zeros(feat.shape[0], lstm.hidden_size)
            state = (zeros, zeros)
        elif state[0].shape[0] != feat.shape[0]:
            state = (state[0].expand(feat.shape[0], -1), state[1].expand(feat.shape[0], -1))
        h, c = torch.lstm_cell(feat, state, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
        return HeadOutput(self.arm_of(h), self.gripper_of(h) if gripper else None, (h, c), h)

    # The MLPs through functional calls on the modules' own weights: the same arithmetic as calling the
    # Sequentials, without their per-module call overhead, which dominates a batch-1 control step.
    def arm_of(self, y: torch.Tensor) -> torch.Tensor:
        """The arm action (..., A) in [-1, 1] from an LSTM output y (..., H)."""
        a, b = self.arm[0], self.arm[2]
        return torch.tanh(F.linear(torch.relu(F.linear(y, a.weight, a.bias)), b.weight, b.bias))

    def gripper_of(self, y: torch.Tensor) -> torch.Tensor:
        """The gripper logit (...,) from an LSTM output y (..., H)."""
        a, b = self.gripper[0], self.gripper[2]
        return F.linear(torch.relu(F.linear(y, a.weight, a.bias)), b.weight, b.bias).squeeze(-1)

    def flops_per_step(self, gripper: bool = True) -> int:
        """Analytic FLOPs of one peek for one sample: the LSTM cell's two matmuls (4 gates) and the MLPs' linears
        (the gripper's only when it is computed)."""
        lstm = 2 * 4 * self.lstm.hidden_size * (self.lstm.input_size + self.lstm.hidden_size)
        mods = [*self.arm, *(self.gripper if gripper else [])]
        return lstm + sum(2 * m.in_features * m.out_features for m in mods if isinstance(m, nn.Linear))

    def gripper_flops(self) -> int:
        return self.flops_per_step(gripper=True) - self.flops_per_step(gripper=False)


class DeerNet(nn.Module):
    """The decoder (only `n_layers` of the config's layers built), the observation projection and the shared head."""

    def __init__(self, cfg: DeerConfig, n_layers: int | None = None) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        from thrifty.backbones.hf import HFDecoder

        n_layers = cfg.layers if n_layers is None else n_layers
        if not 1 <= n_layers <= cfg.layers:
            raise ValueError(f"can build 1..{cfg.layers} of this model's layers, not {n_layers}")
        self.cfg, self.n_layers = cfg, n_layers
        self.llm = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(cfg.words), hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=n_layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=max(64, cfg.tokens_per_step), tie_word_embeddings=True,
            attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=0))
        self.decoder = HFDecoder.from_model(self.llm)
        self.obs_proj = nn.Linear(cfg.state_dim, cfg.obs_tokens * cfg.d_model)
        self.head = ExitHead(cfg)
        self.register_buffer("state_mean", torch.zeros(cfg.state_dim))
        self.register_buffer("state_std", torch.ones(cfg.state_dim))
        self.register_buffer("positions", torch.arange(cfg.tokens_per_step), persistent=False)

    @property
    def exit_layers(self) -> tuple[int, ...]:
        """The exits this build can take (those at or below its depth)."""
        return tuple(e for e in self.cfg.exit_layers if e <= self.n_layers)

    # ------------------------------------------------------------------ pieces
    def word_ids(self, instruction: str, pad: bool = True) -> torch.Tensor:
        """instruction -> (W,) long ids, cut to `instruction_tokens` and padded with PAD to it (or not: acting feeds
        the real words only, which gives the same features, since padding is masked out of attention and pooling)."""
        index = {w: i for i, w in enumerate(self.cfg.words)}
        ids = [index.get(w, 1) for w in instruction_words(instruction)][: self.cfg.instruction_tokens]
        return torch.tensor(ids + [0] * ((self.cfg.instruction_tokens - len(ids)) if pad else 0), dtype=torch.long)

    def embed(self, ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, W), state (B, 39) -> h_0 (B, q, d) and valid (B, q) bool (False at padding words)."""
        b = state.shape[0]
        words = self.decoder.embed(ids.expand(b, -1))  # (B, W, d)
        obs = self.obs_proj((state - self.state_mean) / self.state_std).view(b, self.cfg.obs_tokens, -1)
        valid = torch.cat([ids.expand(b, -1) != 0, torch.ones(b, self.cfg.obs_tokens, dtype=torch.bool,
                                                              device=ids.device)], 1)
        return torch.cat([words, obs], 1), valid

    def attention_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """valid (B, q) -> additive mask (B, 1, q, q): every token sees the step's real tokens, never padding."""
        m = torch.zeros(valid.shape[0], 1, 1, valid.shape[1], dtype=self.state_mean.dtype, device=valid.device)
        return m.masked_fill(~valid[:, None, None, :], torch.finfo(m.dtype).min).expand(-1, -1, valid.shape[1], -1)

    def token_positions(self, n_words: int) -> torch.Tensor:
        """Positions of a step's tokens when its instruction has `n_words` ids: the words at 0..n_words-1, the
        observation tokens at W..W+O-1 whether or not the padding is fed (so both give the same attention)."""
        w = self.cfg.instruction_tokens
        return torch.cat([self.positions[:n_words], self.positions[w:]])

    def rotary(self, h: torch.Tensor, positions: torch.Tensor):
        return self.decoder.rotary(h, positions)

    def run_layers(self, h: torch.Tensor, start: int, stop: int, mask: torch.Tensor, pe,
                   positions: torch.Tensor) -> torch.Tensor:
        """Decoder layers start..stop-1 (0-based) on h (B, q, d); pe = `rotary(h, positions)`."""
        for i in range(start, stop):
            h = self.decoder.run_layer(i, h, positions, mask, None, position_embeddings=pe)
        return h

    def pool(self, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """h (B, q, d) -> f (B, d): the final norm (the Llama's RMS norm weights, one fused call), then the max over
        the step's real tokens."""
        norm = self.llm.model.norm
        x = F.rms_norm(h, (h.shape[-1],), norm.weight, norm.variance_epsilon)
        if valid.all():  # acting: padding is never fed
            return x.amax(1)
        return x.masked_fill(~valid[..., None], torch.finfo(x.dtype).min).amax(1)

    def exit_features(self, ids: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Every exit's features at once (training, calibration): ids (B, W), state (B, 39) -> (1 + E, B, d), row 0
        the embeddings' (layer 0), row k the k-th exit's."""
        h, valid = self.embed(ids, state)
        pos = self.token_positions(ids.shape[-1])
        mask, pe = self.attention_mask(valid), self.rotary(h, pos)
        feats, done = [self.pool(h, valid)], 0
        for e in self.exit_layers:
            h = self.run_layers(h, done, e, mask, pe, pos)
            done = e
            feats.append(self.pool(h, valid))
        return torch.stack(feats)

    # ------------------------------------------------------------------ cost
    def layer_flops(self, tokens: int) -> int:
        """One decoder layer on a step of `tokens` real tokens (each query sees every key of the step)."""
        return layer_flops(self.decoder.shape, LayerWork(queries=tokens, pairs=tokens * tokens))

    def encoder_flops(self) -> int:
        return 2 * self.obs_proj.in_features * self.obs_proj.out_features

    def weight_bytes(self, backbone_only: bool = False) -> int:
        """Bytes of the weights this build holds (parameters and buffers): all, or the decoder's alone."""
        mod = self.llm if backbone_only else self
        return sum(t.numel() * t.element_size() for t in [*mod.parameters(), *mod.buffers()])


# ---------------------------------------------------------------------- checkpoints
def save_deer(net: DeerNet, out: str | Path, card: dict, scores: torch.Tensor | None = None) -> Path:
    from safetensors.torch import save_file

    if net.n_layers != net.cfg.layers:
        raise ValueError(f"save the whole model ({net.cfg.layers} layers), not a {net.n_layers}-layer build")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.state_dict().items() if k != "llm.lm_head.weight"}  # tied
    save_file(state, str(out / "model.safetensors"))
    if scores is not None:
        save_file({"scores": scores.contiguous().float()}, str(out / "scores.safetensors"))
    (out / "card.json").write_text(json.dumps({"kind": KIND, "config": asdict(net.cfg), **card}, indent=2) + "\n")
    return out


def read_card(path: str | Path) -> tuple[dict, DeerConfig]:
    p = Path(path)
    if not (p / "card.json").is_file() or not (p / "model.safetensors").is_file():
        raise DeerLoadError(f"no DeeR policy at {p}: expected card.json and model.safetensors (build one with "
                            "`thrifty train deer --data DIR --out DIR`)")
    card = json.loads((p / "card.json").read_text())
    if card.get("kind") != KIND:
        raise DeerLoadError(f"{p} holds a {card.get('kind')!r} checkpoint, not a DeeR policy ({KIND!r}); point to a "
                            "directory written by `thrifty train deer`")
    cfg = dict(card["config"])
    cfg["words"] = tuple(cfg["words"])
    try:
        return card, DeerConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise DeerLoadError(f"{p}/card.json describes no valid DeeR model: {e}") from e


def load_deer(path: str | Path, max_layer: int | None = None) -> tuple[DeerNet, dict]:
    """Load a DeeR policy, building only the decoder layers up to `max_layer` (an exit layer; None = all): the
    deeper layers' tensors are never read from the file."""
    from safetensors import safe_open

    p = Path(path)
    card, cfg = read_card(p)
    ExitBudget(max_layer=max_layer).allowed_exits(cfg.exit_layers)  # a max layer that is not an exit fails here
    n = cfg.layers if max_layer is None else max_layer
    net = DeerNet(cfg, n_layers=n)
    deeper = re.compile(r"^llm\.model\.layers\.(\d+)\.")
    weights = {}
    with safe_open(str(p / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            m = deeper.match(k)
            if m is None or int(m.group(1)) < n:
                weights[k] = f.get_tensor(k)
    expected = set(net.state_dict()) - {"llm.lm_head.weight"}
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise DeerLoadError(f"{p}/model.safetensors does not fit the model its card describes (missing "
                            f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): a checkpoint of another "
                            "model; retrain with `thrifty train deer`")
    try:
        net.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise DeerLoadError(f"{p}/model.safetensors does not fit the model its card describes: {e}") from e
    net.llm.tie_weights()
    return net.eval().requires_grad_(False), card


def load_scores(path: str | Path) -> torch.Tensor | None:
    from safetensors.torch import load_file

    f = Path(path) / "scores.safetensors"
    return load_file(str(f))["scores"] if f.is_file() else None


def _thresholds_file(path: str | Path, exit_layers: tuple[int, ...]) -> list[float]:
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read thresholds from {p} ({e}); write them with `thrifty tune deer --out {p}`") \
            from e
    if list(raw.get("exit_layers", exit_layers)) != list(exit_layers):
        raise ValueError(f"{p} holds thresholds for exits at layers {raw.get('exit_layers')}, but this model's allowed "
                         f"exits are at {list(exit_layers)}: tune them at the same max_layer")
    return [float(t) for t in raw["thresholds"]]


# ---------------------------------------------------------------------- acting
EXIT_MODES = ("consistency", "random", "full")


@dataclass
class _Episode:
    backbone_flops: int = 0
    head_flops: int = 0
    backbone_flops_max: int = 0
    exits: list[int] = field(default_factory=list)


class DeerPolicy:
    """The policy protocol over a `DeerNet`.

    mode "consistency": DeeR's dynamic exit under `thresholds` (one per allowed exit; the last is ignored, the last
      allowed exit always fires); "random": an exit drawn per step from `probs` (the random-exit baseline);
      "full": always the last allowed exit (no head run before it).
    Per step: `CostRecord.flops` = backbone + head FLOPs (analytic), `exit_layer` = decoder layers run;
    `episode_report()` gives the episode's backbone and head FLOPs apart, the analytic peak and the loaded bytes.
    """

    def __init__(self, net: DeerNet, card: dict | None = None, mode: str = "full",
                 thresholds: list[float] | None = None, probs: list[float] | None = None, seed: int = 0,
                 name: str | None = None, budget: dict | None = None) -> None:
        if mode not in EXIT_MODES:
            raise ValueError(f"unknown exit mode {mode!r}; choose one of {', '.join(EXIT_MODES)}")
        self.net, self.card, self.mode = net.eval(), card or {}, mode
        k = len(net.exit_layers)
        if mode == "consistency":
            if thresholds is None or len(thresholds) != k:
                raise ValueError(f"consistency exits need one threshold per allowed exit: {k} for exits at layers "
                                 f"{list(net.exit_layers)}, got {None if thresholds is None else len(thresholds)}")
        if mode == "random":
            if probs is None or len(probs) != k or min(probs) < 0 or not np.isclose(sum(probs), 1.0):
                raise ValueError(f"random exits need {k} probabilities (>= 0, summing to 1) for exits at layers "
                                 f"{list(net.exit_layers)}, got {probs}")
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]
        self.probs = None if probs is None else [float(p) for p in probs]
        self.seed, self.budget = seed, budget or {}
        self.name = name or f"deer-{mode}"
        self._rng = None
        self._layer_flops = None
        self._head_arm_flops = net.head.flops_per_step(gripper=False)  # per peek: LSTM cell + arm MLP
        self._gripper_flops = net.head.gripper_flops()  # once per step, at the exit taken
        self._ids = None

    @classmethod
    def load(cls, path: str | Path, exit_ratio: float | None = None, max_layer: int | None = None,
             mode: str | None = None, thresholds: list[float] | None = None, seed: int = 0,
             name: str | None = None, mean_layers: float | None = None) -> "DeerPolicy":
        """A DeeR policy under a budget: `exit_ratio` solves thresholds on the checkpoint's demonstration scores
        (mode consistency, or random exits drawn from the same target distribution with mode="random");
        `max_layer` builds and loads only that many layers; neither: the full-depth model. `mean_layers` (random
        mode only) draws exits from the geometric target of that mean depth (to match a depth DeeR realised)."""
        from thrifty.techniques.early_exit import ratio_for_mean_layers

        net, card = load_deer(path, max_layer=max_layer)
        if isinstance(thresholds, (str, Path)):  # a file `thrifty tune deer` wrote
            thresholds = _thresholds_file(thresholds, net.exit_layers)
        if mean_layers is not None:
            if mode != "random" or exit_ratio is not None:
                raise ValueError("mean_layers sets the random-exit baseline's depth: use it with mode='random' and "
                                 "without an exit_ratio")
            exit_ratio = ratio_for_mean_layers(mean_layers, net.exit_layers)
        mode = mode or ("consistency" if exit_ratio is not None or thresholds is not None else "full")
        budget, probs = {"exit_ratio": exit_ratio, "max_layer": max_layer}, None
        if exit_ratio is not None and thresholds is None:
            scores = load_scores(path)
            if scores is None:
                raise DeerLoadError(f"{path} has no scores.safetensors to solve thresholds on; pass thresholds or "
                                    "retrain with `thrifty train deer`")
            solved = ExitBudget(exit_ratio=exit_ratio, max_layer=max_layer).resolve(scores.numpy(),
                                                                                    net.cfg.exit_layers)
            thresholds, probs = solved["thresholds"], solved["target"]
            budget.update(solved)
        elif exit_ratio is not None:
            probs = target_distribution(exit_ratio, len(net.exit_layers))
        return cls(net, card, mode=mode, thresholds=thresholds if mode == "consistency" else None,
                   probs=probs if mode == "random" else None, seed=seed, name=name, budget=budget)

    # ------------------------------------------------------------------ protocol
    def reset(self, task: str, instruction: str) -> None:
        trained = self.card.get("data", {}).get("tasks")
        if trained and task not in trained:
            raise ValueError(f"this DeeR policy was trained on {trained}, not on {task!r}")
        self._ids = self.net.word_ids(instruction, pad=False)  # the real words only (padding changes nothing)
        self._tokens = len(self._ids) + self.net.cfg.obs_tokens
        self._layer_flops = self.net.layer_flops(self._tokens)
        self.state = None  # the head's committed LSTM state
        self._episode = _Episode()
        self._pe = None
        self._rng = None  # random exits: seeded from the episode's first state, so an episode replays alike

    def episode_report(self) -> dict[str, Any]:
        """What the episode cost, apart: backbone (decoder layers run) and head FLOPs, exits, peak, loaded bytes."""
        e, steps = self._episode, max(1, len(self._episode.exits))
        counts = np.bincount([self.net.exit_layers.index(x) for x in e.exits], minlength=len(self.net.exit_layers))
        return {"backbone_flops_total": e.backbone_flops, "head_flops_total": e.head_flops,
                "backbone_flops_per_step": e.backbone_flops / steps, "head_flops_per_step": e.head_flops / steps,
                "backbone_flops_max_step": e.backbone_flops_max,
                "flops_max_step": self._layer_flops * self.net.exit_layers[-1],
                "loaded_weight_bytes": self.net.weight_bytes(),
                "loaded_backbone_bytes": self.net.weight_bytes(backbone_only=True),
                "layers_built": self.net.n_layers, "exit_counts": counts.tolist(),
                "exit_layers": list(self.net.exit_layers)}

    @torch.inference_mode()
    def act(self, observation: dict[str, Any]) -> "PolicyStep":
        from thrifty.agents.policy import PolicyStep

        if self._ids is None:
            raise RuntimeError("DeerPolicy.act before reset(task, instruction)")
        with Stopwatch() as sw:
            state = torch.as_tensor(np.asarray(observation["state"], np.float32)).view(1, -1)
            out, arm, layers, peeks = self._forward(state)
            self.state = out.state  # commit: only the taken exit's state is kept
            logit = out.gripper_logit if out.gripper_logit is not None else self.net.head.gripper_of(out.y)
            action = np.empty(len(arm) + 1, np.float32)
            action[:-1] = arm
            action[-1] = 1.0 if logit.item() > 0 else -1.0
        backbone = layers * self._layer_flops
        head = peeks * self._head_arm_flops + self._gripper_flops + self.net.encoder_flops()
        e = self._episode
        e.backbone_flops += backbone
        e.head_flops += head
        e.backbone_flops_max = max(e.backbone_flops_max, backbone)
        e.exits.append(layers)
        return PolicyStep(action, CostRecord(flops=backbone + head, wall_s=sw.seconds, exit_layer=layers,
                                             tokens_in=self._tokens, tokens_context=self._tokens,
                                             tokens_per_layer=[self._tokens] * layers))

    def _forward(self, state: torch.Tensor) -> tuple[HeadOutput, np.ndarray, int, int]:
        """One step: (the taken exit's head output, its arm action (A,), decoder layers run, head peeks run)."""
        net, exits = self.net, self.net.exit_layers
        if self._pe is None:  # fixed for the episode: word embeddings, positions, rotary tables, the mask
            h, valid = net.embed(self._ids[None], state)
            self._words, self._valid = h[:, : len(self._ids)], valid
            self._pos = net.token_positions(len(self._ids))
            self._pe, self._mask = net.rotary(h, self._pos), net.attention_mask(valid)
        else:
            obs = net.obs_proj((state - net.state_mean) / net.state_std).view(1, net.cfg.obs_tokens, -1)
            h = torch.cat([self._words, obs], 1)  # = net.embed(ids, state): the words' part never changes
        mask, pos, valid = self._mask, self._pos, self._valid
        if self.mode == "random" and self._rng is None:
            first = np.frombuffer(state.numpy().tobytes(), np.uint32)
            self._rng = np.random.default_rng([self.seed, *first.tolist()])
        if self.mode != "consistency" or len(exits) == 1:  # one allowed exit: it always fires, nothing to compare
            stop = exits[-1] if self.mode != "random" else exits[int(self._rng.choice(len(exits), p=self.probs))]
            h = net.run_layers(h, 0, stop, mask, self._pe, pos)
            out = net.head.peek(net.pool(h, valid), self.state)
            return out, out.arm[0].numpy(), stop, 1
        # the first exit and its reference (the head on layer 0) in one batch of 2 from the same committed state
        h0, h = h, net.run_layers(h, 0, exits[0], mask, self._pe, pos)
        pair = net.head.peek(net.pool(torch.cat([h0, h]), valid), self.state, gripper=False)
        arms = pair.arm.numpy()  # (2, A): layer 0, first exit
        prev, arm = arms[0], arms[1]
        if consistency_score(arm, prev) <= self.thresholds[0]:
            return HeadOutput(pair.arm[1:], None, (pair.state[0][1:], pair.state[1][1:]), pair.y[1:]), arm, exits[0], 2
        done, peeks, prev = exits[0], 2, arm
        for k in range(1, len(exits)):
            e = exits[k]
            h = net.run_layers(h, done, e, mask, self._pe, pos)
            done = e
            out = net.head.peek(net.pool(h, valid), self.state, gripper=False)
            arm = out.arm[0].numpy()
            peeks += 1
            if k == len(exits) - 1 or consistency_score(arm, prev) <= self.thresholds[k]:
                return out, arm, e, peeks
            prev = arm
        raise AssertionError("unreachable: the last allowed exit always fires")
