"""The shared context of a cooperative robot team: structured records, rendered append-only, with token spans.

Every contribution is a `Record(kind, round, agent, payload)` rendered as one line. Lines are only ever appended,
so the text (and the tokens, encoded line by line) of everything already rendered never changes: the planner's
prefix is stable from one call to the next. One episode renders as:

    task: find the red ball and the blue key | robots 4 | rooms 3x3     <- span "task" (task + rule), never pruned
    rule: one robot per target and per room; each known target to the nearest free robot, the rest explore
    round 0
    r0 obs: room 4; red ball 4                 <- what robot 0 saw (objects with their rooms), where it is
    r1 obs: room 0
    plan: r0 -, r1 -, r2 -, r3 -               <- open holdings at the start of the round (the team plan)
    r0 role: room 4 holds - | targets red ball 4 | rooms 0 1 2 3 5 6 7 8
                                               <- span "role" of robot 0's call; what precedes is "stable_prefix"
    r0 do: goto red ball | claim: red ball     <- "r0 do:" is the prompt, the rest the planner's decision
    r1 role: room 0 holds - | targets - | rooms 0 1 2 3 5 6 7 8
    r1 do: explore 0 | claim: room 0
    r1 conflict: room 0 held by r2            <- a claim on what a teammate holds (it still stands)
    r0 obs: room 4; red ball 4, grey key 5    <- after the round's moves
    r0 env: reached red ball
    env: explored room 0
    round 1
    ...

Rooms are numbered row by row from the north-west (3x3: 0 1 2 / 3 4 5 / 6 7 8). A robot's call ends with its
role line and the prompt `rN do:`; span "own_observation" is its latest `obs` line (or the `known` line, see below).
The role line is the caller's view of the team state, derived from the records above it (like the plan line):
its room, its open holding, the *free targets* (mission targets reported, not reached, held by no teammate, in
mission order, with their rooms) and the *free rooms* (not explored, held by no teammate). It puts what a
decision needs next to the prompt instead of scattered over 1-3k tokens of reports.

Size limit (`max_records`): when a round starts with more visible records than that, a `known` record that
summarises the team state (objects and their rooms, reached targets, explored rooms, each robot's room and
holding) is appended after the round marker, and from then on the context renders as the task lines followed by
that round. Nothing is rewritten in place, but this *compaction* is the one moment the prefix changes: `epoch`
counts compactions so prefix caches can tell. The team state derived from the compacted text equals the state
derived from the full history (tested).

Example:
    >>> ctx = CoopContext.start("find the red ball", n_robots=2, rows=2, cols=2)
    >>> ctx.start_round(); ctx.add_observation(0, room=1, objects={"red ball": 1}); ctx.add_observation(1, room=2)
    >>> ctx.begin_call(0).endswith("r0 do:")
    True
    >>> ctx.add_decision(0, "goto red ball | claim: red ball")
    >>> parse_records(ctx.render()) == ctx.visible_records()
    True
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from thrifty.agents.coop_decision import Decision, item_text, parse_item, parse_syntax
from thrifty.envs.coop_grid import all_object_names, parse_mission

KINDS = ("task", "rule", "round", "known", "plan", "obs", "role", "do", "conflict", "env")
TEAM_KINDS = ("task", "rule", "round", "known", "plan")
"""Kinds without an agent (events may have one or not)."""
RULE = "one robot per target and per room; each known target to the nearest free robot, the rest explore"
DO_PROMPT = "do:"

_NAME = "(?:" + "|".join(all_object_names()) + ")"
_ITEM = rf"(?:{_NAME}|room \d{{1,2}}|-)"
_PAYLOAD = {
    "task": re.compile(r"find the .+ \| robots [2-8] \| rooms [1-3]x[1-3]"),
    "rule": re.compile(r"[^\n|]+"),
    "round": re.compile(r""),
    "plan": re.compile(rf"r\d {_ITEM}(?:, r\d {_ITEM})*"),
    "obs": re.compile(rf"room \d{{1,2}}(?:; {_NAME} \d{{1,2}}(?:, {_NAME} \d{{1,2}})*)?"),
    "role": re.compile(rf"room \d{{1,2}} holds {_ITEM} \| targets (?:-|{_NAME} \d{{1,2}}(?:, {_NAME} \d{{1,2}})*)"
                       rf" \| rooms (?:-|\d{{1,2}}(?: \d{{1,2}})*)"),
    "do": re.compile(r"[^\n]+"),  # checked by the decision grammar
    "conflict": re.compile(rf"{_ITEM} held by r\d"),
    "env": re.compile(rf"reached {_NAME}|explored room \d{{1,2}}"),
    "known": re.compile(rf"objects (?:-|{_NAME} \d{{1,2}}(?: reached)?(?:, {_NAME} \d{{1,2}}(?: reached)?)*)"
                        rf"; explored (?:-|\d{{1,2}}(?: \d{{1,2}})*)"
                        rf"; robots r\d \d{{1,2}} {_ITEM}(?:, r\d \d{{1,2}} {_ITEM})*"),
}
_LINE = re.compile(r"(?:r(\d) )?([a-z]+):(?: (.*))?")


class RecordError(ValueError):
    """A structured record (or a rendered line) that does not fit the format."""


@dataclass(frozen=True)
class Record:
    """One contribution to the shared context.

    kind: one of `KINDS`; round: the round it belongs to (>= 0); agent: robot index or None for team records;
    payload: the text after 'kind:' (single line; its grammar depends on the kind, see `_PAYLOAD`).
    """

    kind: str
    round: int
    agent: int | None
    payload: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RecordError(f"record kind must be one of {KINDS}, got {self.kind!r}")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise RecordError(f"record round must be an integer >= 0, got {self.round!r}")
        if self.kind in TEAM_KINDS and self.agent is not None:
            raise RecordError(f"a {self.kind!r} record belongs to the team, not to robot {self.agent}")
        if self.kind not in TEAM_KINDS + ("env",) and self.agent is None:
            raise RecordError(f"a {self.kind!r} record needs an agent")
        if self.agent is not None and (isinstance(self.agent, bool) or not isinstance(self.agent, int)
                                       or not 0 <= self.agent <= 7):
            raise RecordError(f"record agent must be a robot index 0..7, got {self.agent!r}")
        if not isinstance(self.payload, str) or "\n" in self.payload or self.payload != self.payload.strip():
            raise RecordError(f"record payload must be one stripped line of text, got {self.payload!r}")
        if not _PAYLOAD[self.kind].fullmatch(self.payload):
            raise RecordError(f"malformed {self.kind!r} payload {self.payload!r}")
        if self.kind == "env" and self.payload.startswith("explored") != (self.agent is None):
            raise RecordError(f"'reached' events name the robot, 'explored' events do not: {self}")
        if self.kind == "task":
            parse_mission(self.payload.split(" | ")[0])
        if self.kind == "do":
            try:
                parse_syntax(self.payload)
            except ValueError as e:
                raise RecordError(f"malformed decision record {self.payload!r}: {e}") from None


def record_segments(record: Record) -> list[str]:
    """The record's text as segments encoded one by one (a decision: the prompt 'rN do:' and ' <decision>\\n')."""
    if record.kind == "round":
        return [f"round {record.round}\n"]
    who = "" if record.agent is None else f"r{record.agent} "
    if record.kind == "do":
        return [f"{who}{DO_PROMPT}", f" {record.payload}\n"]
    return [f"{who}{record.kind}: {record.payload}\n"]


