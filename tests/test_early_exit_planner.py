"""The `early_exit` technique on an LM planner (DeeR-VLA's dynamic early exit, issue 16).

Invariants: an exit forced to the last layer is the full model (logits and actions); an exit at layer d runs d
layers and leaves the deeper layers' caches without the decision's tokens, and a later decision then equals the full
forward with those tokens hidden from the deeper layers; the solved thresholds give the target exit distribution on
the head's own held-out scores; composition with prefix reuse and pruning runs. Bad inputs get clear errors.
"""

import json
import math

import numpy as np
import pytest
import torch

from thrifty.agents.planner import EpisodeConfig, PlannerContext, TextPlanner, run_episode
from thrifty.agents.planner_exits import ExitHeadError, consistency, load_exit_head
from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv
from thrifty.runtime import Session
from thrifty.techniques import DecisionContext, build
from thrifty.techniques.composed import CompositionError
from thrifty.techniques.early_exit import EarlyExit, exit_indices, target_distribution
from thrifty.train.exits import ExitsRecipe, train_exits

SEED = 1_000_000_003


@pytest.fixture(scope="module")
def head_dir(tiny_planner_dir, tmp_path_factory):
    """A head for the tiny 3-layer planner, trained on a few of its own rollouts."""
    out = tmp_path_factory.mktemp("exits")
    recipe = ExitsRecipe(levels=["GoToLocal"], episodes_per_level=4, max_steps=12, steps=60, heldout_share=0.5)
    return train_exits(tiny_planner_dir, out / "head", out / "run", recipe, progress=False)


@pytest.fixture(scope="module")
def planner(tiny_planner_dir):
    return TextPlanner.load(tiny_planner_dir)


def _with(planner, technique):
    return TextPlanner(planner.backbone, planner.tokenizer, technique, planner.max_new_tokens)


def test_exit_forced_to_the_last_layer_is_the_full_model(planner, head_dir):
    n = planner.backbone.n_layers
    never = build("early_exit", exit_ratio=None, thresholds=[-math.inf] * (n - 1), head=str(head_dir))
    for technique in (never, build("composed", techniques=["prefix_reuse", never],
                                   part_settings={"prefix_reuse": {"store_bytes": 0}})):
        full = run_episode(_with(planner, build("full")), "GoToLocal", SEED, EpisodeConfig(max_steps=8))
        got = run_episode(_with(planner, technique), "GoToLocal", SEED, EpisodeConfig(max_steps=8))
        assert got["actions"] == full["actions"]
        assert got["per_decision"]["exit_layer"] == [n] * got["decisions"]
    # and the logits of one decision, through the session
    ids = _context_ids(planner, 3)
    hook = never.exit_hook(planner.backbone, DecisionContext(token_ids=ids, spans={}))
    a = Session(planner.backbone).extend(ids, exit_hook=hook)
    b = Session(planner.backbone).extend(ids)
    assert a.exited_after is None
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=0)


def _context_ids(planner, steps):
    env = BabyAITextEnv("GoToLocal")
    obs, info = env.reset(seed=SEED)
    ctx = PlannerContext(planner.tokenizer)
    ctx.start(info["mission"])
    for _ in range(steps):
        ctx.add_observation(obs)
        action = env.expert_action()
        ctx.add_action(action)
        obs, *_ = env.step(ACTIONS.index(action))
    ctx.add_observation(obs)
    return torch.tensor(ctx.ids)


def test_an_exit_runs_fewer_layers_and_keeps_deep_caches_without_its_tokens(planner, head_dir):
    bb = planner.backbone
    ids = _context_ids(planner, 3)
    t = build("early_exit", exit_ratio=None, max_layer=2, head=str(head_dir))  # always exits at layer 2 of 3
    session = Session(bb)
    first = session.extend(ids[:20])
    res = session.extend(ids[20:], exit_hook=t.exit_hook(bb, DecisionContext(token_ids=ids, spans={})))
    assert res.exited_after == 1 and len(res.works) == 2 and res.logits.numel() == 0
    assert t.exit_text() in ACTIONS and t.report()["exit_layer"] == 2
    assert session.kv_lengths() == [len(ids), len(ids), 20]
    with pytest.raises(RuntimeError, match="logits of the final appended token"):
        session.decode(2)
    assert first.exited_after is None
    # a later decision that runs every layer equals the full forward with the exited tokens hidden at layer 3
    more = torch.tensor(planner.tokenizer.encode(" left\nobs: x\nact:", add_special_tokens=False))
    later = session.extend(more)
    all_ids = torch.cat([ids, more])
    pos = torch.arange(len(all_ids))
    with torch.no_grad():
        h = bb.embed(all_ids[None])
        for l in range(bb.n_layers):
            hide = ~torch.isin(pos, session.positions[l])
            hide = hide[None, :] & ~torch.eye(len(all_ids), dtype=torch.bool)
            mask = bb.attention_mask(pos, pos, l).masked_fill(hide[None, None], torch.finfo(bb.dtype).min)
            h = bb.run_layer(l, h, pos, mask, None)
        want = bb.logits(h[0, -1])
    torch.testing.assert_close(later.logits[-1], want, atol=1e-5, rtol=0)


