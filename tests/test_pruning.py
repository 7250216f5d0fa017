"""Token pruning and its count-matched baselines: exactness, protection, masked reference, determinism, bad inputs."""

import warnings
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thrifty.backbones import HFDecoder, tiny_model
from thrifty.runtime import Session
from thrifty.techniques import REGISTRY, DecisionContext, build
from thrifty.techniques.base import forget_warnings
from thrifty.techniques.pruning_common import (PruneLayerError, PruningNoOpWarning, default_prune_layers,
                                               keep_counts, layer_tokens)
from thrifty.techniques.token_pruning import (PrunerFingerprintWarning, PrunerMismatchError, TokenPruning,
                                              TokenScorer, model_fingerprint)

PRUNERS = ("token_pruning", "random_pruning", "recency_pruning", "sink_window")
SPAN_KEEPERS = ("token_pruning", "random_pruning", "recency_pruning")  # sink_window honours no span by design
N_LAYERS = 6
TOL = 1e-5


@lru_cache(maxsize=None)
def backbone(family="llama", d=64, seed=0):
    return HFDecoder.from_model(tiny_model(family, seed=seed, num_hidden_layers=N_LAYERS, hidden_size=d))


@lru_cache(maxsize=None)
def scorer(d=64, layers=(1, 2, 3)):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TokenScorer(d, layers, {"n_layers": N_LAYERS, "model": "tiny"})


def technique(name, **kw):
    t = build(name, **kw)
    if name == "token_pruning" and not t.is_noop:
        t.use_scorer(scorer())
    return t


def context(n=90, mission=(1, 9), obs_len=20, seed=0):
    ids = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))
    spans = {"mission": mission, "observation": (n - obs_len, n), "stable_prefix": (0, n - obs_len)}
    return DecisionContext(ids, spans, seed=seed)


@pytest.fixture
def fresh_warnings():
    """As in a fresh process: no warning has been given yet (they are given once per process and technique)."""
    forget_warnings()


def prefill(t, ctx, bb=None, logits="last"):
    """Run a decision's prefill through the technique; returns the session and the extend result."""
    bb = bb or backbone()
    session, new_from = t.open_session(bb, ctx)
    hook = t.prefill_hook(ctx, bb.n_layers, new_from)
    return session, session.extend(ctx.token_ids[new_from:], logits=logits, layer_hook=hook)


def test_registered():
    assert set(PRUNERS) <= set(REGISTRY)


@pytest.mark.parametrize("name", PRUNERS)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_keep_one_is_exactly_the_full_model(name, family, fresh_warnings):
    bb = HFDecoder.from_model(tiny_model(family, num_hidden_layers=N_LAYERS))
    ctx = context()
    with pytest.warns(PruningNoOpWarning, match="no-op"):
        t = build(name, keep_ratio=1.0)
    s, r = prefill(t, ctx, bb, logits="all")
    full = Session(bb)
    ref = full.extend(ctx.token_ids, logits="all")
    assert torch.equal(r.logits, ref.logits) and r.works == ref.works
    assert s.decode(6).token_ids == full.decode(6).token_ids


@pytest.mark.parametrize("name", PRUNERS)
def test_prunes_and_matches_counts(name):
    ctx = context(n=120)
    ref = [w.queries for w in prefill(technique("recency_pruning", keep_ratio=0.6), ctx)[1].works]
    s, r = prefill(technique(name, keep_ratio=0.6), ctx)
    tokens = [w.queries for w in r.works]
    assert tokens == ref  # count-matched per layer by construction
    assert tokens[:2] == [120, 120] and tokens[2] < 120 and tokens == sorted(tokens, reverse=True)
    assert s.kv_lengths() == tokens
    assert int(r.positions_kept[-1]) == 119


def _kept_positions(session):
    return [set(p.tolist()) for p in session.positions]


@pytest.mark.filterwarnings("ignore::thrifty.techniques.pruning_common.PruningNoOpWarning")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(24, 96), m_start=st.integers(0, 10), m_len=st.integers(0, 12), obs=st.integers(1, 30),
       keep=st.floats(0.05, 0.95), sink=st.integers(0, 6), recent=st.integers(1, 20), seed=st.integers(0, 10**6),
       name=st.sampled_from(PRUNERS), schedule=st.sampled_from(["compound", "work"]))
