"""One conversation's state over an `HFDecoder`: a per-layer KV cache indexed by original token positions.

Every cached key remembers the position it was computed at (`positions[l]`), so layers may hold different
subsets of the sequence (token pruning, eviction) and masks stay exact: a query at position p attends to
every cached key of its layer with position <= p (inside the layer's sliding window, if any).

Keys and values grow in buffers of geometric capacity (1.5x, `_KVBuffer`): a layer's cache is a view of its buffer's
first T_l slots, and appending writes the new slots in place instead of copying the whole cache per call (at a
2.5k-token context that copy was a fixed cost of every decoded token). Shared storage stays safe: a session
writes in place only at its buffer's frontier (no other session has data there) and never below the buffer's
pin, the longest prefix handed out (`fork`, `layer_kv`); anything else copies into a new buffer first. So a
tensor a fork or a prefix store holds is never modified.

Shapes: keys/values of layer l are [1, kv_heads, T_l, head_dim]; positions[l] is LongTensor [T_l].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from thrifty.backbones.hf import HFDecoder
from thrifty.cost.flops import LayerWork

LayerHook = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
ExitHook = Callable[[int, torch.Tensor], bool]
"""(layer_idx, hidden [1, q, d] after that layer) -> True to stop the pass there (early exit, DeeR-VLA)."""


@dataclass
class ExtendResult:
    """logits [n, vocab] (n = 1 for "last", kept final rows for "all"); works: one LayerWork per layer run;
    positions_kept: LongTensor [n_final] original positions of the new tokens that reached the last layer."""

    logits: torch.Tensor
    works: list[LayerWork]
    positions_kept: torch.Tensor
    draft_accepted: bool | None = None
    """`extend_with_draft` only: whether one of the drafted tokens was greedy's choice (and stayed in the session)"""
    draft_rows: int = 0
    """`extend_with_draft` only: the drafted tokens fed in the pass (each had its own logits row computed)"""
    exited_after: int | None = None
    """`exit_hook` only: the layer after which the pass stopped (the new tokens are in layers 0..exited_after
    only, `logits` is empty and `decode` cannot follow), or None when every layer ran"""
    propagated: int = 0
    """(layer, token) pairs whose keys and values were propagated from the exit (`propagate_on_exit`)"""

    @property
    def n_logits(self) -> int:
        return int(self.logits.shape[0])


@dataclass
class DecodeResult:
    """token_ids: the greedy tokens emitted; works: per-layer work of feeding each emitted token back, in order (a
    final stop id is not fed back, and a draft accepted by `extend_with_draft` was fed in the prefill's pass, so
    neither has an entry)."""

    token_ids: list[int] = field(default_factory=list)
    works: list[list[LayerWork]] = field(default_factory=list)


def _visible_pairs(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None,
                   cached: torch.Tensor | None = None) -> int:
    """Visible (query, key) pairs, counted without building a mask: key <= query (and query - key < window).
    `cached`: the keys before the queries' own (key_pos = cached + query_pos); when all of them come before the
    first query and there is no window, the count is arithmetic (q T + q (q + 1) / 2), with no sort."""
    q = int(query_pos.numel())
    if window is None and cached is not None and (cached.numel() == 0 or int(cached[-1]) < int(query_pos[0])):
        return q * int(cached.numel()) + q * (q + 1) // 2
    keys = torch.sort(key_pos).values
    pairs = torch.searchsorted(keys, query_pos, right=True).sum()
    if window is not None:
        pairs = pairs - torch.searchsorted(keys, query_pos - window, right=True).sum()
    return int(pairs)


class _KVBuffer:
    """One layer's keys (or values) [1, kv_heads, capacity, head_dim]. `filled`: slots written so far (the
    frontier); `pinned`: the longest prefix of it handed out, which no one may overwrite."""

    __slots__ = ("data", "filled", "pinned")

    def __init__(self, data: torch.Tensor, filled: int) -> None:
        self.data, self.filled, self.pinned = data, filled, 0


