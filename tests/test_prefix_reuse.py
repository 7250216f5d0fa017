"""prefix_reuse and composed: reused prefixes give recomputed logits, hit accounting, reuse with pruning."""

from dataclasses import dataclass, field
from functools import lru_cache

import pytest
import torch

from thrifty.backbones import SUPPORTED_FAMILIES, HFDecoder, tiny_model
from thrifty.cost import PrefixHitCounter, forward_flops
from thrifty.runtime import Session
from thrifty.techniques import (REGISTRY, Composed, CompositionError, DecisionContext, PrefixReuse, Technique,
                                UnknownTechniqueError, build)

TOL = 1e-5
MISSION = list(range(10, 16))  # 6 tokens
PROMPT = [3]  # the decision prompt ("act:")


@lru_cache(maxsize=None)
def backbone(family="llama"):
    return HFDecoder.from_model(tiny_model(family))


def _obs(step, n=5):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(20, 256, (n,), generator=g).tolist()


class Context:
    """A hand-made append-only planner context with the planner's spans."""

    def __init__(self, mission=MISSION):
        self.ids = [1] + list(mission)
        self.spans = {"mission": (1, len(self.ids))}

    def observe(self, obs):
        start = len(self.ids)
        self.ids += list(obs) + PROMPT
        self.spans["stable_prefix"] = (0, start)
        self.spans["observation"] = (start, len(self.ids))

    def act(self, action_ids):
        self.ids += list(action_ids)

    def decision(self, seed=0):
        return DecisionContext(torch.tensor(self.ids), dict(self.spans), seed)


def decide(technique, bb, ctx, max_new=2):
    """What TextPlanner.decide does with a technique; returns (prefill logits [vocab], generated, new_from, works)."""
    session, new_from = technique.open_session(bb, ctx)
    hook = technique.prefill_hook(ctx, bb.n_layers, new_from)
    pre = session.extend(ctx.token_ids[new_from:], logits="last", layer_hook=hook)
    decode_from = session.next_position
    out = session.decode(max_new)
    technique.close_session(session, ctx, decode_from)
    flops = forward_flops(bb.shape, pre.works, 1) + sum(forward_flops(bb.shape, w, 1) for w in out.works)
    return pre.logits[-1], out.token_ids, new_from, session, flops


def recompute(bb, ids):
    return Session(bb).extend(ids).logits[-1]


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_reused_prefix_logits_equal_recomputed_logits(family):
    bb = backbone(family)
    t = build("prefix_reuse")
    ctx = Context()
    for step in range(6):
        ctx.observe(_obs(step))
        d = ctx.decision()
        logits, generated, new_from, _, _ = decide(t, bb, d)
        assert (logits - recompute(bb, ctx.ids)).abs().max() <= TOL
        assert new_from == (0 if step == 0 else ctx.spans["stable_prefix"][1] - (2 if step % 2 == 0 else 0))
        # odd steps append what was generated (reused next time), even steps something else (rolled back)
        ctx.act(generated if step % 2 == 0 else [generated[0] ^ 1, 2])


def test_hit_accounting_matches_a_hand_made_sequence():
    bb = backbone()
    t = build("prefix_reuse", store_bytes=1 << 24)
    counter = PrefixHitCounter()
    ctx = Context()
    ctx.observe(_obs(0))                                   # 1 + 6 + 5 + 1 = 13 tokens, nothing cached
    _, gen, n0, _, _ = decide(t, bb, ctx.decision())
    ctx.act(gen)                                           # the generated action itself: reusable
    ctx.observe(_obs(1))                                   # 13 + 2 + 6 = 21
    _, gen, n1, _, _ = decide(t, bb, ctx.decision())
    ctx.act([gen[0] ^ 1, gen[1]])                          # a replaced action: differs from its first token
    ctx.observe(_obs(2))                                   # 21 + 2 + 6 = 29
    _, _, n2, _, _ = decide(t, bb, ctx.decision())
    t.reset()                                              # a new episode, same mission: the store serves it
    other = Context()
    other.observe([7] + _obs(3, 4))                        # 13 tokens; shares <bos> + mission (7) with the store
    _, _, n3, _, _ = decide(t, bb, other.decision())
    assert (n0, n1, n2, n3) == (0, 13 + 2, 21, 7)
    assert t.report()["reuse_source"] == "store"
    for prompt, cached in [(13, n0), (21, n1), (29, n2), (13, n3)]:
        counter.add(prompt, cached)
    assert counter.hit_rate == pytest.approx((0 + 15 + 21 + 7) / (13 + 21 + 29 + 13))
    # a context identical to what is cached still recomputes its last token
    t.reset()
    assert decide(t, bb, other.decision())[2] == 12