def test_protected_spans_never_dropped(n, m_start, m_len, obs, keep, sink, recent, seed, name, schedule):
    mission = (m_start, min(n, m_start + m_len))
    obs = min(obs, n)
    ctx = DecisionContext(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)),
                          {"mission": mission, "observation": (n - obs, n)}, seed=seed)
    t = technique(name, keep_ratio=keep, schedule=schedule, sink_tokens=sink, recent_tokens=recent)
    s, r = prefill(t, ctx)
    protected = set(range(min(sink, n))) | set(range(max(0, n - recent), n))
    if name != "sink_window":
        protected |= set(range(*mission)) | set(range(n - obs, n))
    for layer_keys in _kept_positions(s):
        assert protected <= layer_keys
    # every technique keeps the same number of tokens per layer
    counts = [w.queries for w in r.works]
    other = technique("random_pruning", keep_ratio=keep, schedule=schedule, sink_tokens=sink, recent_tokens=recent)
    assert [w.queries for w in prefill(other, ctx)[1].works] == counts


def _masked_reference(bb, ids, drop_after: dict[int, int]):
    """Logits [T, vocab] of the whole sequence with nothing removed: a token dropped after layer j is hidden as a
    key from every other query in layers > j (it still sees itself)."""
    pos = torch.arange(len(ids))
    with torch.no_grad():
        h = bb.embed(ids[None])
        for l in range(bb.n_layers):
            mask = bb.attention_mask(pos, pos, l)
            hide = torch.zeros(len(ids), dtype=torch.bool)
            for p, j in drop_after.items():
                if l > j:
                    hide[p] = True
            hide = hide[None, :] & ~torch.eye(len(ids), dtype=torch.bool)
            mask = mask.masked_fill(hide[None, None], torch.finfo(bb.dtype).min)
            h = bb.run_layer(l, h, pos, mask, None)
        return bb.logits(h[0])


@pytest.mark.parametrize("name", PRUNERS)
def test_decode_after_pruned_prefill_equals_masked_reference(name):
    bb = backbone()
    ctx = context(n=80)
    s, r = prefill(technique(name, keep_ratio=0.5), ctx)
    n = len(ctx.token_ids)
    # the layer after which each dropped position left, read from the per-layer caches
    drop_after = {}
    for l in range(bb.n_layers - 1):
        gone = set(s.positions[l].tolist()) - set(s.positions[l + 1].tolist())
        drop_after.update({p: l for p in gone})
    assert drop_after, "the technique should have dropped something"
    ref = _masked_reference(bb, ctx.token_ids, drop_after)
    assert (r.logits[-1] - ref[-1]).abs().max().item() <= TOL
    out = s.decode(5)
    ids = ctx.token_ids
    for i, tok in enumerate(out.token_ids):  # the reference decodes greedily over the same holes
        ref = _masked_reference(bb, ids, drop_after)
        assert int(ref[-1].argmax()) == tok
        ids = torch.cat([ids, torch.tensor([tok])])
    assert s.kv_lengths()[-1] == n - len(drop_after) + 5


@pytest.mark.parametrize("name", PRUNERS)
def test_same_seed_same_pruned_tokens(name):
    ctx = context(n=100, seed=3)
    a = _kept_positions(prefill(technique(name, keep_ratio=0.6), ctx)[0])
    b = _kept_positions(prefill(technique(name, keep_ratio=0.6), ctx)[0])
    assert a == b
    if name == "random_pruning":
        other = DecisionContext(ctx.token_ids, ctx.spans, seed=4)
        assert _kept_positions(prefill(technique(name, keep_ratio=0.6), other)[0]) != a
        assert _kept_positions(prefill(technique(name, keep_ratio=0.6, seed=1), ctx)[0]) != a


def test_learned_scores_choose_tokens():
    """token_pruning keeps the best-scored prunable tokens of each prune layer."""
    sc = TokenScorer(64, (1,), {"n_layers": N_LAYERS})
    ctx = context(n=60, mission=(0, 0), obs_len=1)
    t = TokenPruning(keep_ratio=0.5, layers=(1,), sink_tokens=0, recent_tokens=1).use_scorer(sc)
    s, _ = prefill(t, ctx)
    seen = {}

    def grab(layer, h, positions):
        seen[layer] = h.clone()

    Session(backbone()).extend(ctx.token_ids, layer_hook=grab)
    with torch.no_grad():
        scores = sc(1, seen[1][0])[:-1]  # the 59 prunable tokens; floor(59 * 0.5) = 29 stay
    best = set(torch.topk(scores, 29).indices.tolist())
    assert set(s.positions[2].tolist()) == best | {59}


