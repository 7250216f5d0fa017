"""Environments with experts: BabyAI-Text (single agent)."""

from thrifty.envs.babyai_text import (ACTIONS, EVAL_SEED_BASE, LEVELS, BabyAITextEnv, UnknownLevelError, eval_seed,
                                      level_id, render_observation, train_seed)

__all__ = ["ACTIONS", "EVAL_SEED_BASE", "LEVELS", "BabyAITextEnv", "UnknownLevelError", "eval_seed", "level_id",
           "render_observation", "train_seed"]
