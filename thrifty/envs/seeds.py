"""Training and evaluation seeds, disjoint by construction: every environment of thrifty uses this split."""

from __future__ import annotations

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
