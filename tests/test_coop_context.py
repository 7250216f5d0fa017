import doctest
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.agents import coop, coop_context, coop_decision
from thrifty.agents.coop import CoopConfig, collect_expert_transcript, random_decision, run_coop_episode
from thrifty.agents.coop_context import (CoopContext, Record, RecordError, SharedContextTokens, parse_records,
                                         team_state)
from thrifty.agents.coop_decision import DEFAULT_DECISION, parse_decision
from thrifty.agents.coop_expert import expert_decide, expert_decision
from thrifty.envs import coop_grid
from thrifty.envs.coop_grid import all_object_names

NAMES = all_object_names()


class ByteTokenizer:
    """Stand-in tokenizer: one token per byte, bos = 256."""

    bos_token_id = 256

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode()


@pytest.mark.parametrize("module", [coop_grid, coop_decision, coop_context, coop])
def test_docstring_examples_run(module):
    assert doctest.testmod(module, raise_on_error=True).failed == 0


# ------------------------------------------------------------------------------------------------ the buffer

@st.composite
def contexts(draw):
    """A context built by a random but legal sequence of contributions, with every intermediate rendering."""
    k = draw(st.integers(2, 8))
    targets = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    ctx = CoopContext.start(coop_grid.mission_text(targets), k, 3, 3, max_records=draw(st.sampled_from([None, 30])))
    renders = [(ctx.epoch, ctx.render())]
    rng = random.Random(draw(st.integers(0, 10**6)))
    ctx.start_round()
    for _ in range(draw(st.integers(1, 60))):
        op = draw(st.sampled_from(["obs", "call", "event", "round", "plan"]))
        agent = draw(st.integers(0, k - 1))
        if op == "obs":
            objs = draw(st.dictionaries(st.sampled_from(NAMES), st.integers(0, 8), max_size=3))
            ctx.add_observation(agent, draw(st.integers(0, 8)), objs)
        elif op == "call":
            ctx.begin_call(agent)
            ctx.add_decision(agent, random_decision(ctx, rng))
        elif op == "event":
            if draw(st.booleans()):
                ctx.add_event(f"reached {draw(st.sampled_from(NAMES))}", agent)
            else:
                ctx.add_event(f"explored room {draw(st.integers(0, 8))}")
        elif op == "round":
            ctx.start_round()
        else:
            ctx.add_plan()
        renders.append((ctx.epoch, ctx.render()))
    return ctx, renders


@settings(max_examples=60, deadline=None)
@given(contexts())
def test_rendering_is_append_only_and_round_trips(built):
    ctx, renders = built
    for (e0, a), (e1, b) in zip(renders, renders[1:]):
        if e0 == e1:
            assert b.startswith(a), "a rendered record changed or something was inserted before it"
        else:  # a compaction: the task lines stay, then the round that carries the summary
            assert b.split("\n")[2].startswith("round ") and b.split("\n")[3].startswith("known: ")
    assert parse_records(ctx.render()) == ctx.visible_records()
    # the state told by the compacted text equals the state told by the whole history
    assert team_state(ctx.visible_records()) == team_state(ctx.records)


def test_token_spans_and_stable_prefix():
    tok = ByteTokenizer()
    tokens = SharedContextTokens(tok)
    decide_calls = []

    def decide(ctx, agent):
        ids, spans = tokens.call(ctx, agent)
        text = tok.decode(ids)
        assert text.startswith("task: ") and text.endswith(f"r{agent} do:")
        assert tok.decode(ids[slice(*spans["task"])]).startswith("task: ")
        assert tok.decode(ids[slice(*spans["task"])]).split("\n")[1].startswith("rule: ")
        assert tok.decode(ids[slice(*spans["role"])]).startswith(f"r{agent} role: ")
        own = tok.decode(ids[slice(*spans["own_observation"])])
        assert own.startswith(f"r{agent} obs: room ") or (own.startswith("known: ") and f"r{agent} " in own)
        assert spans["stable_prefix"] == (0, spans["role"][0]) and spans["observation"][1] == len(ids)
        decide_calls.append((ctx.epoch, ids))
        return expert_decide(ctx, agent)

    result = run_coop_episode(decide, 4, seed=3, config=CoopConfig(max_records=40))
    assert result["success"] and result["compactions"] >= 1
    for (e0, a), (e1, b) in zip(decide_calls, decide_calls[1:]):
        if e0 == e1:
            assert b[:len(a)] == a, "a later call does not extend an earlier one token for token"


def test_compacted_context_still_guides_the_expert():
    full = run_coop_episode(expert_decide, 8, seed=4, config=CoopConfig(max_records=None))
    small = run_coop_episode(expert_decide, 8, seed=4, config=CoopConfig(max_records=40))
    assert small["compactions"] >= 1 and full["compactions"] == 0
    assert small["decisions"] == full["decisions"]  # the summary keeps everything the expert reads
    assert len(small["final_context"]) < len(full["final_context"])


def test_context_size_grows_with_the_team():
    tok = ByteTokenizer()
    sizes = {k: run_coop_episode(expert_decide, k, seed=1, tokenizer=tok)["context_tokens_max"] for k in (2, 8)}
    assert sizes[8] > sizes[2]


