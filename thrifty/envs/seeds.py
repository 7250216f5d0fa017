"""Training and evaluation seeds, disjoint by construction: every environment of thrifty uses this split; and the
key that says which episode a seed gives (`episode_key`)."""

from __future__ import annotations

import hashlib

EVAL_SEED_BASE = 1_000_000_000
"""Evaluation seeds are EVAL_SEED_BASE + i; training seeds are below it, so the two never overlap."""


def train_seed(i: int) -> int:
    if not 0 <= i < EVAL_SEED_BASE:
        raise ValueError(f"training seed index must be in [0, {EVAL_SEED_BASE}), got {i}")
    return i


def eval_seed(i: int) -> int:
    if i < 0:
        raise ValueError(f"evaluation seed index must be >= 0, got {i}")
    return EVAL_SEED_BASE + i


def episode_key(*parts) -> str:
    """What identifies the episode a seed gives: a short hash (12 hex digits) of its initial state and mission.

    `parts` are the level's id, the initial grid (a numpy array, hashed with its shape and dtype), the start pose(s)
    and the mission, in a fixed order. Two seeds that give the same key play the same episode: a suite's results
    count them once (`thrifty.bench.report`). Every environment of thrifty exposes the key of its current episode
    right after `reset` (`BabyAITextEnv.episode_key`, `CoopGridEnv.episode_key()`).

        >>> import numpy as np
        >>> grid = np.zeros((2, 2))
        >>> episode_key("lvl", grid, (1, 1), 0, "go") == episode_key("lvl", grid.copy(), (1, 1), 0, "go")
        True
        >>> episode_key("lvl", grid, (1, 1), 0, "go") == episode_key("lvl", grid, (1, 1), 1, "go")
        False
    """
    digest = hashlib.sha256()
    for part in parts:
        if hasattr(part, "tobytes") and getattr(part, "ndim", 0) > 0:
            digest.update(f"array{tuple(part.shape)}{part.dtype}:".encode())
            digest.update(part.tobytes())
        else:
            digest.update(repr(_plain(part)).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:12]


def _plain(part):
    """numpy scalars as Python numbers and containers as tuples, so the key does not depend on numpy's repr."""
    if isinstance(part, (tuple, list)):
        return tuple(_plain(p) for p in part)
    return part.item() if hasattr(part, "item") else part
