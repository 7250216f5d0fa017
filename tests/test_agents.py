import random

import pytest
import torch
from hypothesis import given, strategies as st

from thrifty.agents.planner import (DEFAULT_ACTION, WARMUP_DECISIONS, EpisodeConfig, PlannerContext, TextPlanner,
                                    parse_action, run_episode, warm_up)
from thrifty.agents.transcript import Transcript
from thrifty.envs import ACTIONS, eval_seed
from thrifty.train.planner import collect_episode, encode_episode

DETERMINISTIC = ("success", "steps", "decisions", "unparseable", "actions", "tokens_context_mean", "flops_total")


@given(st.text())
def test_parser_never_raises(text):
    out = parse_action(text)
    assert out is None or out in ACTIONS


@pytest.mark.parametrize("word", ACTIONS)
def test_parser_reads_action_words(word):
    assert parse_action(f" {word}\n") == word
    assert parse_action(f"{word.upper()}.") == word
    assert parse_action(f"{word} and more") == word


@pytest.mark.parametrize("text", ["", "   ", "\n", "fly", "go left", "<eos>", "lef t"])
def test_parser_rejects_non_actions(text):
    assert parse_action(text) is None


@pytest.fixture(scope="module")
def planner(tiny_planner_dir):
    return TextPlanner.load(tiny_planner_dir)


def test_context_matches_the_training_encoding(planner):
    """The agent builds exactly the token sequence the planner was trained on (no retokenisation drift)."""
    ep = collect_episode("PickupLoc", 3, 0.2, random.Random(1))
    ctx = PlannerContext(planner.tokenizer)
    ctx.start(ep["mission"])
    for obs, act in zip(ep["observations"], ep["taken"]):
        ctx.add_observation(obs)
        ctx.add_action(act)
    ids, labels = encode_episode(planner.tokenizer, ep, max_tokens=10_000)
    assert ctx.ids[:-1] == ids
    # every label sits on the token after an "act:" prompt and is an action word
    targets = [planner.tokenizer.decode([t]).strip() for t in labels if t != -100]
    assert set(targets) <= set(ACTIONS) | {""}


def test_context_is_append_only_and_spans_are_right(planner):
    ctx = PlannerContext(planner.tokenizer)
    ctx.start("go to the red ball")
    ctx.add_observation("facing east; carrying nothing; wall 2 ahead")
    before = list(ctx.ids)
    dec = planner.tokenizer.decode
    assert dec(ctx.ids[slice(*ctx.spans["mission"])]) == "mission: go to the red ball\n"
    assert dec(ctx.ids[slice(*ctx.spans["observation"])]) == "obs: facing east; carrying nothing; wall 2 ahead\nact:"
    ctx.add_action("left")
    ctx.add_observation("facing north; carrying nothing")
    assert ctx.ids[: len(before)] == before
    assert ctx.spans["stable_prefix"] == (0, ctx.spans["observation"][0])


def test_episode_is_deterministic_and_counts_unparseable(planner):
    a = run_episode(planner, "GoToLocal", eval_seed(5), EpisodeConfig(max_steps=12))
    b = run_episode(planner, "GoToLocal", eval_seed(5), EpisodeConfig(max_steps=12))
    assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}
    assert a["decisions"] == a["steps"] <= 12
    # an untrained planner mostly emits non-actions: they are counted and replaced, never a crash
    assert a["unparseable"] > 0
    assert a["actions"].count(DEFAULT_ACTION) >= a["unparseable"]
    assert a["flops_total"] > 0 and a["tokens_context_max"] > a["per_decision"]["tokens_context"][0]


@pytest.mark.filterwarnings("ignore::thrifty.techniques.pruning_common.PruningNoOpWarning")  # short contexts
def test_warm_up_leaves_the_technique_state_alone(tiny_planner_dir, tiny_pruner_path):
    """The warm-up decisions run on a copy of the technique: a prefix store shared across episodes is not filled by
    them, so the timed episodes are the same as without a warm-up; a pruner is loaded before the first timed one."""
    from thrifty.techniques import build

    def episodes(warm):
        planner = TextPlanner.load(tiny_planner_dir, technique=build("prefix_reuse"))
        made = warm_up(planner, "GoToLocal") if warm else 0
        return made, [run_episode(planner, "GoToLocal", eval_seed(i), EpisodeConfig(max_steps=8)) for i in (0, 0)]

    made, warmed = episodes(True)
    _, cold = episodes(False)
    assert made == WARMUP_DECISIONS
    for a, b in zip(warmed, cold):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}
        assert a["prefix_tokens_reused_total"] == b["prefix_tokens_reused_total"]
    first = [e["per_decision"]["prefix_tokens_reused"][0] for e in warmed]
    assert first[0] == 0 < first[1]  # the store serves the replayed episode, and had nothing from the warm-up
    pruning = TextPlanner.load(tiny_planner_dir, technique=build("token_pruning", keep_ratio=0.6,
                                                                 pruner=str(tiny_pruner_path)))
    assert pruning.technique.scorer is None
    assert warm_up(pruning, "GoToLocal", decisions=2) == 2 and pruning.technique.scorer is not None
    assert warm_up(pruning, "GoToLocal", decisions=0) == 0