def test_the_action_is_the_head_argmax_at_the_exit_and_flops_count_the_layers_run(planner, head_dir):
    t = build("early_exit", exit_ratio=None, max_layer=2, head=str(head_dir))
    res = run_episode(_with(planner, t), "GoToLocal", SEED, EpisodeConfig(max_steps=5))
    assert res["per_decision"]["exit_layer"] == [2] * res["decisions"]
    assert res["unparseable"] == 0  # the head always names an action
    full = run_episode(_with(planner, build("full")), "GoToLocal", SEED, EpisodeConfig(max_steps=1))
    head = load_exit_head(head_dir).head
    # the exited decision: 2 of 3 layers, no output logits, one head call per layer from 1 on
    ex = _with(planner, build("early_exit", exit_ratio=None, max_layer=2, head=str(head_dir)))
    ctx = PlannerContext(planner.tokenizer)
    env = BabyAITextEnv("GoToLocal")
    obs, info = env.reset(seed=SEED)
    ctx.start(info["mission"])
    ctx.add_observation(obs)
    text, rec = ex.decide(ctx)
    assert rec.exit_layer == 2 and rec.tokens_out == 0
    assert rec.flops == rec.prefill_flops + 2 * head.flops()
    assert rec.flops < full["per_decision"]["flops"][0]
    assert text == ex.technique.report()["action"]


def test_solved_thresholds_give_the_target_distribution_on_the_heads_scores(planner, head_dir):
    loaded = load_exit_head(head_dir, planner.backbone)
    n = planner.backbone.n_layers
    for r in (0.2, 1.0, 3.0):
        t = build("early_exit", exit_ratio=r, head=str(head_dir))
        t.bind(planner.backbone)
        b = t.budget
        scores = loaded.scores.numpy()
        got = np.bincount(exit_indices(scores, b["thresholds"]), minlength=n - 1) / scores.shape[1]
        want = target_distribution(r, n - 1)
        assert b["exit_layers"] == list(range(2, n + 1))
        assert np.all(np.abs(got - want) <= 1.0 / scores.shape[1] + 1e-9) or np.allclose(got, b["realised"])
        assert b["realised"] == pytest.approx(got.tolist())


def test_scores_are_total_variation_and_the_card_records_the_model(head_dir, planner):
    p = torch.tensor([0.5, 0.5, 0.0])
    q = torch.tensor([0.0, 0.5, 0.5])
    assert float(consistency(p, q)) == pytest.approx(0.5)
    card = json.loads((head_dir / "card.json").read_text())
    assert card["model"]["n_layers"] == planner.backbone.n_layers
    assert set(card["heldout_agreement_by_depth"]) == {"1", "2"}


@pytest.mark.filterwarnings("ignore::thrifty.techniques.pruning_common.PruningNoOpWarning")  # first decisions
def test_composes_with_prefix_reuse_and_pruning(planner, head_dir):
    ee = {"exit_ratio": None, "max_layer": 2, "head": str(head_dir)}
    for parts in (["prefix_reuse", "early_exit"], ["prefix_reuse", "random_pruning", "early_exit"]):
        settings = {"prefix_reuse": {"store_bytes": 2**20}, "early_exit": ee, "random_pruning": {"keep_ratio": 0.5}}
        t = build("composed", techniques=parts, part_settings={p: settings[p] for p in parts})
        assert "early_exit" in t.parts[0].namespace  # stored caches keep the exit policy apart
        res = run_episode(_with(planner, t), "GoToLocal", SEED, EpisodeConfig(max_steps=6))
        assert res["per_decision"]["exit_layer"] == [2] * res["decisions"]
        assert res["prefix_tokens_reused_total"] > 0
    no_reuse = build("composed", techniques=["random_pruning", "early_exit"],
                     part_settings={"early_exit": ee, "random_pruning": {"keep_ratio": 0.5}})
    res = run_episode(_with(planner, no_reuse), "GoToLocal", SEED, EpisodeConfig(max_steps=4))
    assert res["per_decision"]["exit_layer"] == [2] * res["decisions"]


