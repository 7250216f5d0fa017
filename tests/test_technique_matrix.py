"""The shared matrix: every registered technique x every supported model family.

At its declared no-op setting every technique reproduces the full model over a growing planner context (several
decisions of one episode); and on every family the techniques really run: prefix reuse (alone and composed with
pruning) gives the recomputed logits, and each pruner's pruned prefill equals the full forward with the dropped
tokens masked out. Windowed families get windows shorter than the contexts, so sliding-window masks built from
original positions are exercised under pruning and reuse. Each registered technique has a row in
docs/techniques.md. Any FutureWarning or DeprecationWarning fails a test here.
"""

import re
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from thrifty.agents.planner import PlannerContext, TextPlanner
from thrifty.backbones import SUPPORTED_FAMILIES, tiny_model
from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv
from thrifty.runtime import Session
from thrifty.techniques import REGISTRY, DecisionContext, build
from thrifty.techniques.pruning_common import PruningNoOpWarning, default_prune_layers
from thrifty.techniques.token_pruning import TokenScorer

pytestmark = [pytest.mark.filterwarnings("error::FutureWarning"),
              pytest.mark.filterwarnings("error::DeprecationWarning")]

DOCS = Path(__file__).resolve().parents[1] / "docs" / "techniques.md"
PRUNERS = ("token_pruning", "random_pruning", "recency_pruning", "sink_window")
WINDOW = 24  # planner contexts here grow to ~100 tokens
_WINDOWS = {
    "mistral": {"sliding_window": WINDOW}, "phi3": {"sliding_window": WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
    "gemma2": {"sliding_window": WINDOW}, "gemma3_text": {"sliding_window": WINDOW},
}


@pytest.fixture(scope="session")
def planner_dirs(tiny_planner_dir, tmp_path_factory):
    """family -> a planner directory: the tiny planner's tokenizer with a random 4-layer model of that family
    (the conftest's Llama planner for "llama")."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_planner_dir), local_files_only=True)
    dirs = {"llama": tiny_planner_dir}
    for family in SUPPORTED_FAMILIES:
        if family in dirs:
            continue
        model = tiny_model(family, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                           max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, **_WINDOWS.get(family, {}))
        path = tmp_path_factory.mktemp(f"planner_{family}")
        model.save_pretrained(path)
        tok.save_pretrained(path)
        dirs[family] = path
    return dirs


@lru_cache(maxsize=None)
def _planner(model_dir) -> TextPlanner:
    return TextPlanner.load(model_dir)


def _decide(planner: TextPlanner, technique, context: PlannerContext):
    """One decision through the technique: (next-token logits [V] at the decision prompt, session, extend result)."""
    ids = torch.tensor(context.ids)
    ctx = DecisionContext(token_ids=ids, spans=dict(context.spans), seed=0)
    session, new_from = technique.open_session(planner.backbone, ctx)
    hook = technique.prefill_hook(ctx, planner.backbone.n_layers, new_from)
    out = session.extend(ids[new_from:], logits="last", layer_hook=hook,
                         exit_hook=technique.exit_hook(planner.backbone, ctx))
    technique.close_session(session, ctx, session.next_position)
    return out.logits[-1], session, out


def _episode(model_dir, technique, decisions=4):
    """The decisions of one GoToLocal episode (expert actions): [(logits [V], session, extend result, ids)]."""
    planner = _planner(model_dir)
    technique.reset()
    env = BabyAITextEnv("GoToLocal")
    obs, info = env.reset(seed=1_000_000_003)
    context = PlannerContext(planner.tokenizer)
    context.start(info["mission"])
    steps = []
    for _ in range(decisions):
        context.add_observation(obs)
        steps.append((*_decide(planner, technique, context), torch.tensor(context.ids)))
        action = env.expert_action()
        context.add_action(action)
        obs, *_ = env.step(ACTIONS.index(action))
    return steps


def _full_logits(model_dir):
    return [s[0] for s in _episode(model_dir, build("full"))]


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_noop_setting_reproduces_the_full_model(name, family, planner_dirs):
    full = _full_logits(planner_dirs[family])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PruningNoOpWarning)  # pruning at keep 1.0 says it is a no-op: the point here
        technique = build(name, **REGISTRY[name].noop_settings)
    other = [s[0] for s in _episode(planner_dirs[family], technique)]
    for a, b in zip(full, other):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_prefix_reuse_gives_the_recomputed_logits(family, planner_dirs):
    steps = _episode(planner_dirs[family], build("prefix_reuse"))
    bb = _planner(planner_dirs[family]).backbone
    windows = {bb.sliding_window(l) for l in range(bb.n_layers)}
    assert (WINDOW in windows) == (family in _WINDOWS)
    assert steps[-1][1].next_position > WINDOW * 2  # the contexts outgrow the windows
    for got, want in zip([s[0] for s in steps], _full_logits(planner_dirs[family])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _pruner(name, backbone):
    t = build(name, keep_ratio=0.5)
    if name == "token_pruning":
        layers = default_prune_layers(backbone.n_layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            t.use_scorer(TokenScorer(backbone.shape.d_model, layers, {"n_layers": backbone.n_layers}))
    return t


def _masked_reference(bb, ids, session):
    """Logits [V] of the last token of the full forward over ids [T] with every token the pruned `session` lacks
    at layer l hidden as a key from the other queries of layer l (nothing removed)."""
    pos = torch.arange(len(ids))
    with torch.no_grad():
        h = bb.embed(ids[None])
        for l in range(bb.n_layers):
            hide = ~torch.isin(pos, session.positions[l])
            hide = hide[None, :] & ~torch.eye(len(ids), dtype=torch.bool)  # a dropped row still sees itself
            mask = bb.attention_mask(pos, pos, l).masked_fill(hide[None, None], torch.finfo(bb.dtype).min)
            h = bb.run_layer(l, h, pos, mask, None)
        return bb.logits(h[0, -1])


_FIRST_DECISION_NOOP = pytest.mark.filterwarnings(  # the first decision's context is all protected spans
    "ignore::thrifty.techniques.pruning_common.PruningNoOpWarning")


@_FIRST_DECISION_NOOP
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
@pytest.mark.parametrize("name", PRUNERS)
def test_pruning_runs_and_equals_masking(name, family, planner_dirs):
    bb = _planner(planner_dirs[family]).backbone
    logits, session, out, ids = _episode(planner_dirs[family], _pruner(name, bb))[-1]
    tokens = [w.queries for w in out.works]
    assert tokens[-1] < tokens[0] == len(ids)  # deep layers processed fewer tokens
    torch.testing.assert_close(logits, _masked_reference(bb, ids, session), atol=1e-5, rtol=0)


@_FIRST_DECISION_NOOP
@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_reuse_composed_with_pruning_runs(family, planner_dirs):
    t = build("composed", techniques=["prefix_reuse", "random_pruning"],
              part_settings={"random_pruning": {"keep_ratio": 0.5}})
    steps = _episode(planner_dirs[family], t)
    assert t.report()["composed"]["evicted"] > 0  # earlier decisions' tokens left the deep layers of the kept session
    assert all(torch.isfinite(s[0]).all() for s in steps)
    session = steps[-1][1]
    assert session.kv_lengths()[-1] < session.kv_lengths()[0]


def test_every_registered_technique_has_a_docs_row():
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", DOCS.read_text(), flags=re.M))
    assert rows == set(REGISTRY), f"docs/techniques.md rows {sorted(rows)} != registry {sorted(REGISTRY)}"