def test_on_change_replanning_makes_fewer_or_equal_decisions(planner):
    every = run_episode(planner, "GoToLocal", eval_seed(2), EpisodeConfig(max_steps=15))
    on_change = run_episode(planner, "GoToLocal", eval_seed(2), EpisodeConfig(max_steps=15, replan="on_change"))
    assert on_change["decisions"] <= on_change["steps"]
    assert on_change["decisions"] <= every["decisions"]


def test_bad_replan_trigger():
    with pytest.raises(ValueError, match="every_step"):
        EpisodeConfig(replan="sometimes")


def test_decision_flops_match_the_session_work(planner):
    planner.reset()  # no draft from an earlier decision
    ctx = PlannerContext(planner.tokenizer)
    ctx.start("go to the red ball")
    ctx.add_observation("facing east; carrying nothing; wall 2 ahead")
    text, rec = planner.decide(ctx)
    from thrifty.cost import LayerWork, forward_flops
    shape = planner.backbone.shape
    T = len(ctx.ids)
    prefill = forward_flops(shape, [LayerWork.causal(T)] * shape.n_layers, n_logits=1)
    decode = sum(forward_flops(shape, [LayerWork.causal(1, T + i)] * shape.n_layers, 1) for i in range(rec.tokens_out))
    assert rec.prefill_flops == prefill and rec.flops == prefill + decode
    assert rec.tokens_per_layer == [T] * shape.n_layers and rec.exit_layer == shape.n_layers


def test_drafting_the_first_token_changes_no_decision_and_counts_its_work(planner):
    """Drafted first tokens (the first tokens of the planner's recent decisions, 1 or 3 alternatives) give the
    same texts as plain greedy decoding over a whole episode, through prefix reuse (a fresh session under sdpa
    drafts one token: its pass has no mask) and through full recompute; an accepted draft's work is in the
    prefill: the new token over the T - 1 reused ones, each of the 3 alternatives seeing the T tokens and itself,
    4 logit rows."""
    from thrifty.cost import LayerWork, forward_flops
    from thrifty.techniques import Full, build

    try:
        for technique in (Full(), build("prefix_reuse")):
            planner.technique = technique
            texts = {}
            for draft, width in ((False, 3), (True, 1), (True, 3)):
                planner.draft, planner.draft_width = draft, width
                planner.reset()
                res = run_episode(planner, "GoToLocal", eval_seed(4), EpisodeConfig(max_steps=12))
                texts[draft, width] = (res["actions"], res["unparseable"])
            assert texts[False, 3] == texts[True, 1] == texts[True, 3]
        planner.draft, planner.draft_width = True, 3
        planner.reset()
        ctx = PlannerContext(planner.tokenizer)
        ctx.start("go to the red ball")
        ctx.add_observation("facing east; carrying nothing; wall 2 ahead")
        first, _ = planner.decide(ctx)  # the kept session now holds the context but its last token
        right = planner.tokenizer.encode(first, add_special_tokens=False)[0]
        planner._recent_first = [(right + 1) % 50 + 3, right, (right + 2) % 50 + 3]  # the right one second
        text, rec = planner.decide(ctx)
        assert text == first and planner._recent_first[0] == right
        planner.draft = False
        assert planner.decide(ctx)[1].decode_passes == rec.decode_passes + 1  # the drafted token needed no pass
        shape, T = planner.backbone.shape, len(ctx.ids)
        assert rec.tokens_in == 1
        work = LayerWork(queries=4, pairs=T + 3 * (T + 1))
        assert rec.prefill_flops == forward_flops(shape, [work] * shape.n_layers, n_logits=4)
        assert rec.tokens_per_layer == [4] * shape.n_layers
    finally:
        planner.technique, planner.draft, planner.draft_width = Full(), True, 3
        planner.reset()


def test_drafts_pick_exactly_greedys_actions_with_the_shipped_planner_on_held_out_episodes():
    """The shipped planner through prefix reuse on evaluation seeds (never trained on), drafting off and with 3
    alternatives: the same actions and outputs at every decision, and the drafts accepted at most decisions."""
    from thrifty.bench import SHIPPED_PLANNER
    from thrifty.techniques import build

    shipped = TextPlanner.load(SHIPPED_PLANNER, technique=build("prefix_reuse"))
    runs, passes = {}, {False: 0, True: 0}
    for draft in (False, True):
        shipped.draft = draft
        for i in range(2):
            shipped.reset()
            res = run_episode(shipped, "GoToLocal", eval_seed(i), EpisodeConfig(max_steps=16))
            runs[draft, i] = (res["actions"], res["unparseable"])
            passes[draft] += res["decode_passes_total"]
    assert all(runs[False, i] == runs[True, i] for i in range(2))
    assert passes[True] < passes[False] / 2  # most decisions decoded nothing after the prefill