def test_noop_setting_is_the_full_model():
    bb = backbone()
    t = build("prefix_reuse", keep_session=False, store_bytes=0)
    assert t.is_noop and t.store is None
    ctx = Context()
    for step in range(3):
        ctx.observe(_obs(step))
        logits, gen, new_from, _, _ = decide(t, bb, ctx.decision())
        assert new_from == 0 and torch.equal(logits, recompute(bb, ctx.ids))
        ctx.act(gen)


def test_store_only_serves_across_episodes_and_keeps_its_budget():
    bb = backbone()
    t = build("prefix_reuse", keep_session=False, store_bytes=40_000)
    ctx = Context()
    for step in range(8):
        ctx.observe(_obs(step))
        logits, gen, new_from, _, _ = decide(t, bb, ctx.decision())
        assert (logits - recompute(bb, ctx.ids)).abs().max() <= TOL
        assert t.store.nbytes <= 40_000
        ctx.act(gen)
    assert t.store.evicted_bytes > 0 and t.report()["reuse_source"] in ("store", "none")
    with pytest.raises(ValueError, match="store_bytes"):
        build("prefix_reuse", store_bytes=-1)
    with pytest.raises(ValueError, match="store_name"):
        build("prefix_reuse", store_bytes=0, store_name="agents")


def test_named_store_is_shared_between_agents():
    bb = backbone()
    a = build("prefix_reuse", store_name="team-test", store_bytes=1 << 22)
    b = build("prefix_reuse", store_name="team-test", store_bytes=1 << 22)
    assert a.store is b.store
    ctx = Context()
    ctx.observe(_obs(0))
    decide(a, bb, ctx.decision())
    assert decide(b, bb, ctx.decision())[2] == len(ctx.ids) - 1


# ---------------------------------------------------------------------- composition with pruning


@dataclass
class DropEvenDeep(Technique):
    """Test-only pruning: after layer `at`, drop rows at even positions (never the final one)."""

    name = "drop_even_deep"
    at: int = 1
    seen: list = field(default_factory=list, repr=False)

    def prefill_hook(self, ctx, n_layers, new_from):
        def hook(layer, h, positions):
            self.seen.append(positions.clone())
            if layer != self.at:
                return None
            keep = (positions % 2 == 1) | (positions == positions[-1])
            return torch.nonzero(keep).flatten()

        return hook


def test_prune_at_prefill_prunes_only_new_tokens_and_pruned_stays_pruned():
    bb = backbone()
    pruner = DropEvenDeep()
    comp = Composed([PrefixReuse(store_bytes=0), pruner], prune_at="prefill")
    alone = build("prefix_reuse", store_bytes=0)
    pruned_full = DropEvenDeep()
    ctx = Context()
    pruned = set()
    for step in range(8):
        ctx.observe(_obs(step))
        d = ctx.decision()
        stable_end = ctx.spans["stable_prefix"][1]
        pruner.seen.clear()
        logits, gen, _, session, flops = decide(comp, bb, d)
        assert all(int(p.min()) >= stable_end for p in pruner.seen)  # hooks never see the stable prefix
        pruned |= {p for p in range(stable_end, len(ctx.ids) - 1) if p % 2 == 0}
        deep = set(session.positions[bb.n_layers - 1].tolist())
        shallow = set(session.positions[0].tolist())
        assert not (pruned & deep) and pruned <= shallow  # pruned once, out of deep layers for good
        assert set(range(ctx.spans["mission"][1])) <= deep  # the mission (stable at step 0) is kept
        _, _, _, _, flops_alone = decide(alone, bb, d)
        _, _, _, _, flops_pruned = decide(pruned_full, bb, d)
        if step >= 2:
            assert flops < flops_alone and flops < flops_pruned
        ctx.act(gen)
    assert comp.report() == {"prefix_reuse": comp.parts[0].report()}


