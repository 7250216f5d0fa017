"""Learned token pruning of the planner context at prefill (E-RECAP / SDTP): a small scorer per prune layer.

After each prune layer l, a scorer reads the hidden states of the tokens still present and the best-scored
prunable tokens stay; the rest leave the hidden states and the KV cache of every deeper layer (see
`pruning_common` for the protected set, the schedules and the count matching shared with the baselines).
Tokens keep their original positions, and decoding continues from the per-layer cache the prefill left.

The scorer (`TokenScorer`) is E-RECAP's: per prune layer, hidden [.., d] -> Linear(d, d/4) -> GELU ->
Linear(d/4, 1), here after a parameter-free RMS normalisation (the residual stream's scale grows with depth).
It is trained by `thrifty.train.pruner` and stored as safetensors whose header says which model it was trained
for; `TokenScorer.load(...).check(backbone)` refuses another hidden size or layer count.

Example (no pruner is needed at the no-op setting):
    >>> from thrifty.techniques import build
    >>> t = build("token_pruning", keep_ratio=0.6, layers=(1, 2, 3))
    >>> t.keep_ratio, t.layers, t.pruner is None
    (0.6, (1, 2, 3), True)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thrifty.techniques.base import DecisionContext, register, warn_once
from thrifty.techniques.pruning_common import PruningTechnique, check_prune_layers

SHIPPED_PRUNER = Path(__file__).resolve().parent.parent / "assets" / "pruner" / "model.safetensors"
"""The pruner trained for the shipped planner (`thrifty train pruner` rebuilds it)."""

FORMAT = "thrifty-token-scorer/1"


class PrunerMismatchError(ValueError):
    """A pruner checkpoint that cannot serve this backbone (other hidden size or depth, missing layers)."""


class PrunerFingerprintWarning(UserWarning):
    """A pruner of the right shape that was trained for other weights."""


def model_fingerprint(backbone) -> str:
    """A short id of a backbone's weights: shape facts and up to 1024 evenly spaced embedding rows.

    Rows are rounded to bfloat16 first, so loading the same checkpoint in float32 or bfloat16 gives the same id.
    """
    s = backbone.shape
    w = backbone.model.model.embed_tokens.weight.detach()
    rows = torch.linspace(0, w.shape[0] - 1, min(1024, w.shape[0])).long()
    h = hashlib.sha256(json.dumps([s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.d_ff, s.vocab_size]).encode())
    h.update(w[rows].to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class TokenScorer(nn.Module):
    """One scorer per prune layer: `scorer(layer, hidden [..., d]) -> logits [...]` (higher = keep).

    `meta` records what the checkpoint is for: model, model_fingerprint, hidden_size, n_layers, layers and
    the training recipe; `save`/`load` keep it in the safetensors header.

    `probe` (layer -> hidden [d]) holds the model's own hidden state of the token `meta["probe_token"]` at
    position 0 after each prune layer. Position 0 attends only to itself, so any context that starts with that
    token (every planner context starts with <bos>) shows the same vector at its first row if, and only if, the
    weights are the ones the pruner was trained for: a weights check that needs no access to the backbone.
    """

    def __init__(self, hidden_size: int, layers: tuple[int, ...], meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.layers = tuple(sorted(int(x) for x in layers))
        self.meta = dict(meta or {})
        inner = max(1, self.hidden_size // 4)
        self.scorers = nn.ModuleDict({
            str(l): nn.Sequential(nn.Linear(self.hidden_size, inner), nn.GELU(), nn.Linear(inner, 1))
            for l in self.layers
        })
        self.probe: dict[int, torch.Tensor] = {}

    def record_probe(self, backbone, token_id: int) -> None:
        """Store the backbone's hidden state of `token_id` at position 0 after each prune layer."""
        from thrifty.runtime import Session

        seen: dict[int, torch.Tensor] = {}

        def grab(layer: int, h: torch.Tensor, positions: torch.Tensor) -> None:
            if layer in self.layers:
                seen[layer] = h[0, 0].detach().float().cpu().clone()

        with torch.no_grad():
            Session(backbone).extend([int(token_id)], layer_hook=grab)
        self.probe = seen
        self.meta["probe_token"] = int(token_id)

    def probe_matches(self, layer: int, hidden_row: torch.Tensor) -> bool | None:
        """Whether hidden [d] (position 0, the probe token, after `layer`) is the stored one; None: no probe."""
        ref = self.probe.get(layer)
        if ref is None:
            return None
        x = hidden_row.detach().float().cpu()
        cos = float(torch.nn.functional.cosine_similarity(x, ref, dim=0))
        return cos > 0.999 and abs(float(x.norm() / ref.norm().clamp(min=1e-12)) - 1.0) < 0.01

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] at the output of decoder layer `layer` -> keep logits [...]."""
        x = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.scorers[str(layer)](x).squeeze(-1)

    def flops_per_token(self) -> int:
        """Analytic FLOPs of scoring one token at one layer (the two linear maps)."""
        inner = max(1, self.hidden_size // 4)
        return 2 * self.hidden_size * inner + 2 * inner

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta, format=FORMAT, hidden_size=self.hidden_size, layers=list(self.layers))
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        tensors.update({f"probe.{l}": v.contiguous() for l, v in self.probe.items()})
        save_file(tensors, str(path), metadata={"thrifty": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TokenScorer":
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / "model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"no pruner checkpoint at {path} (build one with `thrifty train pruner`)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("thrifty", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise PrunerMismatchError(f"{path} is not a readable safetensors pruner: {e}") from e
        if meta.get("format") != FORMAT:
            raise PrunerMismatchError(f"{path} is not a thrifty pruner checkpoint (format {meta.get('format')!r}, "
                                      f"expected {FORMAT!r})")
        scorer = cls(meta["hidden_size"], tuple(meta["layers"]), meta)
        scorer.probe = {int(k.split(".")[1]): tensors.pop(k) for k in list(tensors) if k.startswith("probe.")}
        scorer.load_state_dict(tensors)
        scorer.requires_grad_(False)
        return scorer.eval()

    def check(self, backbone, source: str = "pruner") -> "TokenScorer":
        """Raise `PrunerMismatchError` unless this scorer fits `backbone`; warn if it was trained for other
        weights of the same shape."""
        s = backbone.shape
        want_layers = self.meta.get("n_layers")
        if self.hidden_size != s.d_model or (want_layers is not None and int(want_layers) != s.n_layers):
            raise PrunerMismatchError(
                f"{source} was trained for {self.meta.get('model', 'another model')} (hidden size "
                f"{self.hidden_size}, {want_layers} layers), but this backbone has hidden size {s.d_model} and "
                f"{s.n_layers} layers: {_TRAIN_HINT}")
        fp = self.meta.get("model_fingerprint")
        if fp is not None and fp != model_fingerprint(backbone):
            mine = model_fingerprint(backbone)
            warn_once(("token_pruning", "fingerprint", source, fp, mine),
                      f"{source} was trained for {self.meta.get('model', '?')} (weights {fp}); this backbone's "
                      f"weights differ ({mine}): its scores may mean little here", PrunerFingerprintWarning)
        return self


@register("token_pruning")
@dataclass
class TokenPruning(PruningTechnique):
    """Learned layer-wise token pruning (E-RECAP): keeps the protected tokens and the best-scored prunable ones.

    `layers=None` uses the pruner's own layers. With `pruner=None` the shipped pruner is used if it fits the
    backbone (checked by weights fingerprint after `bind(backbone)`, by hidden size and depth otherwise); for
    another model pass `pruner=PATH` (see `thrifty train pruner`). No pruner is needed at keep_ratio=1.0 without `max_kept`.
    """

    pruner: str | None = None
    """pruner checkpoint (a .safetensors file or a directory holding model.safetensors); None: the shipped one"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pruner is not None:
            self.pruner = str(self.pruner)
        self._scorer: TokenScorer | None = None
        self._given = False  # the scorer came from use_scorer()
        self._bound: int | None = None  # id() of the backbone the scorer was fully checked against
        self._probed = False  # the weights probe was checked (unbound use)

    def use_scorer(self, scorer: TokenScorer) -> "TokenPruning":
        """Use an in-memory scorer (tests, training evaluation) instead of loading `pruner`."""
        self._scorer, self._given, self._bound, self._probed = scorer.eval(), True, None, False
        return self

    @property
    def scorer(self) -> TokenScorer | None:
        return self._scorer

    def _source(self) -> str:
        return "the given scorer" if self._given else (f"pruner {self.pruner}" if self.pruner else "the shipped pruner")

    def _load(self) -> TokenScorer:
        if self._scorer is None:
            path = self.pruner if self.pruner is not None else SHIPPED_PRUNER
            if self.pruner is None and not SHIPPED_PRUNER.is_file():
                raise PrunerMismatchError(f"token_pruning needs a pruner and none is shipped at {SHIPPED_PRUNER}: "
                                          f"{_TRAIN_HINT}")
            self._scorer = TokenScorer.load(path)
        return self._scorer

    def bind(self, backbone) -> "TokenPruning":
        """Load and fully check the scorer for `backbone` (shape, layers, and for the shipped pruner the weights
        fingerprint), then move it to the backbone's device and dtype. Without it, the first prefill checks the
        shape only."""
        if self.is_noop or self._bound == id(backbone):
            return self
        scorer = self._load()
        if self.pruner is None and not self._given:
            fp = model_fingerprint(backbone)
            if scorer.meta.get("model_fingerprint") != fp:
                self._scorer = None
                raise PrunerMismatchError(
                    f"the shipped pruner was trained for {scorer.meta.get('model')} (weights "
                    f"{scorer.meta.get('model_fingerprint')}), not for this backbone (weights {fp}): {_TRAIN_HINT}")
        scorer.check(backbone, self._source())
        self._check_layers(scorer, backbone.n_layers)
        self._scorer = scorer.to(device=backbone.device, dtype=backbone.dtype)
        self._bound = id(backbone)
        return self

    def _check_layers(self, scorer: TokenScorer, n_layers: int) -> tuple[int, ...]:
        want = scorer.meta.get("n_layers")
        if want is not None and int(want) != n_layers:
            raise PrunerMismatchError(f"{self._source()} was trained for a {want}-layer model "
                                      f"({scorer.meta.get('model', '?')}), this one has {n_layers} layers: "
                                      f"{_TRAIN_HINT}")
        layers = check_prune_layers(self.layers if self.layers is not None else scorer.layers, n_layers)
        missing = [l for l in layers if l not in scorer.layers]
        if missing:
            raise PrunerMismatchError(f"prune layers {missing} have no scorer in {self._source()}, which scores "
                                      f"layers {list(scorer.layers)}")
        return layers

    def prepare(self, n_layers: int) -> tuple[int, ...]:
        if self.is_noop:
            return super().prepare(n_layers)
        return self._check_layers(self._load(), n_layers)

    def preference(self, ctx: DecisionContext, layer: int, hidden: torch.Tensor, positions: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
        scorer = self._scorer
        if self._bound is None:  # not bound: check the shape here, once
            if hidden.shape[-1] != scorer.hidden_size:
                raise PrunerMismatchError(
                    f"{self._source()} was trained for {scorer.meta.get('model', 'another model')} (hidden size "
                    f"{scorer.hidden_size}), but this backbone has hidden size {hidden.shape[-1]}: {_TRAIN_HINT}")
            if next(scorer.parameters()).dtype != hidden.dtype:
                self._scorer = scorer = scorer.to(dtype=hidden.dtype, device=hidden.device)
            first = int(positions[0]) == 0 and int(ctx.token_ids[0]) == scorer.meta.get("probe_token")
            if not self._probed and first:
                if scorer.probe_matches(layer, hidden[0, 0]) is False:
                    msg = (f"{self._source()} was trained for other weights ({scorer.meta.get('model', '?')}, "
                           f"{scorer.meta.get('model_fingerprint', '?')}): the hidden state of its probe token "
                           f"differs on this backbone at layer {layer}")
                    if self.pruner is None and not self._given:
                        raise PrunerMismatchError(f"{msg}: {_TRAIN_HINT}")
                    warn_once(("token_pruning", "probe", self._source()),
                              f"{msg}; its scores may mean little here", PrunerFingerprintWarning)
                self._probed = True
        scores = scorer(layer, hidden[0, rows.to(hidden.device)]).float().cpu()  # [p]
        return rows[torch.sort(scores, descending=True, stable=True).indices]

    def kept_cache_conflict(self) -> str | None:
        return None  # over a kept session the budget applies to the new tokens; cached entries stay as they are


_TRAIN_HINT = ("train a pruner for this model (`thrifty train saliency --model DIR`, then `thrifty train pruner "
               "--model DIR`) and pass pruner=PATH")
