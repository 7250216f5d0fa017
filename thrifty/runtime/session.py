"""One conversation's state over an `HFDecoder`: a per-layer KV cache indexed by original token positions.

Every cached key remembers the position it was computed at (`positions[l]`), so layers may hold different
subsets of the sequence (token pruning, eviction) and masks stay exact: a query at position p attends to
every cached key of its layer with position <= p (inside the layer's sliding window, if any).

Tensors are never modified in place: appending concatenates into new tensors and truncation indexes into
new tensors, so `fork()` can share storage safely between sessions.

Shapes: keys/values of layer l are [1, kv_heads, T_l, head_dim]; positions[l] is LongTensor [T_l].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from thrifty.backbones.hf import HFDecoder
from thrifty.cost.flops import LayerWork

LayerHook = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass
class ExtendResult:
    """logits [n, vocab] (n = 1 for "last", kept final rows for "all"); works: one LayerWork per layer run;
    positions_kept: LongTensor [n_final] original positions of the new tokens that reached the last layer."""

    logits: torch.Tensor
    works: list[LayerWork]
    positions_kept: torch.Tensor

    @property
    def n_logits(self) -> int:
        return int(self.logits.shape[0])


@dataclass
class DecodeResult:
    """token_ids: the greedy tokens emitted; works[i]: per-layer work of feeding token_ids[i] back."""

    token_ids: list[int] = field(default_factory=list)
    works: list[list[LayerWork]] = field(default_factory=list)


def _visible_pairs(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> int:
    """Visible (query, key) pairs, counted without building a mask: key <= query (and query - key < window)."""
    keys = torch.sort(key_pos).values
    pairs = torch.searchsorted(keys, query_pos, right=True).sum()
    if window is not None:
        pairs = pairs - torch.searchsorted(keys, query_pos - window, right=True).sum()
    return int(pairs)


class _LayerCache:
    """The object handed to attention modules as `past_key_values`: `update` appends (out of place)."""

    def __init__(self, keys: list, values: list) -> None:
        self.keys, self.values = keys, values

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """k, v [1, kv_heads, q, hd] -> all keys/values of the layer [1, kv_heads, T + q, hd]."""
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=-2)
            v = torch.cat([self.values[layer_idx], v], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


class Session:
    """Conversation state: per-layer KV cache + original positions, token ids, named spans.

    Attributes: `positions[l]` LongTensor [T_l]; `next_position` int; `token_ids` list[int] (everything
    appended, in order); `spans` dict name -> (start, end) of original positions, end exclusive.
    """

    def __init__(self, backbone: HFDecoder) -> None:
        self.backbone = backbone
        n = backbone.n_layers
        self._keys: list[torch.Tensor | None] = [None] * n
        self._values: list[torch.Tensor | None] = [None] * n
        empty = torch.empty(0, dtype=torch.long, device=backbone.device)
        self.positions: list[torch.Tensor] = [empty] * n
        self.next_position = 0
        self.token_ids: list[int] = []
        self.spans: dict[str, tuple[int, int]] = {}
        self._last_logits: torch.Tensor | None = None  # [vocab], logits after the final appended token

    # ------------------------------------------------------------------ running the model
    def extend(
        self,
        ids: Sequence[int] | torch.Tensor,
        *,
        span: str | None = None,
        logits: Literal["last", "all"] = "last",
        layer_hook: LayerHook | None = None,
    ) -> ExtendResult:
        """Append tokens ids [q] (or [1, q]) at positions next_position..next_position+q-1.

        `layer_hook(l, hidden [1, q_l, d], positions [q_l])` runs after layer l; returning sorted row indices
        keeps only those rows for deeper layers (layer l's cache keeps all q_l). `span` names the new
        positions [start, end) in `spans` (replacing an earlier span of that name). The session is only
        changed if the call succeeds.
        """
        if logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        bb = self.backbone
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=bb.device).reshape(-1)
        q = int(ids_t.numel())
        if q == 0:
            raise ValueError("extend() needs at least one token")
        start = self.next_position
        pos = torch.arange(start, start + q, dtype=torch.long, device=bb.device)
        keys, values, positions = list(self._keys), list(self._values), list(self.positions)
        cache = _LayerCache(keys, values)
        works: list[LayerWork] = []
        sdpa = getattr(bb.config, "_attn_implementation", None) == "sdpa"
        with torch.no_grad():
            h = bb.embed(ids_t[None])
            pe = bb.rotary(h, pos)
            for l in range(bb.n_layers):
                if pos.numel() == 0:
                    break
                key_pos = torch.cat([positions[l], pos])
                window = bb.sliding_window(l)
                # a fresh layer under sdpa needs no mask: its keys are exactly the queries, in order, so sdpa's
                # is_causal is exact (original positions reach attention through the rotary tables only);
                # building a [q, k] mask costs as much as the attention itself at 4k tokens.
                plain = positions[l].numel() == 0 and window is None and sdpa
                mask = None if plain else bb.attention_mask(pos, key_pos, l)
                works.append(LayerWork(queries=int(pos.numel()), pairs=_visible_pairs(pos, key_pos, window)))
                h = bb.run_layer(l, h, pos, mask, cache, position_embeddings=pe)
                positions[l] = key_pos
                if layer_hook is None:
                    continue
                keep = layer_hook(l, h, pos)
                if keep is None:
                    continue
                keep = self._check_rows(keep, pos.numel(), l)
                if logits == "last" and (keep.numel() == 0 or int(keep[-1]) != pos.numel() - 1):
                    raise ValueError(
                        f"layer_hook dropped the final new token at layer {l}, but logits='last' needs it"
                    )
                if keep.numel() != pos.numel():
                    h, pos = h[:, keep], pos[keep]
                    pe = bb.rotary(h, pos)
            if logits == "last":
                out = bb.logits(h[0, -1:])
            else:
                out = bb.logits(h[0])
        # commit
        self._keys, self._values, self.positions = keys, values, positions
        self.next_position = start + q
        self.token_ids.extend(int(t) for t in ids_t.tolist())
        if span is not None:
            self.spans[span] = (start, start + q)
        reached_end = pos.numel() > 0 and int(pos[-1]) == start + q - 1
        self._last_logits = out[-1] if reached_end else None
        return ExtendResult(logits=out, works=works, positions_kept=pos)

    @staticmethod
    def _check_rows(keep, q: int, layer: int) -> torch.Tensor:
        keep = torch.as_tensor(keep, dtype=torch.long).reshape(-1)
        if keep.numel() and (int(keep[0]) < 0 or int(keep[-1]) >= q or bool((keep[1:] <= keep[:-1]).any())):
            raise ValueError(f"layer_hook at layer {layer} must return sorted unique row indices in [0, {q})")
        return keep

    def decode(self, max_new_tokens: int, stop_ids: Sequence[int] = (),
               choose: Callable[[torch.Tensor, list[int]], int] | None = None) -> DecodeResult:
        """Greedy decoding from the last extend's final logits. Each emitted token is fed back through
        `extend` (so the session contains it); stops after a stop id or `max_new_tokens` tokens.

        choose(logits [vocab], emitted ids) -> id replaces argmax (constrained decoding,
        `thrifty.runtime.constrained.TextSetConstraint.choose`)."""
        if self._last_logits is None:
            raise RuntimeError(
                "decode() needs the logits of the final appended token: call extend() first "
                "(after rollback(), or if a layer_hook dropped the final token, extend again)"
            )
        stop = {int(s) for s in stop_ids}
        res = DecodeResult()
        for _ in range(max_new_tokens):
            tok = int(self._last_logits.argmax()) if choose is None else int(choose(self._last_logits, res.token_ids))
            res.token_ids.append(tok)
            res.works.append(self.extend([tok]).works)
            if tok in stop:
                break
        return res

    # ------------------------------------------------------------------ state management
    def fork(self) -> "Session":
        """A cheap copy sharing tensors; since no tensor is ever modified in place, the two stay independent."""
        other = Session.__new__(Session)
        other.backbone = self.backbone
        other._keys, other._values = list(self._keys), list(self._values)
        other.positions = list(self.positions)
        other.next_position = self.next_position
        other.token_ids = list(self.token_ids)
        other.spans = dict(self.spans)
        other._last_logits = self._last_logits
        return other

    def rollback(self, to_position: int) -> None:
        """Forget everything at positions >= to_position (cache entries, token ids, spans are clipped).
        The next call must be `extend` (decode has no logits to start from)."""
        if not 0 <= to_position <= self.next_position:
            raise ValueError(f"rollback position {to_position} outside [0, {self.next_position}]")
        for l, p in enumerate(self.positions):
            keep = p < to_position
            if not bool(keep.all()):
                self._keep_entries(l, keep)
        self.token_ids = self.token_ids[:to_position]
        self.spans = {n: (s, min(e, to_position)) for n, (s, e) in self.spans.items() if s < to_position}
        if to_position != self.next_position:
            self._last_logits = None
        self.next_position = to_position

    def drop_positions(self, drops: dict[int, torch.Tensor]) -> int:
        """Remove from layer l its entries at the original positions drops[l] (LongTensor [n]); returns how many.

        Used to evict history from deep layers once (composed prefix reuse + pruning). New tensors, never in
        place, so forks of this session and prefixes shared through a store are unaffected."""
        removed = 0
        for l, pos in drops.items():
            p = self.positions[l]
            keep = ~torch.isin(p, pos.to(p.device))
            n = int((~keep).sum())
            if n:
                self._keep_entries(l, keep)
                removed += n
        return removed

    def _keep_entries(self, layer: int, keep: torch.Tensor) -> None:
        """Keep only the entries of `layer` selected by the bool mask keep [T_l] (out of place)."""
        self.positions[layer] = self.positions[layer][keep]
        if self._keys[layer] is not None:
            self._keys[layer] = self._keys[layer][:, :, keep]
            self._values[layer] = self._values[layer][:, :, keep]

    @classmethod
    def from_kv(cls, backbone: HFDecoder, token_ids: Sequence[int],
                layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]) -> "Session":
        """A session holding `token_ids` (positions 0..n-1) with the given per-layer (keys, values, positions);
        `extend` continues it. Positions must be sorted and < n. The tensors are used as given (never modified)."""
        s = cls(backbone)
        n = len(token_ids)
        for l, seg in enumerate(layers):
            if seg is None or seg[2].numel() == 0:
                continue
            k, v, p = seg
            if int(p[-1]) >= n:
                raise ValueError(f"layer {l} holds position {int(p[-1])} beyond the {n} given tokens")
            s._keys[l], s._values[l], s.positions[l] = k, v, p
        s.token_ids = [int(t) for t in token_ids]
        s.next_position = n
        return s

    # ------------------------------------------------------------------ inspection
    def kv_lengths(self) -> list[int]:
        """Cached entries per layer, [T_0, ..., T_{L-1}]."""
        return [int(p.numel()) for p in self.positions]

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(keys [1, kv_heads, T_l, hd], values, positions [T_l]) of one layer, or None while it is empty.
        Read only: the tensors are shared with forks and prefix stores."""
        if self._keys[layer] is None:
            return None
        return self._keys[layer], self._values[layer], self.positions[layer]

    def kv_tensors(self) -> list[torch.Tensor]:
        """[k_0, v_0, k_1, v_1, ...], each [1, kv_heads, T_l, head_dim] (for `thrifty.cost.kv_bytes`)."""
        return [t for kv in zip(self._keys, self._values) for t in kv if t is not None]

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return f"Session(tokens={len(self)}, kv={self.kv_lengths()}, spans={self.spans})"