def test_random_exits_replay_alike_and_follow_their_target(planner, head_dir):
    """The random baseline: the same decision seed draws the same exit; over many seeds the drawn depths follow the
    target whose mean depth was asked; the exit layer's head argmax is the action (one head call)."""
    t = build("early_exit", exit_ratio=None, criterion="random", mean_layers=2.5, head=str(head_dir))
    t.bind(planner.backbone)
    assert t.budget["target_mean_layers"] == pytest.approx(2.5)  # the 3-layer planner: exits at 2 or 3 (full)
    res = [run_episode(_with(planner, t), "GoToLocal", SEED, EpisodeConfig(max_steps=8)) for _ in range(2)]
    assert res[0]["per_decision"]["exit_layer"] == res[1]["per_decision"]["exit_layer"]
    assert res[0]["actions"] == res[1]["actions"]
    depths = []
    for seed in range(400):
        ctx = DecisionContext(torch.tensor([1, 2, 3]), {}, seed=seed)
        hook = t.exit_hook(planner.backbone, ctx)
        h = torch.randn(1, 1, planner.backbone.shape.d_model)
        depths.append(2 if hook(1, h) else 3)  # the session calls the hook after layer index 1 (depth 2) only
        assert hook(0, h) is False  # before the drawn layer nothing exits and the head is not called
    assert np.mean(depths) == pytest.approx(2.5, abs=0.08)  # 400 draws: standard error 0.025
    assert t.report()["head_flops"] in (0, load_exit_head(head_dir).head.flops())
    with pytest.raises(ValueError, match="not thresholds"):
        build("early_exit", exit_ratio=None, criterion="random", thresholds=[0.1, 0.2])
    with pytest.raises(ValueError, match="mean_layers sets the random baseline"):
        build("early_exit", exit_ratio=None, mean_layers=3.0)
    with pytest.raises(ValueError, match="criterion must be one of"):
        build("early_exit", criterion="oracle")
    with pytest.raises(ValueError, match="strictly between"):
        build("early_exit", exit_ratio=None, criterion="random", mean_layers=3.0, head=str(head_dir)).bind(
            planner.backbone)


def test_copies_share_the_loaded_head(planner, head_dir):
    import copy

    t = build("early_exit", exit_ratio=0.5, head=str(head_dir))
    t.bind(planner.backbone)
    twin = copy.deepcopy(t)
    assert twin._bound is t._bound and twin.settings() == t.settings()


def test_bad_inputs(planner, head_dir, tmp_path):
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="exit ratio"):
            build("early_exit", exit_ratio=bad)
    with pytest.raises(ValueError, match="either exit_ratio or thresholds"):
        build("early_exit", exit_ratio=0.5, thresholds=[0.1, 0.2])
    with pytest.raises(ValueError, match="min_layer"):
        build("early_exit", min_layer=1)
    with pytest.raises(ValueError, match="max_layer"):
        build("early_exit", max_layer=1)
    with pytest.raises(ValueError, match="list of numbers"):
        build("early_exit", exit_ratio=None, thresholds="0.1")
    with pytest.raises(ValueError, match="outside this 3-layer model"):
        build("early_exit", max_layer=7, head=str(head_dir)).bind(planner.backbone)
    with pytest.raises(ValueError, match="3 thresholds given"):
        build("early_exit", exit_ratio=None, thresholds=[0.1, 0.2, 0.3], head=str(head_dir)).bind(planner.backbone)
    with pytest.raises(ExitHeadError, match="no exit head"):
        build("early_exit", head=str(tmp_path / "nothing")).bind(planner.backbone)
    shipped = TextPlanner.load(__import__("thrifty.bench", fromlist=["SHIPPED_PLANNER"]).SHIPPED_PLANNER)
    with pytest.raises(ExitHeadError, match="trained for another model"):
        build("early_exit", head=str(head_dir)).bind(shipped.backbone)
    with pytest.raises(ValueError, match="recipe needs at least one level"):
        ExitsRecipe(levels=[])
    with pytest.raises(CompositionError, match="appears twice"):
        build("composed", techniques=["early_exit", "early_exit"])
    # a constrained decision (the coop planner's language) cannot take the head's action words
    t = _with(planner, build("early_exit", exit_ratio=None, max_layer=2, head=str(head_dir)))
    env = BabyAITextEnv("GoToLocal")
    obs, info = env.reset(seed=SEED)
    ctx = PlannerContext(planner.tokenizer)
    ctx.start(info["mission"])
    ctx.add_observation(obs)
    with pytest.raises(ValueError, match="constrained to another language"):
        t.decide(ctx, choose=lambda logits, emitted: int(logits.argmax()))