@pytest.mark.parametrize("args, message", [
    (("obs", 0, 1, "room x"), "malformed 'obs' payload"),
    (("plan", 0, 2, "r0 -"), "belongs to the team"),
    (("do", 0, 1, "goto pink ball"), "malformed decision record"),
    (("do", 0, None, "wait"), "needs an agent"),
    (("env", 0, 1, "explored room 3"), "'explored' events do not"),
    (("gossip", 0, 1, "hi"), "record kind must be one of"),
    (("obs", -1, 1, "room 1"), "round must be"),
    (("obs", 0, 1, "room 1\nr2 obs: room 3"), "one stripped line"),
    (("task", 0, None, "find the pink ball | robots 4 | rooms 3x3"), "unknown target object"),
])
def test_malformed_records_are_refused_clearly(args, message):
    with pytest.raises(ValueError, match=message):
        Record(*args)


def test_bad_context_input_is_refused_clearly():
    with pytest.raises(RecordError, match="line 2 is not a record"):
        parse_records("task: find the red ball | robots 2 | rooms 3x3\nhello world\n")
    with pytest.raises(RecordError, match="n_robots must be an integer in 2..8"):
        CoopContext.start("find the red ball", 9, 3, 3)
    ctx = CoopContext.start("find the red ball", 2, 3, 3)
    ctx.start_round()
    with pytest.raises(RecordError, match="must follow begin_call"):
        ctx.add_decision(0, "wait")
    with pytest.raises(RecordError, match="agent must be in 0..1"):
        ctx.add_observation(2, 0)


def test_conflicting_claims_are_recorded():
    ctx = CoopContext.start("find the red ball", 2, 3, 3)
    ctx.start_round()
    ctx.add_observation(0, 0, {"red ball": 1})
    for agent in (0, 1):
        ctx.begin_call(agent)
        ctx.add_decision(agent, "goto red ball | claim: red ball")
    assert ctx.render().endswith("r1 conflict: red ball held by r0\n")


# ------------------------------------------------------------------------------------------------ decisions

@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(st.sampled_from(
    ["do:", " goto", " explore", " wait", " red", " ball", " room", " 4", " 12", " |", " claim:", " drop:", " -",
     "\n", " key", "|claim: red ball"]), max_size=12).map("".join), st.none(), st.integers()))
def test_decision_parser_never_raises(text):
    decision, error = parse_decision(text, known_objects={"red ball", "blue key"}, n_rooms=9)
    assert (decision is None) != (error is None)
    if decision is not None:  # whatever it accepts renders back to itself
        assert parse_decision(decision.text(), {"red ball", "blue key"}, 9)[0] == decision


def test_parser_accepts_everything_the_expert_emits():
    for k in (2, 4, 8):
        for seed in range(5):
            t = collect_expert_transcript(k, seed)
            assert t["success"]
            for call in t["calls"]:
                assert parse_decision(call["label"], set(NAMES), 9)[1] is None


@pytest.mark.parametrize("text, message", [
    ("goto blue key", "unknown object 'blue key'; known objects: red ball"),
    ("explore 9", "room 9 does not exist; rooms are 0..8"),
    ("goto red ball | claim: room 3", "must be the action's own item"),
    ("wait | drop: room 1 | drop: room 2", "given twice"),
    ("explore 1 | owner: r2", "a field reads"),
    ("fly to the moon", "the action must be"),
    ("", "empty decision"),
])
def test_bad_decisions_get_clear_messages(text, message):
    decision, error = parse_decision(text, known_objects={"red ball"}, n_rooms=9)
    assert decision is None and message in error


def test_default_and_expert_texts():
    assert DEFAULT_DECISION.text() == "wait"
    ctx = CoopContext.start("find the red ball", 2, 3, 3)
    ctx.start_round()
    ctx.add_observation(0, 4, {"red ball": 3})
    ctx.add_observation(1, 0)
    ctx.add_plan()
    assert expert_decision(ctx.state(), 0).text() == "goto red ball | claim: red ball"
    assert expert_decide(ctx, 1) == " explore 0 | claim: room 0"


def test_expert_transcript_layout():
    t = collect_expert_transcript(4, seed=2, noise=0.3, config=CoopConfig(max_records=50))
    assert len(t["epochs"]) >= 2
    assert any(c["label"] != c["taken"] for c in t["calls"])
    for c in t["calls"]:
        text = t["epochs"][c["epoch"]]
        assert text[:c["prompt_end"]].endswith(f"r{c['agent']} do:")
        assert text[c["prompt_end"]:].startswith(f" {c['taken']}\n")


def test_role_line_lists_what_the_expert_chooses_from():
    """The caller's role line names its free targets (with rooms) and free rooms, as the records above it tell;
    a new `goto` / `explore` claim of the expert always picks from those lists."""
    checked = {"goto": 0, "explore": 0}

    def decide(ctx, agent):
        state = ctx.state()
        role = ctx.records[-1]
        assert role.kind == "role" and role.agent == agent
        _, targets, rooms = role.payload.split(" | ")
        listed = [] if targets == "targets -" else targets.removeprefix("targets ").split(", ")
        assert listed == [f"{t} {state.objects[t]}" for t in state.free_targets(agent)]
        assert rooms == "rooms " + (" ".join(map(str, state.free_rooms(agent))) or "-")
        d = expert_decision(state, agent)
        if d.claim is not None:
            kind = d.action.kind
            checked[kind] += 1
            if kind == "goto":
                assert d.claim in {x.rpartition(" ")[0] for x in listed}
            else:
                assert str(d.claim) in rooms.split()[1:]
        return " " + d.text()

    for k, seed in ((2, 0), (4, 3), (8, 5)):
        assert run_coop_episode(decide, k, seed)["success"]
    assert checked["goto"] > 0 and checked["explore"] > 0