def render_records(records: list[Record]) -> str:
    return "".join(s for r in records for s in record_segments(r))


def parse_records(text: str) -> list[Record]:
    """Inverse of `render_records`: one record per line; rounds come from the `round N` lines. RecordError on a
    line that is not a record."""
    records, current = [], 0
    for n, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), 1):
        m = re.fullmatch(r"round (\d+)", line)
        if m:
            current = int(m.group(1))
            records.append(Record("round", current, None, ""))
            continue
        m = _LINE.fullmatch(line)
        if not m:
            raise RecordError(f"line {n} is not a record: {line!r}")
        agent, kind, payload = m.group(1), m.group(2), m.group(3) or ""
        records.append(Record(kind, current, None if agent is None else int(agent), payload))
    return records


# ---------------------------------------------------------------------------------------------- team state

@dataclass
class TeamState:
    """What the records say, folded in order: everything a planner (or the expert) may know.

    objects: reported object -> room; reached: targets reached; explored: rooms explored; rooms: robot -> its last
    reported room; holds: robot -> what its latest decision holds (object, room id, or None).
    """

    targets: list[str]
    n_robots: int
    rows: int
    cols: int
    round: int = 0
    objects: dict[str, int] = field(default_factory=dict)
    reached: set[str] = field(default_factory=set)
    explored: set[int] = field(default_factory=set)
    rooms: dict[int, int] = field(default_factory=dict)
    holds: dict[int, Any] = field(default_factory=dict)

    @property
    def n_rooms(self) -> int:
        return self.rows * self.cols

    def done(self, item: str | int | None) -> bool:
        """A holding is finished when its target was reached or its room explored (None: nothing held)."""
        if item is None:
            return True
        return item in self.explored if isinstance(item, int) else item in self.reached

    def open_holding(self, agent: int) -> str | int | None:
        item = self.holds.get(agent)
        return None if self.done(item) else item

    def holder(self, item: str | int, besides: int | None = None) -> int | None:
        """The lowest-id robot other than `besides` that holds `item` open, or None."""
        for a in sorted(self.holds):
            if a != besides and self.holds[a] == item and not self.done(item):
                return a
        return None

    def room_distance(self, a: int, b: int) -> int:
        (ra, ca), (rb, cb) = divmod(a, self.cols), divmod(b, self.cols)
        return abs(ra - rb) + abs(ca - cb)

    def free_targets(self, agent: int) -> list[str]:
        """Mission targets reported, not reached and held open by no robot but `agent`, in mission order."""
        return [t for t in self.targets
                if t in self.objects and t not in self.reached and self.holder(t, besides=agent) is None]

    def free_rooms(self, agent: int) -> list[int]:
        """Rooms not explored and held open by no robot but `agent`."""
        return [r for r in range(self.n_rooms) if r not in self.explored and self.holder(r, besides=agent) is None]

    def role_text(self, agent: int) -> str:
        targets = ", ".join(f"{t} {self.objects[t]}" for t in self.free_targets(agent))
        rooms = " ".join(str(r) for r in self.free_rooms(agent))
        return (f"room {self.rooms.get(agent, 0)} holds {item_text(self.open_holding(agent))} "
                f"| targets {targets or '-'} | rooms {rooms or '-'}")

    def plan_text(self) -> str:
        return ", ".join(f"r{a} {item_text(self.open_holding(a))}" for a in range(self.n_robots))

    def known_text(self) -> str:
        objs = ", ".join(f"{n} {r}" + (" reached" if n in self.reached else "") for n, r in self.objects.items())
        explored = " ".join(str(r) for r in sorted(self.explored))
        robots = ", ".join(f"r{a} {self.rooms.get(a, 0)} {item_text(self.open_holding(a))}"
                           for a in range(self.n_robots))
        return f"objects {objs or '-'}; explored {explored or '-'}; robots {robots}"

    def apply(self, record: Record) -> None:
        """Fold one record into the state."""
        kind, p, a = record.kind, record.payload, record.agent
        self.round = record.round
        if kind == "obs":
            room, _, seen = p.partition("; ")
            self.rooms[a] = int(room.split()[1])
            for part in seen.split(", ") if seen else []:
                name, _, r = part.rpartition(" ")
                self.objects.setdefault(name, int(r))
        elif kind == "do":
            self.holds[a] = parse_syntax(p).item
        elif kind == "env":
            if p.startswith("reached "):
                self.reached.add(p[len("reached "):])
            else:
                self.explored.add(int(p.split()[-1]))
        elif kind == "known":
            objs, explored, robots = (part.split(" ", 1)[1] for part in p.split("; "))
            self.objects, self.reached, self.rooms, self.holds = {}, set(), {}, {}
            for part in [] if objs == "-" else objs.split(", "):
                reached = part.endswith(" reached")
                name, _, r = part.removesuffix(" reached").rpartition(" ")
                self.objects[name] = int(r)
                if reached:
                    self.reached.add(name)
            self.explored = set() if explored == "-" else {int(x) for x in explored.split()}
            for part in robots.split(", "):
                robot, room, item = part.split(" ", 2)
                self.rooms[int(robot[1:])] = int(room)
                self.holds[int(robot[1:])] = parse_item(item)