def test_prune_at_history_settles_last_decisions_tokens_once():
    """Default: the current observation goes whole through every layer; at the next decision the hooks choose
    (once, on the hidden states recorded at its prefill) which of its tokens leave the deep layers."""
    bb = backbone()
    pruner = DropEvenDeep()
    reuse = PrefixReuse(store_bytes=1 << 22)
    comp = Composed([reuse, pruner])
    assert comp.prune_at == "history" and reuse.settled_only
    alone = build("prefix_reuse", store_bytes=0)
    pruned_full = DropEvenDeep()
    ctx = Context()
    pruned, last = set(), None
    for step in range(8):
        ctx.observe(_obs(step))
        d = ctx.decision()
        stable_end = ctx.spans["stable_prefix"][1]
        pruner.seen.clear()
        logits, gen, _, session, flops = decide(comp, bb, d)
        if last is not None:  # the previous decision's observation and prompt, now history
            assert all(set(p.tolist()) <= set(range(*last)) for p in pruner.seen)
            pruned |= {p for p in range(last[0], last[1] - 1) if p % 2 == 0}
            assert comp.report()["composed"]["settled_tokens"] == last[1] - last[0]
        else:
            assert pruner.seen == []
        deep = set(session.positions[bb.n_layers - 1].tolist())
        assert not (pruned & deep) and pruned <= set(session.positions[1].tolist())
        assert set(range(stable_end, len(ctx.ids))) <= deep  # the current observation is whole
        # the store holds only settled history: the stable prefix
        assert reuse.store.match(bb, ctx.ids, reuse.namespace) == stable_end
        _, _, _, _, flops_alone = decide(alone, bb, d)
        _, _, _, _, flops_pruned = decide(pruned_full, bb, d)
        if step >= 2:
            assert flops < flops_alone and flops < flops_pruned
        last = (stable_end, len(ctx.ids))
        ctx.act(gen)


def test_prune_at_history_with_a_hook_that_keeps_everything_is_exact():
    bb = backbone()
    comp = Composed([PrefixReuse(store_bytes=0), DropEvenDeep(at=99)])
    ctx = Context()
    for step in range(5):
        ctx.observe(_obs(step))
        logits, gen, *_ = decide(comp, bb, ctx.decision())
        assert (logits - recompute(bb, ctx.ids)).abs().max() <= TOL
        ctx.act(gen)


@pytest.mark.parametrize("prune_at", ["history", "prefill"])
def test_reuse_with_random_pruning(prune_at):
    bb = backbone()
    settings = {"keep_ratio": 0.5, "layers": (1, 2), "sink_tokens": 0, "recent_tokens": 1, "protect": ("mission",)}
    comp = build("composed", techniques=["prefix_reuse", "random_pruning"], prune_at=prune_at,
                 part_settings={"prefix_reuse": {"store_bytes": 0}, "random_pruning": settings})
    alone = build("prefix_reuse", store_bytes=0)
    ctx = Context()
    for step in range(6):
        ctx.observe(_obs(step, n=12))
        _, gen, _, session, flops = decide(comp, bb, ctx.decision(seed=step))
        _, _, _, _, flops_alone = decide(alone, bb, ctx.decision(seed=step))
        if step >= 2:
            assert flops < flops_alone
            assert session.kv_lengths()[3] < session.kv_lengths()[0]
        ctx.act(gen)
    assert "random_pruning" in comp.report()


def test_composition_without_a_pruner_equals_reuse_alone():
    bb = backbone()
    comp = build("composed", techniques=["prefix_reuse", "full"], part_settings={"prefix_reuse": {"store_bytes": 0}})
    alone = build("prefix_reuse", store_bytes=0)
    ctx = Context()
    for step in range(4):
        ctx.observe(_obs(step))
        a = decide(comp, bb, ctx.decision())
        b = decide(alone, bb, ctx.decision())
        assert torch.equal(a[0], b[0]) and a[1:3] == b[1:3]
        ctx.act(a[1])
    assert comp.settings() == {"techniques": ["prefix_reuse", "full"], "prune_at": "history",
                               "part_settings": {"prefix_reuse": alone.settings(), "full": {}}}


@dataclass
class WholeContextWindow(Technique):
    name = "whole_context_window"

    def kept_cache_conflict(self):
        return "it keeps a window relative to the newest token, so history would be evicted every decision"


@dataclass
class OtherSessionProvider(Technique):
    name = "other_session_provider"

    def open_session(self, backbone, ctx):
        return Session(backbone), 0