def test_default_layers_and_schedules():
    assert default_prune_layers(6) == (1, 2, 3)
    assert default_prune_layers(12) == tuple(range(2, 10))
    assert default_prune_layers(28) == tuple(range(4, 26, 3))
    assert len(default_prune_layers(32)) == 9
    kept, r = keep_counts(1000, 0, tuple(range(4, 26, 3)), 28, "compound", 0.7)
    assert kept == [700, 490, 343, 240, 168, 117, 81, 56] and r == 0.7
    for target in (0.5, 0.7, 0.9):
        kept, r = keep_counts(500, 50, (1, 2, 3), 6, "work", target)
        work = layer_tokens(500, 50, (1, 2, 3), 6, kept) / (6 * 550)
        assert work <= target + 1e-9 and target - work < 0.02
    kept, r = keep_counts(10, 90, (1, 2, 3), 6, "work", 0.5)  # protected alone exceed the target
    assert kept == [0, 0, 0] and r == 0.0


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, 2, "0.5", None, True])
@pytest.mark.parametrize("name", PRUNERS)
def test_bad_keep_ratio(name, bad):
    with pytest.raises(ValueError, match=r"keep_ratio must be a number in \(0, 1\]"):
        build(name, keep_ratio=bad)


@pytest.mark.parametrize("name", PRUNERS)
def test_prune_layers_out_of_range(name):
    t = technique(name, keep_ratio=0.5, layers=(2, 6))
    with pytest.raises(PruneLayerError, match=r"prune layers \[6\] out of range for a 6-layer model"):
        prefill(t, context())
    with pytest.raises(PruneLayerError, match=">= 0"):
        build(name, layers=(-1,))
    with pytest.raises(ValueError, match="known spans"):
        build(name, protect=("missoin",))
    with pytest.raises(ValueError, match="recent_tokens"):
        build(name, recent_tokens=0)
    with pytest.raises(ValueError, match="schedule"):
        build(name, schedule="linear")


@pytest.mark.parametrize("name", PRUNERS)
def test_short_context_warns_noop(name, fresh_warnings):
    ctx = context(n=30, mission=(1, 9), obs_len=21)  # 4 sink, mission, observation and 16 recent cover it all
    t = technique(name, keep_ratio=0.5)
    with pytest.warns(PruningNoOpWarning, match="pruning was a no-op"):
        s, r = prefill(t, ctx)
    assert [w.queries for w in r.works] == [30] * N_LAYERS
    assert t.report()["prunable"] == 0


def test_noop_warnings_once_per_process_and_technique(fresh_warnings):
    """Many short contexts, several instances and filter changes in between (as libraries make): one warning per
    technique and reason, not one per decision."""
    short = context(n=30, mission=(1, 9), obs_len=21)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for name in ("token_pruning", "random_pruning"):
                prefill(technique(name, keep_ratio=0.5), short)
                build(name, keep_ratio=1.0)
            with warnings.catch_warnings():  # resets Python's own once-per-location registries
                warnings.simplefilter("ignore", UserWarning)
    got = sorted((str(w.message).split(":")[0], "keep_ratio=1.0" in str(w.message)) for w in caught
                 if issubclass(w.category, PruningNoOpWarning))
    assert got == [("random_pruning", False), ("random_pruning", True), ("token_pruning", False),
                   ("token_pruning", True)]


def test_pruner_from_another_model(tmp_path):
    meta = {"n_layers": N_LAYERS, "model": "tiny-64", "model_fingerprint": model_fingerprint(backbone())}
    path = TokenScorer(64, (1, 2, 3), meta).save(tmp_path / "p.safetensors")
    # the right model: loads, no warning
    t = TokenPruning(keep_ratio=0.5, pruner=str(path)).bind(backbone())
    assert t.scorer.layers == (1, 2, 3) and t.prepare(N_LAYERS) == (1, 2, 3)
    # other hidden size
    wide = backbone(d=128)
    with pytest.raises(PrunerMismatchError, match="hidden size 64.*hidden size 128"):
        TokenPruning(keep_ratio=0.5, pruner=str(path)).bind(wide)
    with pytest.raises(PrunerMismatchError, match="hidden size 64.*hidden size 128"):  # unbound: checked at prefill
        prefill(TokenPruning(keep_ratio=0.5, pruner=str(path)), context(), wide)
    # other depth
    deep = HFDecoder.from_model(tiny_model("llama", num_hidden_layers=8))
    with pytest.raises(PrunerMismatchError, match="8 layers"):
        TokenPruning(keep_ratio=0.5, pruner=str(path)).bind(deep)
    # same shape, other weights: a warning
    with pytest.warns(PrunerFingerprintWarning):
        TokenPruning(keep_ratio=0.5, pruner=str(path)).bind(backbone(seed=1))
    # layers the pruner has no scorer for
    with pytest.raises(PrunerMismatchError, match=r"prune layers \[4\] have no scorer"):
        TokenPruning(keep_ratio=0.5, pruner=str(path), layers=(1, 4)).bind(backbone())
    # not a pruner at all
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(PrunerMismatchError):
        TokenPruning(keep_ratio=0.5, pruner=str(tmp_path / "x.safetensors")).bind(backbone())
    with pytest.raises(FileNotFoundError):
        TokenPruning(keep_ratio=0.5, pruner=str(tmp_path / "missing.safetensors")).bind(backbone())