def team_state(records: list[Record]) -> TeamState:
    """Fold `records` (they must begin with the task record) into a `TeamState`."""
    if not records or records[0].kind != "task":
        raise RecordError("the records must begin with a task record")
    mission, robots, rooms = records[0].payload.split(" | ")
    rows, cols = (int(x) for x in rooms.split()[1].split("x"))
    state = TeamState(parse_mission(mission), int(robots.split()[1]), rows, cols)
    for r in records[1:]:
        state.apply(r)
    return state


# ---------------------------------------------------------------------------------------------- the buffer

@dataclass
class CoopContext:
    """The team's shared, append-only record log with its rendering and size policy (see module doc)."""

    records: list[Record]
    n_robots: int
    max_records: int | None = None
    """compact (see module doc) when a round starts with more visible records than this; None: never"""
    epoch: int = 0
    """number of compactions so far: the rendered prefix is stable within an epoch"""
    epoch_starts: list[int] = field(default_factory=lambda: [2])
    """index (into `records`) of the first record after the task lines that each epoch renders"""
    _head: int = 2  # task + rule

    @classmethod
    def start(cls, mission: str, n_robots: int, rows: int, cols: int, max_records: int | None = None) -> CoopContext:
        if isinstance(n_robots, bool) or not isinstance(n_robots, int) or not 2 <= n_robots <= 8:
            raise RecordError(f"n_robots must be an integer in 2..8, got {n_robots!r}")
        if max_records is not None and max_records < 8:
            raise ValueError(f"max_records must be >= 8 or None, got {max_records}")
        task = Record("task", 0, None, f"{mission} | robots {n_robots} | rooms {rows}x{cols}")
        return cls([task, Record("rule", 0, None, RULE)], n_robots, max_records)

    # ------------------------------------------------------------------ what is rendered
    def visible_records(self) -> list[Record]:
        return self.records[:self._head] + self.records[self.epoch_starts[-1]:]

    def render(self) -> str:
        return render_records(self.visible_records())

    def state(self) -> TeamState:
        """The team state as the rendered (visible) records tell it."""
        return team_state(self.visible_records())

    @property
    def round(self) -> int:
        return self.records[-1].round

    @property
    def started_rounds(self) -> int:
        return sum(r.kind == "round" for r in self.records)

    # ------------------------------------------------------------------ appending
    def _add(self, kind: str, agent: int | None, payload: str) -> Record:
        if agent is not None and not 0 <= agent < self.n_robots:
            raise RecordError(f"agent must be in 0..{self.n_robots - 1}, got {agent}")
        record = Record(kind, self.round, agent, payload)
        self.records.append(record)
        return record

    def start_round(self) -> None:
        """Append the next round marker (compacting first if over `max_records`) and the team plan."""
        state = self.state()
        n = self.started_rounds
        self.records.append(Record("round", n, None, ""))
        if self.max_records is not None and len(self.visible_records()) > self.max_records:
            self.epoch_starts.append(len(self.records) - 1)
            self.epoch += 1
            self._add("known", None, state.known_text())
        if n > 0:  # round 0's plan comes after the first observations
            self._add("plan", None, state.plan_text())

    def add_observation(self, agent: int, room: int, objects: dict[str, int] | None = None) -> None:
        """Robot `agent` is in `room` and saw `objects` (name -> room) since its last report."""
        seen = ", ".join(f"{n} {r}" for n, r in (objects or {}).items())
        self._add("obs", agent, f"room {room}" + (f"; {seen}" if seen else ""))

    def add_plan(self) -> None:
        self._add("plan", None, self.state().plan_text())

    def add_event(self, payload: str, agent: int | None = None) -> None:
        """'reached <object>' (agent given) or 'explored room N' (agent None)."""
        self._add("env", agent, payload)

    def begin_call(self, agent: int) -> str:
        """Append robot `agent`'s role line; returns the text the planner continues (ends with 'rN do:')."""
        state = self.state()
        self._add("role", agent, state.role_text(agent))
        return self.render() + f"r{agent} {DO_PROMPT}"

    def add_decision(self, agent: int, decision: Decision | str) -> None:
        """Append the decision of the pending call (text in the decision grammar, or a `Decision`); a claim on
        something a teammate holds open also appends a `conflict` record."""
        text = decision.text() if isinstance(decision, Decision) else decision
        last = self.records[-1]
        if last.kind != "role" or last.agent != agent:
            raise RecordError(f"add_decision({agent}) must follow begin_call({agent})")
        state = self.state()
        record = self._add("do", agent, text)
        item = parse_syntax(record.payload).item
        other = None if item is None else state.holder(item, besides=agent)
        if other is not None:
            self._add("conflict", agent, f"{item_text(item)} held by r{other}")


