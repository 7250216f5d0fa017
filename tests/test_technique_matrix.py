"""The shared matrix: every registered technique, at its declared no-op setting, reproduces the full model over a
growing planner context (several decisions of one episode), and has a row in docs/techniques.md."""

import re
import warnings
from pathlib import Path

import pytest
import torch

from thrifty.agents.planner import PlannerContext, TextPlanner
from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv
from thrifty.techniques import REGISTRY, build

DOCS = Path(__file__).resolve().parents[1] / "docs" / "techniques.md"


def _decision_logits(planner: TextPlanner, context: PlannerContext) -> torch.Tensor:
    """Next-token logits [V] at the decision prompt, through the technique's session and hook."""
    from thrifty.techniques import DecisionContext

    ids = torch.tensor(context.ids)
    ctx = DecisionContext(token_ids=ids, spans=dict(context.spans), seed=0)
    t = planner.technique
    session, new_from = t.open_session(planner.backbone, ctx)
    out = session.extend(ids[new_from:], logits="last", layer_hook=t.prefill_hook(ctx, planner.backbone.n_layers,
                                                                                  new_from))
    t.close_session(session, ctx, session.next_position)
    return out.logits[-1]


def _episode_logits(model_dir, technique) -> list[torch.Tensor]:
    planner = TextPlanner.load(model_dir, technique=technique)
    env = BabyAITextEnv("GoToLocal")
    obs, info = env.reset(seed=1_000_000_003)
    planner.reset()
    context = PlannerContext(planner.tokenizer)
    context.start(info["mission"])
    logits = []
    for _ in range(4):
        context.add_observation(obs)
        logits.append(_decision_logits(planner, context))
        action = env.expert_action()
        context.add_action(action)
        obs, *_ = env.step(ACTIONS.index(action))
    return logits


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_noop_setting_reproduces_the_full_model(name, tiny_planner_dir):
    full = _episode_logits(tiny_planner_dir, build("full"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pruning at keep 1.0 warns that it is a no-op: that is the point here
        other = _episode_logits(tiny_planner_dir, build(name, **REGISTRY[name].noop_settings))
    for a, b in zip(full, other):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_every_registered_technique_has_a_docs_row():
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", DOCS.read_text(), flags=re.M))
    assert rows == set(REGISTRY), f"docs/techniques.md rows {sorted(rows)} != registry {sorted(REGISTRY)}"
