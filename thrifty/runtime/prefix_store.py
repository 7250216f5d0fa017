"""A prefix store: keys/values of token prefixes shared across sessions, episodes and agents.

A radix tree over token ids (like SGLang's RadixAttention, written for per-layer variable-length caches): each
edge holds a run of tokens and, for every layer, the cached entries whose original positions fall in that run
(after token pruning a layer may hold only some of them). A lookup walks the tree along a context's token ids and
assembles a `Session` holding the longest cached prefix; an insert adds the part of a session's context the tree
does not hold yet. When the store's bytes exceed its budget, least-recently-used leaves are evicted.

Copy-on-write: the store never modifies a tensor it holds or has handed out. Inserting copies the new entries out
of the session; splitting an edge builds new tensors for both halves; a session assembled by `lookup` gets new
tensors (or, for a one-edge prefix, the store's own tensors, which `Session` never modifies in place either:
extend, rollback and fork all make new tensors). So a shared prefix cannot be mutated by anyone who reuses it.

Namespaces: one store can serve several backbones and several cache policies (e.g. prefix reuse alone, or with
a given token-pruning setting); entries of different (backbone, namespace) pairs never mix, because the same
tokens give different caches under a different model or pruning policy.

Bytes: `nbytes` counts every tensor the store holds (keys, values and their int64 positions).

Example:
    >>> from thrifty.backbones import HFDecoder, tiny_model
    >>> bb = HFDecoder.from_model(tiny_model("llama"))
    >>> s = Session(bb); _ = s.extend(list(range(10)))
    >>> store = PrefixStore(budget_bytes=1 << 20)
    >>> store.insert(s, 10)
    10
    >>> hit, n = store.lookup(bb, list(range(8)) + [99, 98])
    >>> n, hit.token_ids == list(range(8)), hit.next_position
    (8, True, 8)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from thrifty.runtime.session import Session

Segment = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One layer's entries on one edge: keys [1, kv_heads, n, head_dim], values (same), positions LongTensor [n]."""


def _segment_bytes(seg: Segment) -> int:
    return sum(t.numel() * t.element_size() for t in seg)


def _take(seg: Segment, keep: torch.Tensor) -> Segment:
    """The entries of `seg` selected by the bool mask keep [n] (advanced indexing: new, contiguous tensors)."""
    k, v, p = seg
    return k[:, :, keep], v[:, :, keep], p[keep]


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]
    """the edge's token ids; the first sits at original position `start`"""
    start: int
    kv: list[Segment]
    """per layer, the cached entries with positions in [start, start + len(tokens))"""
    parent: "_Node | None" = None
    children: dict[int, "_Node"] = field(default_factory=dict)
    last_used: int = 0
    nbytes: int = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class _Root:
    backbone: object  # held strongly, so its id() cannot be reused while the store lives
    node: _Node