def test_shipped_pruner_refuses_other_models():
    t = TokenPruning(keep_ratio=0.5)
    with pytest.raises(PrunerMismatchError, match="pass pruner=PATH"):
        t.bind(backbone())


def test_scorer_roundtrip(tmp_path):
    sc = scorer()
    back = TokenScorer.load(sc.save(tmp_path / "s.safetensors"))
    h = torch.randn(7, 64)
    assert back.layers == sc.layers and torch.equal(back(2, h), sc(2, h))
    assert back.meta["model"] == "tiny" and back.meta["hidden_size"] == 64
    assert model_fingerprint(backbone()) == model_fingerprint(backbone())
    assert model_fingerprint(backbone()) != model_fingerprint(backbone(seed=1))


def test_reports_and_planner_loop():
    from thrifty.agents.planner import PlannerContext  # noqa: F401  (the spans the planner passes)

    t = technique("token_pruning", keep_ratio=0.7)
    prefill(t, context(n=100))
    rep = t.report()
    assert rep["prune_layers"] == [1, 2, 3] and rep["protected"] + rep["prunable"] == 100
    assert rep["kept"] == [int(rep["prunable"] * 0.7)] + rep["kept"][1:] and 0 < rep["work"] < 1
    t.reset()
    assert t.report() == {}


def test_weights_probe_without_bind(tmp_path, monkeypatch):
    """Unbound (as the planner calls it), a pruner still notices other weights of the same shape: the hidden state
    of the first token after a prune layer depends on nothing but the weights."""
    sc = TokenScorer(64, (1, 2, 3), {"n_layers": N_LAYERS})
    sc.record_probe(backbone(), token_id=7)
    path = sc.save(tmp_path / "p.safetensors")
    assert set(TokenScorer.load(path).probe) == {1, 2, 3}
    ctx = context(n=80)
    ctx = DecisionContext(torch.cat([torch.tensor([7]), ctx.token_ids[1:]]), ctx.spans)
    prefill(TokenPruning(keep_ratio=0.5, pruner=str(path)), ctx)  # the right weights: silent
    with pytest.warns(PrunerFingerprintWarning, match="probe token differs"):
        prefill(TokenPruning(keep_ratio=0.5, pruner=str(path)), ctx, backbone(seed=1))
    # the shipped pruner (default) refuses other weights outright, bound or not
    import thrifty.techniques.token_pruning as tp

    monkeypatch.setattr(tp, "SHIPPED_PRUNER", path)
    prefill(TokenPruning(keep_ratio=0.5), ctx)
    with pytest.raises(PrunerMismatchError, match="probe token differs"):
        prefill(TokenPruning(keep_ratio=0.5), ctx, backbone(seed=1))
    with pytest.raises(PrunerMismatchError, match="not for this backbone"):
        TokenPruning(keep_ratio=0.5).bind(backbone(seed=1))


@pytest.mark.parametrize("name", PRUNERS)
def test_token_cap_bounds_every_layer_and_stays_count_matched(name):
    """max_kept caps the prunable tokens that survive each prune layer, for every technique alike; a cap above the
    schedule's counts changes nothing; keep_ratio 1.0 with a cap is a pure token budget, not the no-op."""
    ctx = context(n=120)
    capped = [w.queries for w in prefill(technique(name, keep_ratio=0.6, max_kept=10), ctx)[1].works]
    ref = [w.queries for w in prefill(technique("recency_pruning", keep_ratio=0.6, max_kept=10), ctx)[1].works]
    assert capped == ref
    t = technique(name, keep_ratio=0.6, max_kept=10)
    prefill(t, ctx)
    rep = t.report()
    assert rep["kept"] == [min(k, 10) for k in keep_counts(rep["prunable"], rep["protected"], (1, 2, 3), N_LAYERS,
                                                              "compound", 0.6)[0]]
    assert capped[2:] == [rep["protected"] + k for k in rep["kept"] + rep["kept"][-1:]]  # layers 2-5
    loose = [w.queries for w in prefill(technique(name, keep_ratio=0.6, max_kept=10_000), ctx)[1].works]
    assert loose == [w.queries for w in prefill(technique(name, keep_ratio=0.6), ctx)[1].works]
    budget = technique(name, keep_ratio=1.0, max_kept=10)
    assert not budget.is_noop and [w.queries for w in prefill(budget, ctx)[1].works][-1] < 120


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_token_cap_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="max_kept"):
        build("random_pruning", keep_ratio=0.6, max_kept=bad)