# ---------------------------------------------------------------------------------------------- tokens

@dataclass
class SharedContextTokens:
    """The context as tokens, encoded record segment by record segment (never re-tokenised as a whole), so a
    call's tokens are a prefix of every later call's within an epoch. Mirrors `PlannerContext`.

    spans (token positions, end exclusive): "task" (task + rule lines), "role" (the caller's role line),
    "own_observation" (the caller's latest obs line; right after a compaction, until its next report, the `known`
    line that now holds its room), "stable_prefix" (everything before the role line), and the
    single-agent names "mission" (= task) and "observation" (role line + prompt) so existing techniques apply.
    """

    tokenizer: Any
    ids: list[int] = field(default_factory=list)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    _segments: list[str] = field(default_factory=list)
    _epoch: int = -1
    _n_records: int = 0
    _record_spans: list[tuple[int, int]] = field(default_factory=list)

    def _encode(self, text: str) -> tuple[int, int]:
        start = len(self.ids)
        self.ids += self.tokenizer.encode(text, add_special_tokens=False)
        return start, len(self.ids)

    def sync(self, context: CoopContext) -> None:
        """Encode the records appended since the last sync (all of them again after a compaction)."""
        visible = context.visible_records()
        if context.epoch != self._epoch:
            self.ids, self._record_spans, self._n_records = [self.tokenizer.bos_token_id], [], 0
            self._epoch = context.epoch
        for record in visible[self._n_records:]:
            start = len(self.ids)
            for seg in record_segments(record):
                self._encode(seg)
            self._record_spans.append((start, len(self.ids)))
        self._n_records = len(visible)
        self.spans = {"task": (self._record_spans[0][0], self._record_spans[1][1])}
        self.spans["mission"] = self.spans["task"]

    def call(self, context: CoopContext, agent: int) -> tuple[list[int], dict[str, tuple[int, int]]]:
        """Token ids and spans of robot `agent`'s call, right after `context.begin_call(agent)`."""
        self.sync(context)
        visible = context.visible_records()
        if visible[-1].kind != "role" or visible[-1].agent != agent:
            raise RecordError(f"call({agent}) must come right after begin_call({agent})")
        role = self._record_spans[-1]
        prompt = self.tokenizer.encode(f"r{agent} {DO_PROMPT}", add_special_tokens=False)
        end = role[1] + len(prompt)
        spans = dict(self.spans, role=role, stable_prefix=(0, role[0]), observation=(role[0], end))
        own = [i for i, r in enumerate(visible) if (r.kind == "obs" and r.agent == agent) or r.kind == "known"]
        if own:
            spans["own_observation"] = self._record_spans[own[-1]]
        return self.ids + prompt, spans