def _append(buf: _KVBuffer | None, current: torch.Tensor | None, new: torch.Tensor) -> tuple[_KVBuffer, torch.Tensor]:
    """current [1, H, T, hd] (a view of buf's first T slots, or any tensor when buf is None) + new [1, H, q, hd]
    -> (the buffer now holding both, its view [1, H, T + q, hd])."""
    t = 0 if current is None else current.shape[-2]
    q = new.shape[-2]
    if new.requires_grad or (current is not None and current.requires_grad):  # autograd: no in-place writes
        full = new if current is None else torch.cat([current, new], dim=-2)
        return _KVBuffer(full, full.shape[-2]), full
    owner = buf is not None and buf.filled == t and t >= buf.pinned
    if not owner or t + q > buf.data.shape[-2]:
        shape = list(new.shape)
        shape[-2] = max((3 * (t + q)) // 2, t + q + 64)  # geometric growth: O(1) copies per token
        data = new.new_empty(shape)
        if t:
            data[..., :t, :].copy_(current)
        buf = _KVBuffer(data, t)
    buf.data[..., t:t + q, :].copy_(new)
    buf.filled = t + q
    return buf, buf.data[..., :t + q, :]


class _LayerCache:
    """The object handed to attention modules as `past_key_values`: `update` appends through the session's
    buffers (see the module docstring)."""

    def __init__(self, keys: list, values: list, bufs: list) -> None:
        self.keys, self.values, self.bufs = keys, values, bufs

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        """k, v [1, kv_heads, q, hd] -> all keys/values of the layer [1, kv_heads, T + q, hd]."""
        kb, vb = self.bufs[layer_idx] or (None, None)
        kb, k = _append(kb, self.keys[layer_idx], k)
        vb, v = _append(vb, self.values[layer_idx], v)
        self.keys[layer_idx], self.values[layer_idx], self.bufs[layer_idx] = k, v, (kb, vb)
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
        self._bufs: list[tuple[_KVBuffer, _KVBuffer] | None] = [None] * n  # where _keys/_values[l] live, if owned
        empty = torch.empty(0, dtype=torch.long, device=backbone.device)
        self.positions: list[torch.Tensor] = [empty] * n
        self.next_position = 0
        self.token_ids: list[int] = []
        self.spans: dict[str, tuple[int, int]] = {}
        self._last_logits: torch.Tensor | None = None  # [vocab], logits after the final appended token
        self._drafted: list[int] = []  # an accepted draft: emitted by the next decode without a pass of its own

    # ------------------------------------------------------------------ running the model
    def extend(
        self,
        ids: Sequence[int] | torch.Tensor,
        *,
        span: str | None = None,
        logits: Literal["last", "all"] = "last",
        layer_hook: LayerHook | None = None,
        exit_hook: ExitHook | None = None,
        propagate_on_exit: bool = False,
        embed_delta: dict[int, torch.Tensor] | None = None,
        _rows: int = 1,
        _siblings: int = 1,
    ) -> ExtendResult:
        """Append tokens ids [q] (or [1, q]) at positions next_position..next_position+q-1.

        `layer_hook(l, hidden [1, q_l, d], positions [q_l])` runs after layer l; returning sorted row indices
        keeps only those rows for deeper layers (layer l's cache keeps all q_l). `span` names the new
        positions [start, end) in `spans` (replacing an earlier span of that name). The session is only
        changed if the call succeeds.

        `exit_hook(l, hidden [1, q_l, d])` runs after every layer l but the last (after `layer_hook`); returning
        True stops the pass: deeper layers never see the new tokens (their caches stay without them, as for tokens
        pruned at l), no logits are computed and `result.exited_after` is l. With `propagate_on_exit`, the deeper
        layers get keys and values computed from the exit's hidden states instead (CALM's state propagation,
        `HFDecoder.layer_kv`; `result.propagated` counts the (layer, token) pairs).

        `embed_delta` {i: vector [d]} adds a vector to the input embedding of new token i (a soft prompt, e.g. a
        latent plan): everything the session keeps for that token is computed from the shifted embedding.

        `_siblings` K > 1 (`extend_with_draft` only): the last K tokens are alternatives for one position, a tree
        of depth 1: they share the position after the others and none sees another. The session then holds all K
        at that position until `extend_with_draft` keeps one or none.
        """
        if logits not in ("last", "all"):
            raise ValueError(f"logits must be 'last' or 'all', got {logits!r}")
        bb = self.backbone
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=bb.device).reshape(-1)
        q = int(ids_t.numel())
        if q == 0:
            raise ValueError("extend() needs at least one token")
        start = self.next_position
        sib = int(_siblings)
        pos = torch.arange(start, start + q, dtype=torch.long, device=bb.device)
        if sib > 1:
            pos[q - sib:] = start + q - sib  # the alternatives, all at one position
        keys, values, positions, bufs = list(self._keys), list(self._values), list(self.positions), list(self._bufs)
        cache = _LayerCache(keys, values, bufs)
        works: list[LayerWork] = []
        impl = getattr(bb.config, "_attn_implementation", None)
        sdpa = bb.is_sdpa
        last_mask = None  # (key_pos, window, mask, pos): layers with the same queries and keys share one mask
        exited_after, propagated = None, 0
        with torch.no_grad():
            h = bb.embed(ids_t[None])
            for i, vec in (embed_delta or {}).items():
                if not 0 <= i < q:
                    raise ValueError(f"embed_delta index {i} is outside the {q} new tokens")
                h[0, i] += vec.to(h.dtype)
            pe = bb.rotary(h, pos)
            for l in range(bb.n_layers):
                if pos.numel() == 0:
                    break
                key_pos = torch.cat([positions[l], pos])
                window = bb.sliding_window(l)
                # a fresh layer under sdpa needs no mask: its keys are exactly the queries, in order, so sdpa's
                # is_causal is exact (original positions reach attention through the rotary tables only);
                # building a [q, k] mask costs as much as the attention itself at 4k tokens.
                plain = positions[l].numel() == 0 and window is None and sdpa and sib == 1
                # one query after all its keys (a decoded token) sees every key: no mask needed either (sdpa,
                # eager, and sink_kv's attention, whose None mask is causal with the queries last)
                single = pos.numel() == 1 and window is None and (sdpa or impl in ("eager", "thrifty_sink_kv"))
                if plain or single:
                    mask = None
                elif (last_mask is not None and last_mask[3] is pos and last_mask[1] == window
                      and last_mask[0].numel() == key_pos.numel() and torch.equal(last_mask[0], key_pos)):
                    mask = last_mask[2]
                else:
                    mask = bb.attention_mask(pos, key_pos, l)
                    if sib > 1:  # alternatives see themselves, not each other (the keys end with the queries)
                        block = mask[0, 0, -sib:, -sib:]
                        block.fill_(torch.finfo(mask.dtype).min)
                        block.diagonal().zero_()
                    last_mask = (key_pos, window, mask, pos)
                works.append(LayerWork(queries=int(pos.numel()),
                                       pairs=_visible_pairs(pos, key_pos, window, cached=positions[l])
                                       - sib * (sib - 1) // 2))
                h = bb.run_layer(l, h, pos, mask, cache, position_embeddings=pe)
                positions[l] = key_pos
                keep = None if layer_hook is None else layer_hook(l, h, pos)
                if keep is not None:
                    keep = self._check_rows(keep, pos.numel(), l)
                if keep is not None and logits == "last" and (keep.numel() == 0 or int(keep[-1]) != pos.numel() - 1):
                    raise ValueError(
                        f"layer_hook dropped the final new token at layer {l}, but logits='last' needs it"
                    )
                if keep is not None and keep.numel() != pos.numel():
                    h, pos = h[:, keep], pos[keep]
                    pe = bb.rotary(h, pos)
                if exit_hook is not None and l < bb.n_layers - 1 and pos.numel() and exit_hook(l, h):
                    exited_after = l
                    if propagate_on_exit:
                        for m in range(l + 1, bb.n_layers):
                            bb.layer_kv(m, h, pos, cache, position_embeddings=pe)
                            positions[m] = torch.cat([positions[m], pos])
                            propagated += int(pos.numel())
                    break
            if exited_after is not None:
                out = h.new_empty(0, bb.shape.vocab_size)
            elif logits == "last":
                out = bb.logits(h[0, -_rows:])
            else:
                out = bb.logits(h[0])
        # commit (a call that failed midway may have moved some buffers' frontier past this session's caches:
        # then the session no longer owns them and its next append copies, so nothing is lost or shared wrongly)
        self._keys, self._values, self.positions, self._bufs = keys, values, positions, bufs
        self._drafted = []
        end = start + q - sib + 1
        self.next_position = end
        self.token_ids.extend(int(t) for t in ids_t.tolist())
        if span is not None:
            self.spans[span] = (start, end)
        reached_end = exited_after is None and pos.numel() > 0 and int(pos[-1]) == end - 1
        self._last_logits = out[-1] if reached_end else None
        return ExtendResult(logits=out, works=works, positions_kept=pos, exited_after=exited_after,
                            propagated=propagated)

    @staticmethod
    def _check_rows(keep, q: int, layer: int) -> torch.Tensor:
        keep = torch.as_tensor(keep, dtype=torch.long).reshape(-1)
        if keep.numel() and (int(keep[0]) < 0 or int(keep[-1]) >= q or bool((keep[1:] <= keep[:-1]).any())):
            raise ValueError(f"layer_hook at layer {layer} must return sorted unique row indices in [0, {q})")
        return keep

    def decode(self, max_new_tokens: int, stop_ids: Sequence[int] = (),
               choose: Callable[[torch.Tensor, list[int]], int] | None = None) -> DecodeResult:
        """Greedy decoding from the last extend's final logits. Each emitted token is fed back through
        `extend` (so the session contains it), except a stop id: decoding ends there and nothing needs its
        logits, so the session ends before it (a later `extend` appends it with the next tokens, in one pass).
        Stops after a stop id or `max_new_tokens` tokens.

        choose(logits [vocab], emitted ids) -> id replaces argmax (constrained decoding,
        `thrifty.runtime.constrained.TextSetConstraint.choose`)."""
        if self._last_logits is None:
            raise RuntimeError(
                "decode() needs the logits of the final appended token: call extend() first "
                "(after rollback(), or if a layer_hook dropped the final token, extend again)"
            )
        stop = {int(s) for s in stop_ids}
        res = DecodeResult()
        drafted, self._drafted = self._drafted, []
        for _ in range(max_new_tokens):
            if drafted:  # accepted by `extend_with_draft`: already in the session, its logits computed
                res.token_ids.append(drafted.pop(0))
                continue
            tok = int(self._last_logits.argmax()) if choose is None else int(choose(self._last_logits, res.token_ids))
            res.token_ids.append(tok)
            if tok in stop:
                break
            res.works.append(self.extend([tok]).works)
        return res

    def extend_with_draft(
        self,
        ids: Sequence[int] | torch.Tensor,
        draft: int | Sequence[int],
        *,
        choose: Callable[[torch.Tensor, list[int]], int] | None = None,
        span: str | None = None,
    ) -> ExtendResult:
        """`extend(ids)` and, in the same pass, `draft`: guesses of the first token `decode` will emit (speculative
        decoding with a draft tree of depth 1, e.g. the first tokens of the planner's recent decisions). The drafted
        tokens are alternatives at the position after `ids`: each sees `ids` and itself, never another. If greedy's
        choice after `ids` (argmax, or `choose(logits, [])`) is among them, that one stays in the session and the
        next `decode` emits it without a pass of its own, starting from the logits the pass computed after it; the
        others are dropped (its keys and values move to the first alternative's slot, the frontier moves back: no
        copy of the cache). Otherwise all are dropped and `decode` runs as after `extend(ids)`. Either way `decode`
        emits exactly what it would have after `extend(ids)`: the mask keeps the drafts out of every earlier
        position and out of each other. The result's `logits` are those after `ids` ([1, vocab]); its `works`
        include the drafts' rows (`draft_rows` of them). A session with an empty layer under sdpa drafts only the
        first token: that layer's pass is mask-free (is_causal), and alternatives would need a mask over all the
        new tokens, as costly as the attention itself at thousands of tokens. No layer hook: a hook may drop the
        rows whose logits are needed."""
        ids_t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        drafts = list(dict.fromkeys(int(d) for d in ([draft] if isinstance(draft, int) else draft)))
        if ids_t.numel() == 0 or not drafts:
            raise ValueError("extend_with_draft needs at least one new token and one drafted token")
        if self.backbone.is_sdpa and any(p.numel() == 0 for p in self.positions):
            drafts = drafts[:1]  # a fresh layer runs mask-free (is_causal); alternatives would need a [q, q] mask
        end = self.next_position + int(ids_t.numel())
        k = len(drafts)
        res = self.extend(torch.cat([ids_t, torch.tensor(drafts)]), span=None, _rows=k + 1, _siblings=k)
        after_ids = res.logits[0]
        first = int(after_ids.argmax()) if choose is None else int(choose(after_ids, []))
        accepted = first in drafts
        if accepted:
            j = drafts.index(first)
            self._keep_alternative(k, j)
            self.token_ids = self.token_ids[:end] + [first]
        else:
            self.rollback(end)
        self._last_logits = res.logits[1 + j] if accepted else after_ids
        self._drafted = [first] if accepted else []
        if span is not None:
            self.spans[span] = (end - int(ids_t.numel()), end)
        return ExtendResult(logits=after_ids[None], works=res.works, positions_kept=res.positions_kept[:-k],
                            draft_accepted=accepted, draft_rows=k)

    def _keep_alternative(self, k: int, j: int) -> None:
        """The last k entries of every layer are alternatives at one position: keep the j-th in the first one's
        slot (in place where this session owns the buffer's frontier, else in new tensors) and drop the rest."""
        for l in range(len(self.positions)):
            t = int(self.positions[l].numel())
            if j:
                b = self._bufs[l]
                owned = b is not None and all(buf.filled == t and t - k >= buf.pinned for buf in b)
                for kv in (self._keys, self._values):
                    if owned:
                        kv[l][:, :, t - k].copy_(kv[l][:, :, t - k + j])
                    else:
                        kv[l] = torch.cat([kv[l][:, :, :t - k], kv[l][:, :, t - k + j:t - k + j + 1]], dim=2)
                if not owned:
                    self._bufs[l] = None
                    self.positions[l] = self.positions[l][:t - k + 1]
                    continue
            self._keep_prefix(l, t - k + 1)

    # ------------------------------------------------------------------ state management
    def fork(self) -> "Session":
        """A cheap copy sharing tensors; the shared prefix is pinned, so neither session overwrites it and the two
        stay independent."""
        other = Session.__new__(Session)
        other.backbone = self.backbone
        self._pin_all()
        other._keys, other._values = list(self._keys), list(self._values)
        other._bufs = list(self._bufs)
        other.positions = list(self.positions)
        other.next_position = self.next_position
        other.token_ids = list(self.token_ids)
        other.spans = dict(self.spans)
        other._last_logits = self._last_logits
        other._drafted = list(self._drafted)
        return other

    def _pin_all(self) -> None:
        for l in range(len(self._bufs)):
            self._pin(l)

    def _pin(self, layer: int) -> None:
        """Mark layer's cached slots as handed out: no session writes over them again."""
        b = self._bufs[layer]
        if b is not None:
            n = int(self.positions[layer].numel())
            for buf in b:
                buf.pinned = max(buf.pinned, n)

    def rollback(self, to_position: int) -> None:
        """Forget everything at positions >= to_position (cache entries, token ids, spans are clipped).
        The next call must be `extend` (decode has no logits to start from)."""
        if not 0 <= to_position <= self.next_position:
            raise ValueError(f"rollback position {to_position} outside [0, {self.next_position}]")
        for l, p in enumerate(self.positions):
            keep = p < to_position
            if not bool(keep.all()):
                self._keep_prefix(l, int(keep.sum()))  # positions are sorted: what is kept is a prefix
        self.token_ids = self.token_ids[:to_position]
        self.spans = {n: (s, min(e, to_position)) for n, (s, e) in self.spans.items() if s < to_position}
        if to_position != self.next_position:
            self._last_logits = None
            self._drafted = []
        self.next_position = to_position

    def _keep_prefix(self, layer: int, m: int) -> None:
        """Keep the first m entries of `layer`. Views of the same buffer; if this session owns the buffer's frontier
        and nothing past m was handed out, the frontier moves back to m, so the next append writes in place."""
        n = int(self.positions[layer].numel())
        self.positions[layer] = self.positions[layer][:m]
        if self._keys[layer] is None:
            return
        self._keys[layer] = self._keys[layer][:, :, :m]
        self._values[layer] = self._values[layer][:, :, :m]
        b = self._bufs[layer]
        if b is not None:
            for buf in b:
                if buf.filled == n and m >= buf.pinned:
                    buf.filled = m

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
        """Keep only the entries of `layer` selected by the bool mask keep [T_l] (new tensors, in no buffer)."""
        self.positions[layer] = self.positions[layer][keep]
        self._bufs[layer] = None
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

    def layer_kv(self, layer: int, pin: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(keys [1, kv_heads, T_l, hd], values, positions [T_l]) of one layer, or None while it is empty.
        Read only: the tensors are shared with forks and prefix stores. `pin=False` only for a caller that copies
        what it needs before this session changes again (the slots may be rewritten after a rollback)."""
        if self._keys[layer] is None:
            return None
        if pin:
            self._pin(layer)
        return self._keys[layer], self._values[layer], self.positions[layer]

    def kv_tensors(self) -> list[torch.Tensor]:
        """[k_0, v_0, k_1, v_1, ...], each [1, kv_heads, T_l, head_dim] (for `thrifty.cost.kv_bytes`: the filled
        part; the buffers' spare capacity is `reserved_kv_bytes`). Read at once: not pinned."""
        return [t for kv in zip(self._keys, self._values) for t in kv if t is not None]

    def reserved_kv_bytes(self) -> int:
        """Bytes of the buffers this session's caches live in, spare capacity included (shared buffers counted)."""
        return sum(buf.data.numel() * buf.data.element_size() for b in self._bufs if b is not None for buf in b)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return f"Session(tokens={len(self)}, kv={self.kv_lengths()}, spans={self.spans})"