class PrefixStore:
    """Token-prefix -> per-layer KV, shared by every session that looks it up; LRU eviction under `budget_bytes`.

    Counters, in serving engines' units (tokens): `queries` (tokens of the contexts looked up) and `hits`
    (tokens of them served from the store); `evicted_bytes`, `inserted_tokens`.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._roots: dict[tuple[int, str], _Root] = {}
        self._clock = itertools.count(1)
        self.nbytes = 0
        self.n_nodes = 0
        self.queries = self.hits = self.inserted_tokens = self.evicted_bytes = 0

    # ------------------------------------------------------------------ walking
    def _root(self, backbone, namespace: str, create: bool) -> _Node | None:
        key = (id(backbone), namespace)
        root = self._roots.get(key)
        if root is None and create:
            root = self._roots[key] = _Root(backbone, _Node((), 0, []))
        return root.node if root is not None else None

    def _walk(self, root: _Node, ids: Sequence[int]) -> tuple[list[_Node], int]:
        """Nodes along the longest cached prefix of ids, and its length (the last node may match partly)."""
        path, n, node = [], 0, root
        while n < len(ids):
            child = node.children.get(int(ids[n]))
            if child is None:
                break
            k = len(child.tokens)
            if tuple(ids[n:n + k]) == child.tokens:  # the common case, compared in C
                m = k
            else:
                m = 0
                for a, b in zip(child.tokens, ids[n:]):
                    if a != b:
                        break
                    m += 1
            path.append(child)
            n += m
            if m < len(child.tokens):
                break
            node = child
        return path, n

    def match(self, backbone, ids: Sequence[int], namespace: str = "") -> int:
        """Length of the longest prefix of ids the store holds (no counters or LRU touched)."""
        root = self._root(backbone, namespace, create=False)
        return 0 if root is None else self._walk(root, [int(t) for t in ids])[1]

    def lookup(self, backbone, ids: Sequence[int], namespace: str = "", max_len: int | None = None,
               base: Session | None = None) -> tuple[Session | None, int]:
        """A new session holding the longest cached prefix of ids[:max_len], and its length ((None, 0) on a miss).

        base: a session holding a prefix of ids computed under the same policy (e.g. a kept session rolled back
        to its common prefix); its entries are used for its positions and only the rest comes from the store
        (cheaper than assembling the whole prefix from many edges). Counts len(ids) queried tokens and the
        prefix length as hits, and marks the path as recently used.
        """
        ids = [int(t) for t in ids]
        self.queries += len(ids)
        root = self._root(backbone, namespace, create=False)
        if root is None:
            return None, 0
        path, n = self._walk(root, ids[:max_len] if max_len is not None else ids)
        if n == 0:
            return None, 0
        tick = next(self._clock)
        b = 0
        if base is not None:
            b = min(base.next_position, n)
            if base.token_ids[:b] != ids[:b]:
                raise ValueError("base must hold a prefix of ids")
        layers: list[Segment | None] = []
        for l in range(backbone.n_layers):
            segs = []
            if b:
                seg = base.layer_kv(l)
                if seg is not None and seg[2].numel():
                    segs.append(_take(seg, seg[2] < b) if int(seg[2][-1]) >= b else seg)
            for node in path:
                if node.end <= b:
                    continue
                seg = node.kv[l]
                if node.end > n or node.start < b:  # edges cut by the match's end or by the base
                    seg = _take(seg, (seg[2] >= b) & (seg[2] < n))
                if seg[2].numel():
                    segs.append(seg)
            if not segs:
                layers.append(None)
            elif len(segs) == 1:
                layers.append(segs[0])
            else:
                layers.append(tuple(torch.cat(parts, dim=d) for parts, d in zip(zip(*segs), (-2, -2, 0))))
        for node in path:
            node.last_used = tick
        self.hits += n
        return Session.from_kv(backbone, ids[:n], layers), n

    # ------------------------------------------------------------------ inserting
    def insert(self, session: Session, length: int | None = None, namespace: str = "") -> int:
        """Cache the first `length` tokens of `session` (default: all); returns how many tokens were new.

        What the store already holds for this prefix is kept (first writer wins): a cached prefix is never
        rewritten. Then least-recently-used leaves are evicted until the store fits its budget (the new entries
        are the most recently used, so they go last, and only if they alone exceed the budget).
        """
        length = session.next_position if length is None else int(length)
        if not 0 <= length <= session.next_position:
            raise ValueError(f"length {length} outside [0, {session.next_position}]")
        if self.budget_bytes == 0 or length == 0:
            return 0
        ids = session.token_ids[:length]
        root = self._root(session.backbone, namespace, create=True)
        path, n = self._walk(root, ids)
        tick = next(self._clock)
        for node in path:
            node.last_used = tick
        added = length - n
        if added:
            parent = path[-1] if path else root
            if parent.end > n:  # the context leaves the tree inside this edge: split the edge there
                parent = self._split(parent, n - parent.start)
            kv: list[Segment] = []
            for l in range(session.backbone.n_layers):
                seg = session.layer_kv(l, pin=False)  # copied by _take below
                if seg is None:
                    seg = _empty_segment(session, l)
                kv.append(_take(seg, (seg[2] >= n) & (seg[2] < length)))
            leaf = _Node(tuple(ids[n:]), n, kv, parent=parent, last_used=tick)
            leaf.nbytes = sum(_segment_bytes(s) for s in kv)
            parent.children[leaf.tokens[0]] = leaf
            self.nbytes += leaf.nbytes
            self.n_nodes += 1
            self.inserted_tokens += added
        self._evict()
        return added

    def _split(self, node: _Node, at: int) -> _Node:
        """Split node's edge after `at` tokens (0 < at < len); returns the new upper node. New tensors for both."""
        cut = node.start + at
        upper_kv = [_take(seg, seg[2] < cut) for seg in node.kv]
        lower_kv = [_take(seg, seg[2] >= cut) for seg in node.kv]
        upper = _Node(node.tokens[:at], node.start, upper_kv, parent=node.parent, last_used=node.last_used)
        upper.nbytes = sum(_segment_bytes(s) for s in upper_kv)
        node.parent.children[upper.tokens[0]] = upper
        self.nbytes -= node.nbytes
        node.tokens, node.start, node.kv, node.parent = node.tokens[at:], cut, lower_kv, upper
        node.nbytes = sum(_segment_bytes(s) for s in lower_kv)
        upper.children[node.tokens[0]] = node
        self.nbytes += upper.nbytes + node.nbytes
        self.n_nodes += 1
        return upper

    # ------------------------------------------------------------------ eviction
    def _leaves(self):
        stack = [r.node for r in self._roots.values()]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.parent is not None:
                yield node

    def _evict(self) -> None:
        while self.nbytes > self.budget_bytes:
            leaf = min(self._leaves(), key=lambda x: x.last_used)
            del leaf.parent.children[leaf.tokens[0]]
            self.nbytes -= leaf.nbytes
            self.n_nodes -= 1
            self.evicted_bytes += leaf.nbytes
            leaf.parent = None
        for key in [k for k, r in self._roots.items() if not r.node.children]:
            del self._roots[key]  # drop empty namespaces (and the backbone reference they hold)

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._roots.clear()
        self.nbytes = self.n_nodes = 0

    # ------------------------------------------------------------------ inspection
    @property
    def hit_rate(self) -> float:
        """hits / queries in tokens (0.0 before any lookup)."""
        return self.hits / self.queries if self.queries else 0.0

    def prefixes(self, max_tokens: int | None = None) -> dict[str, list[list[int]]]:
        """Namespace -> the token ids of every root-to-leaf path (each cut at `max_tokens`; duplicates after the
        cut dropped): what the store holds, tokens only. A scheduler mirrors a remote worker's store from it."""
        out: dict[str, set[tuple[int, ...]]] = {}
        for (_, namespace), root in self._roots.items():
            seqs = out.setdefault(namespace, set())
            stack: list[tuple[_Node, tuple[int, ...]]] = [(root.node, ())]
            while stack:
                node, above = stack.pop()
                path = above + node.tokens
                if max_tokens is not None and len(path) >= max_tokens:
                    seqs.add(path[:max_tokens])
                elif not node.children:
                    if path:
                        seqs.add(path)
                else:
                    stack.extend((child, path) for child in node.children.values())
        return {ns: [list(p) for p in sorted(seqs)] for ns, seqs in out.items()}

    def stats(self) -> dict:
        return {"store_bytes": self.nbytes, "store_budget_bytes": self.budget_bytes, "store_nodes": self.n_nodes,
                "store_queries": self.queries, "store_hits": self.hits, "store_evicted_bytes": self.evicted_bytes}

    def __repr__(self) -> str:
        return f"PrefixStore(bytes={self.nbytes}/{self.budget_bytes}, nodes={self.n_nodes}, hit_rate={self.hit_rate:.3f})"


def _empty_segment(session: Session, layer: int) -> Segment:
    bb = session.backbone
    s = bb.shape
    k = torch.empty(1, s.n_kv_heads, 0, s.head_dim, dtype=bb.dtype, device=bb.device)
    return k, k, torch.empty(0, dtype=torch.long, device=bb.device)


_SHARED: dict[str, PrefixStore] = {}


def shared_store(name: str, budget_bytes: int) -> PrefixStore:
    """The process-wide store called `name` (created with `budget_bytes` on first use; a later call with another
    budget raises, so two users cannot silently disagree about it)."""
    store = _SHARED.get(name)
    if store is None:
        store = _SHARED[name] = PrefixStore(budget_bytes)
    elif store.budget_bytes != budget_bytes:
        raise ValueError(f"shared prefix store {name!r} exists with budget {store.budget_bytes} bytes, "
                         f"not {budget_bytes}")
    return store
