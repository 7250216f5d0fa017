"""The planner's shared exit head (DeeR-VLA's early exit, on an LM planner): one small head, shared by every
intermediate layer, that reads the decision token's hidden state after a layer and gives a distribution over the
planner's action words.

The head is trained by self-distillation (`thrifty train exits`, `thrifty/train/exits.py`): on the planner's own
closed-loop decisions, each layer's head output is fitted to the full model's distribution over the action words at
the last layer. The `early_exit` technique (`thrifty/techniques/early_exit.py`) runs it after each layer and stops
the pass once two consecutive exits agree.

    h_d [d_model] (decision token after d layers) -> RMS norm (own weights, from the model's final norm)
        -> n + MLP(n) (d_model -> hidden -> d_model, zero-initialised: starts as the logit lens)
        -> Linear(d_model, A) (rows initialised from lm_head's rows of the action tokens) -> logits [A]

Files (a directory): `exit_head.safetensors` (the head's weights and `scores`, the held-out decisions' consistency
scores [L - 1, N] at depths 2..L, the last row unused) and `card.json` (the model it was trained for, its actions,
recipe, command, data and per-depth agreement with the full model).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

KIND = "thrifty-planner-exit-head"
FILES = ("exit_head.safetensors", "card.json")


class ExitHeadError(ValueError):
    """An exit-head directory that cannot be used with this model."""


@dataclass(frozen=True)
class ExitHeadConfig:
    d_model: int
    n_layers: int
    actions: tuple[str, ...]
    action_token_ids: tuple[int, ...]
    hidden: int = 128
    eps: float = 1e-6


def model_fingerprint(backbone) -> dict:
    """What identifies the planner a head was trained on: its shape and a checksum of its output head's weights."""
    shape = backbone.shape
    lm_head = backbone.model.lm_head.weight
    return {"n_layers": shape.n_layers, "d_model": shape.d_model, "vocab_size": shape.vocab_size,
            "lm_head_sum": round(float(lm_head.double().sum()), 4),
            "lm_head_abs_sum": round(float(lm_head.double().abs().sum()), 4)}


def action_token_ids(tokenizer, actions) -> tuple[int, ...]:
    """Each action word's token id as the planner emits it (" word"); an action of several tokens is refused."""
    ids = []
    for a in actions:
        enc = tokenizer.encode(f" {a}", add_special_tokens=False)
        if len(enc) != 1:
            raise ExitHeadError(f"the action {a!r} is {len(enc)} tokens for this tokenizer ({enc}); the exit head "
                                "needs every action word to be one token (its first decoded token)")
        ids.append(enc[0])
    return tuple(ids)


class PlannerExitHead(nn.Module):
    """h [..., d_model] -> action logits [..., A]."""

    def __init__(self, cfg: ExitHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, a = cfg.d_model, len(cfg.actions)
        self.norm_weight = nn.Parameter(torch.ones(d))
        self.up = nn.Linear(d, cfg.hidden)
        self.down = nn.Linear(cfg.hidden, d)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        self.out = nn.Linear(d, a)

    def init_from(self, backbone) -> None:
        """Start as the logit lens: the model's final norm and its lm_head rows of the action tokens."""
        with torch.no_grad():
            norm = getattr(backbone.model.model.norm, "weight", None)
            if norm is not None and norm.shape == self.norm_weight.shape:
                self.norm_weight.copy_(norm)
            self.out.weight.copy_(backbone.model.lm_head.weight[list(self.cfg.action_token_ids)])
            self.out.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.cfg.eps) * self.norm_weight
        n = n + self.down(torch.nn.functional.gelu(self.up(n)))
        return self.out(n)

    def flops(self) -> int:
        """Analytic FLOPs of one call on one hidden state (multiply-adds x 2; norm and activation included)."""
        d, h, a = self.cfg.d_model, self.cfg.hidden, len(self.cfg.actions)
        return 2 * (d * h + h * d + d * a) + 6 * d + 8 * h


def consistency(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total-variation distance between two action distributions, (..., A) x (..., A) -> (...), in [0, 1]."""
    return 0.5 * (p - q).abs().sum(-1)


def save_exit_head(path: str | Path, head: PlannerExitHead, scores: torch.Tensor, card: dict) -> Path:
    from safetensors.torch import save_file

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    tensors["scores"] = scores.detach().float().contiguous()
    save_file(tensors, str(p / "exit_head.safetensors"))
    (p / "card.json").write_text(json.dumps({"kind": KIND, "config": asdict(head.cfg), **card}, indent=2) + "\n")
    return p


@dataclass
class LoadedExitHead:
    head: PlannerExitHead
    scores: torch.Tensor
    """[L - 1, N]: consistency score at depths 2..L of the N held-out decisions (the last row unused)"""
    card: dict


def load_exit_head(path: str | Path, backbone=None) -> LoadedExitHead:
    """Load a head directory; with `backbone`, refuse a head trained for another model (`ExitHeadError`)."""
    from safetensors.torch import load_file

    p = Path(path)
    missing = [f for f in FILES if not (p / f).is_file()]
    if missing:
        raise ExitHeadError(f"no exit head at {p} (missing {', '.join(missing)}): train one with "
                            f"`thrifty train exits --model <planner dir> --out {p}`")
    card = json.loads((p / "card.json").read_text())
    if card.get("kind") != KIND:
        raise ExitHeadError(f"{p}/card.json is a {card.get('kind')!r}, not a {KIND!r} (a planner exit head)")
    raw = dict(card["config"])
    cfg = ExitHeadConfig(**{**raw, "actions": tuple(raw["actions"]), "action_token_ids": tuple(raw["action_token_ids"])})
    if backbone is not None:
        have, want = model_fingerprint(backbone), card.get("model", {})
        if have != want:
            diff = {k: (want.get(k), have[k]) for k in have if want.get(k) != have[k]}
            raise ExitHeadError(f"the exit head at {p} was trained for another model (card vs this model: {diff}); "
                                f"train one for it with `thrifty train exits --model <its directory>`")
    head = PlannerExitHead(cfg)
    tensors = load_file(str(p / "exit_head.safetensors"))
    scores = tensors.pop("scores")
    head.load_state_dict(tensors)
    head.eval()
    head.requires_grad_(False)
    return LoadedExitHead(head, scores, card)