def test_noop_loads_nothing():
    t = build("early_exit", **EarlyExit.noop_settings)
    assert t.is_noop and t.exit_hook(None, None) is None


def test_the_coop_planner_refuses_early_exit(planner, head_dir):
    from thrifty.agents.coop_planner import CoopPlanner

    for t in (build("early_exit", head=str(head_dir)),
              build("composed", techniques=["prefix_reuse", "early_exit"])):
        with pytest.raises(ValueError, match="not supported on the coop planner"):
            CoopPlanner(planner.backbone, planner.tokenizer, t)


def test_the_shipped_head_fits_the_shipped_planner_and_its_suites_build():
    from thrifty.bench import SHIPPED_PLANNER
    from thrifty.bench.suites import check_configs, get_suite
    from thrifty.techniques.early_exit import SHIPPED_EXIT_HEAD

    shipped = TextPlanner.load(SHIPPED_PLANNER)
    loaded = load_exit_head(SHIPPED_EXIT_HEAD, shipped.backbone)  # raises for a head of another model
    assert loaded.scores.shape[0] == shipped.backbone.n_layers - 1
    for suite in ("exits", "demo"):
        check_configs(get_suite(suite).configs, SHIPPED_PLANNER)


def test_propagated_kv_equals_the_deeper_layers_projections_of_the_exit_state(planner, head_dir):
    bb = planner.backbone
    ids = _context_ids(planner, 2)
    t = build("early_exit", exit_ratio=None, max_layer=2, head=str(head_dir), deep_kv="propagate")
    assert t.propagates_on_exit()
    session = Session(bb)
    session.extend(ids[:20])
    res = session.extend(ids[20:], exit_hook=t.exit_hook(bb, DecisionContext(token_ids=ids, spans={})),
                         propagate_on_exit=True)
    q = len(ids) - 20
    assert res.exited_after == 1 and res.propagated == q
    assert session.kv_lengths() == [len(ids)] * 3
    # layer 2's new keys/values are its own projections of the hidden state after layer 1 (the exit)
    ref = Session(bb)
    ref.extend(ids[:20])
    with torch.no_grad():
        pos = torch.arange(20, len(ids))
        h = bb.embed(ids[20:][None])
        cache = __import__("thrifty.runtime.session", fromlist=["_LayerCache"])._LayerCache(
            list(ref._keys), list(ref._values), list(ref._bufs))
        for l in range(2):
            mask = bb.attention_mask(pos, torch.arange(len(ids)), l)
            h = bb.run_layer(l, h, pos, mask, cache)
        attn = bb.model.model.layers[2].self_attn
        k = attn.k_proj(bb.model.model.layers[2].input_layernorm(h))
    got_k = session.layer_kv(2)[0]  # [1, kv_heads, T, hd] (rotary applied)
    assert got_k.shape[-2] == len(ids)
    # compare before rotary by undoing nothing: check values (no rotary on values)
    v = attn.v_proj(bb.model.model.layers[2].input_layernorm(h)).view(1, q, -1, attn.head_dim).transpose(1, 2)
    torch.testing.assert_close(session.layer_kv(2)[1][:, :, 20:], v, atol=1e-5, rtol=0)
    assert k.shape[-1] == got_k.shape[1] * got_k.shape[-1]
    with pytest.raises(ValueError, match="deep_kv"):
        build("early_exit", deep_kv="copy")
