"""Which BabyAI level a name means: any `BabyAI-*` id registered in gymnasium, by full id or short name.

    >>> babyai_id("GoToRedBallGrey")
    'BabyAI-GoToRedBallGrey-v0'
    >>> babyai_id("GoToObjS6")  # only a v1 is registered
    'BabyAI-GoToObjS6-v1'

A short name maps to its highest registered version. Levels minigrid registers but thrifty cannot serve are
refused by name, with the reason (`REFUSED_LEVELS`); anything else that is not registered gets an error naming
close matches and some available levels.
"""

from __future__ import annotations

import difflib
import re

import gymnasium as gym
import minigrid  # noqa: F401  (registers the BabyAI ids)

_ID = re.compile(r"^BabyAI-(?P<name>[A-Za-z0-9]+)-v(?P<version>\d+)$")

REFUSED_LEVELS: dict[str, str] = {
    "KeyInBox": "the key is hidden inside a box: the text view shows a box, never its contents, and minigrid's "
                "BabyAIBot fails on this level",
    "PutNextS5N2Carrying": "the agent starts carrying an object, which minigrid's BabyAIBot cannot plan from",
    "PutNextS6N3Carrying": "the agent starts carrying an object, which minigrid's BabyAIBot cannot plan from",
    "PutNextS7N4Carrying": "the agent starts carrying an object, which minigrid's BabyAIBot cannot plan from",
}
"""Registered BabyAI levels refused, short name -> reason (each checked: the bot fails from every seed tried)."""


class UnknownLevelError(ValueError):
    """A level name that is not registered, or a level thrifty's text rendering and expert cannot serve."""


def registered_babyai() -> dict[str, str]:
    """Short name -> full id of every registered BabyAI level (the highest version of each)."""
    best: dict[str, tuple[int, str]] = {}
    for env_id in gym.registry:
        m = _ID.match(env_id)
        if m:
            version = int(m["version"])
            if m["name"] not in best or version > best[m["name"]][0]:
                best[m["name"]] = (version, env_id)
    return {name: env_id for name, (_, env_id) in sorted(best.items())}


def unknown_level(level: str, named: list[str]) -> UnknownLevelError:
    """The error for an unregistered `level`: close matches, the `named` levels and some registered ones."""
    available = [n for n in registered_babyai() if n not in REFUSED_LEVELS]
    close = difflib.get_close_matches(level.removeprefix("BabyAI-"), named + available, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UnknownLevelError(
        f"unknown BabyAI-Text level {level!r}{hint}; choose one of: {', '.join(named)}, or any of the "
        f"{len(available)} registered BabyAI levels by short name or id, e.g. {', '.join(available[:8])}")


def babyai_id(level: str) -> str | None:
    """The registered id of BabyAI level `level` (short name or full id), or None when it is not registered.
    Raises `UnknownLevelError` for a registered level in `REFUSED_LEVELS`."""
    levels = registered_babyai()
    m = _ID.match(level)
    name = m["name"] if m and level in gym.registry else level
    if name not in levels:
        return None
    if name in REFUSED_LEVELS:
        raise UnknownLevelError(f"BabyAI level {level!r} is not supported: {REFUSED_LEVELS[name]}")
    return level if m else levels[name]