def test_combinations_that_cannot_work_are_refused():
    with pytest.raises(CompositionError, match="sink_window cannot be combined with prefix_reuse"):
        build("composed", techniques=["prefix_reuse", "sink_window"])
    with pytest.raises(CompositionError, match="keep_session=False"):
        Composed([PrefixReuse(keep_session=False), DropEvenDeep()])
    Composed([PrefixReuse(keep_session=False), DropEvenDeep()], prune_at="prefill")
    with pytest.raises(CompositionError, match="prune_at"):
        build("composed", techniques=["prefix_reuse"], prune_at="later")
    with pytest.raises(CompositionError, match="window relative to the newest token"):
        Composed([PrefixReuse(store_bytes=0), WholeContextWindow()])
    Composed([WholeContextWindow(), DropEvenDeep()])  # no kept session: fine
    with pytest.raises(CompositionError, match="provide the session"):
        Composed([PrefixReuse(store_bytes=0), OtherSessionProvider()])
    with pytest.raises(CompositionError, match="twice"):
        build("composed", techniques=["prefix_reuse", "prefix_reuse"])
    with pytest.raises(CompositionError, match="not parts"):
        build("composed", techniques=["prefix_reuse"], part_settings={"token_prunin": {}})
    with pytest.raises(CompositionError, match="composed cannot contain composed"):
        build("composed", techniques=["composed"])
    with pytest.raises(CompositionError):
        build("composed", techniques=[])
    with pytest.raises(UnknownTechniqueError):
        build("composed", techniques=["no_such_technique"])


def test_store_namespace_names_the_pruning_policy():
    a = Composed([PrefixReuse(store_bytes=1 << 20), DropEvenDeep(at=1)])
    b = Composed([PrefixReuse(store_bytes=1 << 20), DropEvenDeep(at=2)])
    alone = PrefixReuse(store_bytes=1 << 20)
    assert alone.namespace == "" and a.parts[0].namespace != b.parts[0].namespace
    assert "drop_even_deep" in a.parts[0].namespace


def test_registered():
    assert REGISTRY["prefix_reuse"] is PrefixReuse and REGISTRY["composed"] is Composed


# ---------------------------------------------------------------------- closed loop


def test_episode_with_reuse_takes_the_same_actions_as_full(tiny_planner_dir):
    from thrifty.agents.planner import EpisodeConfig, TextPlanner, run_episode
    from thrifty.envs import eval_seed

    planner = TextPlanner.load(tiny_planner_dir)
    full = run_episode(planner, "GoToLocal", eval_seed(3), EpisodeConfig(max_steps=12))
    planner.technique = build("prefix_reuse")
    reuse = run_episode(planner, "GoToLocal", eval_seed(3), EpisodeConfig(max_steps=12))
    assert reuse["actions"] == full["actions"] and reuse["success"] == full["success"]
    contexts = reuse["per_decision"]["tokens_context"]
    assert reuse["per_decision"]["tokens_context"] == full["per_decision"]["tokens_context"]
    assert reuse["prefix_tokens_reused_total"] >= sum(contexts[:-1])  # at least every earlier context
    assert reuse["flops_total"] < full["flops_total"] / 2


def test_reuse_profile_replays_the_same_contexts(tiny_planner_dir, tmp_path):
    from thrifty.bench.reuse_profile import forced_trajectory, profile_reuse

    traj = forced_trajectory("GoToLocal", 1_000_000_003, steps=30)
    assert len(traj.actions) == len(traj.observations) == 30  # the expert alone ends GoToLocal far sooner
    assert traj.forced > 0
    doc = profile_reuse(tiny_planner_dir, out_dir=tmp_path, level="GoToLocal", steps=6, report_steps=(3, 6),
                        warmup=0, repeats=1)
    full, reuse = doc["arms"]["full"], doc["arms"]["prefix_reuse"]
    assert full["tokens_context"] == reuse["tokens_context"]
    assert reuse["flops"][-1] < full["flops"][-1] and reuse["prefix_tokens_reused"][0] == 0
    assert {(r["arm"], r["step"]) for r in doc["summary"]} == {(a, s) for a in ("full", "prefix_reuse") for s in (3, 6)}
    for r in doc["summary"]:  # measured speedup over the FLOPs ratio; full against itself is 1
        assert r["efficiency_vs_full"] == pytest.approx(r["speedup_vs_full"] * r["flops_vs_full"])
        if r["arm"] == "full":
            assert r["efficiency_vs_full"] == pytest.approx(1.0)
    assert (tmp_path / "profile.json").is_file() and (tmp_path / "profile.png").is_file()
