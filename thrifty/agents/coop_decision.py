"""The structured decision a cooperative planner emits each turn, and its strict, never-raising parser.

One line, fields separated by `|`; the action comes first, then optional `claim:` / `drop:` fields:

    do: goto red ball | claim: red ball        <- action `goto <colour> <type>`, announces a claim on the object
    do: explore 4 | claim: room 4 | drop: red ball
    do: wait

- `do:` is optional in the text (the context's prompt line already ends with `rN do:`);
- the action implies what the robot *holds* (its commitment): `goto X` holds X, `explore N` holds room N, `wait`
  holds nothing. `claim:` announces a new holding and must name the action's own item; `drop:` is a plan patch
  that gives up an earlier holding so a teammate may take it;
- validation is against what the team knows: `goto` needs an object some robot has reported, `explore` a room id
  of the layout.

Malformed output is replaced by `DEFAULT_DECISION` (`wait`: it never moves a robot into a conflict) and counted by
the episode runner.

Example:
    >>> d, err = parse_decision(" goto red ball | claim: red ball", known_objects={"red ball"}, n_rooms=9)
    >>> d.text(), err
    ('goto red ball | claim: red ball', None)
    >>> parse_decision("goto blue key", known_objects={"red ball"}, n_rooms=9)[1]
    "unknown object 'blue key'; known objects: red ball"
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from thrifty.envs.coop_grid import Subgoal, all_object_names

FIELDS = ("claim", "drop")
_ROOM_RE = re.compile(r"room (\d{1,2})")
_OBJECT_NAMES = frozenset(all_object_names())
MAX_DECISION_CHARS = 200
"""Longer output is refused outright (the parser's work stays bounded on any string)."""


def item_text(item: str | int | None) -> str:
    """What a robot can hold: an object name as is, a room id as 'room N', nothing as '-'."""
    if item is None:
        return "-"
    return f"room {item}" if isinstance(item, int) else item


def parse_item(text: str) -> str | int | None:
    """Inverse of `item_text` ('room 4' -> 4, '-' -> None, 'red ball' -> 'red ball'); ValueError otherwise."""
    text = text.strip()
    if text == "-":
        return None
    m = _ROOM_RE.fullmatch(text)
    if m:
        return int(m.group(1))
    if text in _OBJECT_NAMES:
        return text
    raise ValueError(f"not an item (an object '<colour> <type>', 'room N' or '-'): {text!r}")


@dataclass(frozen=True)
class Decision:
    """One robot's turn: its action (a `Subgoal`), an optional claim (= the action's item) and optional drop."""

    action: Subgoal
    claim: str | int | None = None
    drop: str | int | None = None

    @property
    def item(self) -> str | int | None:
        """What the action holds: the object of a goto, the room of an explore, None for wait."""
        return self.action.arg

    def text(self) -> str:
        """Canonical one-line text, without the leading 'do:'."""
        kind, arg = self.action.kind, self.action.arg
        parts = [kind if kind == "wait" else f"{kind} {arg}"]
        if self.claim is not None:
            parts.append(f"claim: {item_text(self.claim)}")
        if self.drop is not None:
            parts.append(f"drop: {item_text(self.drop)}")
        return " | ".join(parts)


DEFAULT_DECISION = Decision(Subgoal("wait"))
"""What malformed planner output is replaced by."""


def _parse_action(text: str) -> Subgoal:
    words = text.split()
    if words == ["wait"]:
        return Subgoal("wait")
    if len(words) == 3 and words[0] == "goto":
        name = f"{words[1]} {words[2]}"
        if name not in _OBJECT_NAMES:
            raise ValueError(f"goto needs '<colour> <type>', got {name!r}")
        return Subgoal("goto", name)
    if len(words) == 2 and words[0] == "explore" and words[1].isdigit() and len(words[1]) <= 2:
        return Subgoal("explore", int(words[1]))
    raise ValueError(f"the action must be 'goto <colour> <type>', 'explore <room>' or 'wait', got {text!r}")


def parse_syntax(text: str) -> Decision:
    """Parse the grammar only (no world knowledge); ValueError with a clear message when it does not fit."""
    line = text.strip()
    if "\n" in line:
        line = line.split("\n", 1)[0].strip()
    if line.startswith("do:"):
        line = line[3:].strip()
    if not line:
        raise ValueError("empty decision")
    if len(line) > MAX_DECISION_CHARS:
        raise ValueError(f"decision longer than {MAX_DECISION_CHARS} characters")
    head, *rest = [p.strip() for p in line.split("|")]
    action = _parse_action(head)
    fields: dict[str, str | int | None] = {}
    for part in rest:
        key, sep, value = part.partition(":")
        key = key.strip()
        if not sep or key not in FIELDS:
            raise ValueError(f"a field reads 'claim: <item>' or 'drop: <item>', got {part!r}")
        if key in fields:
            raise ValueError(f"field {key!r} given twice")
        fields[key] = parse_item(value)
        if fields[key] is None:
            raise ValueError(f"{key} needs an item, not '-'")
    claim, drop = fields.get("claim"), fields.get("drop")
    if claim is not None and claim != action.arg:
        raise ValueError(f"the claim ({item_text(claim)}) must be the action's own item ({item_text(action.arg)})")
    return Decision(action, claim, drop)


def parse_decision(text: object, known_objects: Collection[str], n_rooms: int) -> tuple[Decision | None, str | None]:
    """(decision, None) when `text` is a valid decision given what the team knows, else (None, error message).

    Only the first line counts. Never raises, whatever `text` is.
    """
    if not isinstance(text, str):
        return None, f"decision must be text, got {type(text).__name__}"
    try:
        decision = parse_syntax(text)
    except ValueError as e:
        return None, str(e)
    action = decision.action
    if action.kind == "goto" and action.arg not in known_objects:
        known = ", ".join(sorted(known_objects)) or "none yet"
        return None, f"unknown object {action.arg!r}; known objects: {known}"
    for name, item in (("explore", action.arg if action.kind == "explore" else None), ("drop", decision.drop)):
        if isinstance(item, int) and not 0 <= item < n_rooms:
            return None, f"{name}: room {item} does not exist; rooms are 0..{n_rooms - 1}"
    return decision, None


def decision_texts(known_objects: Collection[str], n_rooms: int) -> list[str]:
    """Every decision `parse_decision` accepts given what the team knows, in canonical text (claim before drop):
    the language a constrained decoder keeps the planner inside (`CoopPlanner(constrained=True)`).

    For k known objects and n rooms that is 1 + 2 (k + n) (k + n + 1) texts (k = 12, n = 9: 925)."""
    objects = sorted(known_objects)
    items: list[str | int] = [*objects, *range(n_rooms)]
    out = [DEFAULT_DECISION.text()]
    for action in [Subgoal("goto", o) for o in objects] + [Subgoal("explore", r) for r in range(n_rooms)]:
        for claim in (None, action.arg):
            out += [Decision(action, claim, drop).text() for drop in (None, *items)]
    return out
