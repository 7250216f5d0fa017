"""Prefix KV reuse across decisions: compute each context token's keys and values once.

From EchoRL (KV sharing with effective bandwidth b(t) - b(t')), made real: the keys and values are the model's
own, and the reuse is measured, not assumed. A replanning agent's context is append-only (mission, then per step
an observation, the decision prompt and the action taken), so each decision only needs the tokens appended since
the last one. Two sources of cached prefixes:

- the kept session: within an episode, the session of the last decision (context + generated tokens) is kept;
  the next decision rolls it back to the longest common prefix with the new context (the generated action may
  differ from the action appended, e.g. an unparseable output replaced by the default) and extends it;
- the prefix store (`thrifty.runtime.prefix_store`): across episodes and agents, a radix tree over token ids
  with LRU eviction under a byte budget, copy-on-write, so a shared prefix is never mutated.

At least the last context token is always recomputed (its logits start the decode), as in vLLM.

Exactness: with nothing else composed, the logits equal a full recompute to float rounding (the cached keys
were computed over exactly the same tokens at the same positions). With token pruning (`composed`), pruned
tokens stay out of deep layers for every later decision; see docs/prefix_reuse.md.

No-op setting: keep_session=False, store_bytes=0 (every decision recomputes, like `full`).

Example:
    >>> from thrifty.techniques import build
    >>> t = build("prefix_reuse", store_bytes=0)
    >>> t.settings()
    {'keep_session': True, 'store_bytes': 0, 'store_name': ''}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from thrifty.runtime import Session
from thrifty.runtime.prefix_store import PrefixStore, shared_store
from thrifty.techniques.base import DecisionContext, Technique, register


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case, compared in C
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@register("prefix_reuse")
@dataclass
class PrefixReuse(Technique):
    """Reuse the keys/values of the context already computed (kept session, then a shared prefix store)."""

    noop_settings: ClassVar[dict[str, Any]] = {"keep_session": False, "store_bytes": 0}

    keep_session: bool = True
    """within an episode, keep the session between decisions and prefill only the tokens appended since"""
    store_bytes: int = 64 * 2**20
    """byte budget of the prefix store shared across episodes (and agents, see store_name); 0 = no store"""
    store_name: str = ""
    """'' = a store private to this technique instance (shared by its episodes); any other name = one
    process-wide store shared by every prefix_reuse with that name and budget (several agents in one process)"""

    def __post_init__(self) -> None:
        if not isinstance(self.keep_session, bool):
            raise TypeError(f"keep_session must be a bool, got {self.keep_session!r}")
        if int(self.store_bytes) != self.store_bytes or self.store_bytes < 0:
            raise ValueError(f"store_bytes must be an integer >= 0, got {self.store_bytes!r}")
        self.store_bytes = int(self.store_bytes)
        if not isinstance(self.store_name, str):
            raise TypeError(f"store_name must be a string, got {self.store_name!r}")
        if self.store_name and self.store_bytes == 0:
            raise ValueError(f"store_name={self.store_name!r} needs a store: set store_bytes > 0")
        self.store: PrefixStore | None = None
        if self.store_bytes:
            self.store = shared_store(self.store_name, self.store_bytes) if self.store_name \
                else PrefixStore(self.store_bytes)
        self.namespace = ""
        """the cache policy the stored entries were computed under (`composed` sets it from the pruning settings):
        entries of different namespaces never mix"""
        self.settled_only = False
        """insert into the store only the stable prefix, not the whole context (`composed` sets it when the newest
        tokens may still lose deep-layer entries at the next decision)"""
        self._session: Session | None = None
        self._report: dict[str, Any] = {}

    @property
    def is_noop(self) -> bool:
        return not self.keep_session and self.store is None

    def open_session(self, backbone, ctx: DecisionContext):
        ids = ctx.token_ids.tolist()
        limit = len(ids) - 1  # the last token is recomputed: its logits start the decode
        session, reused, source = None, 0, "none"
        kept = self._session
        if self.keep_session and kept is not None and kept.backbone is backbone:
            reused = min(common_prefix_length(kept.token_ids, ids), limit)
            if reused > 0:
                session, source = kept, "session"
        if self.store is not None and self.store.match(backbone, ids[:limit], self.namespace) > reused:
            if session is not None:
                session.rollback(reused)  # the store adds to what the kept session has
            session, reused = self.store.lookup(backbone, ids, self.namespace, max_len=limit, base=session)
            source = "store"
        if session is None:
            session, reused = Session(backbone), 0
        else:
            session.rollback(reused)
        self._session = None  # handed out; taken back in close_session
        self._report = {"reuse_source": source, "prefix_tokens_reused": reused, "prompt_tokens": len(ids)}
        return session, reused

    def close_session(self, session, ctx: DecisionContext, decode_from: int) -> None:
        if self.keep_session:
            self._session = session
        if self.store is not None:
            upto = ctx.spans.get("stable_prefix", (0, 0))[1] if self.settled_only else decode_from
            self.store.insert(session, upto, self.namespace)  # the context, not the generated tokens
            self._report.update(self.store.stats())

    def reset(self) -> None:
        """A new episode: drop the kept session (the prefix store is kept: it serves later episodes)."""
        self._session = None
        self._report = {}

    def report(self) -> dict[str, Any]:
        return dict(self._report)
