"""Constrained decoding (`TextSetConstraint`): it only ever emits an allowed text, it keeps the model's own choice
whenever that choice is allowed, and the coop planner decoded this way emits decisions the parser accepts."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.agents.coop import CoopConfig, run_coop_episode
from thrifty.agents.coop_decision import decision_texts, parse_decision, parse_syntax
from thrifty.agents.coop_planner import SHIPPED_COOP_PLANNER, CoopPlanner, run_coop_planner_episode
from thrifty.envs.coop_grid import all_object_names
from thrifty.runtime.constrained import TextSetConstraint
from thrifty.techniques import build

OBJECTS = sorted(all_object_names())


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHIPPED_COOP_PLANNER), local_files_only=True)


def _decode(constraint: TextSetConstraint, gen: torch.Generator, vocab: int) -> list[tuple]:
    """Run `choose` on random logits until the end token; returns [(logits, chosen, emitted before), ...]."""
    emitted, steps = [], []
    while not emitted or tuple(emitted) in constraint.next:  # a complete text + end has no continuation
        assert len(emitted) < constraint.max_tokens, emitted
        logits = torch.randn(vocab, generator=gen)
        tok = constraint.choose(logits, emitted)
        steps.append((logits, tok, list(emitted)))
        emitted.append(tok)
    return steps


@settings(max_examples=40, deadline=None)
@given(known=st.lists(st.sampled_from(OBJECTS), max_size=6, unique=True), n_rooms=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1))
def test_constrained_decoding_emits_only_allowed_decisions(tokenizer, known, n_rooms, seed):
    texts = [" " + t for t in decision_texts(known, n_rooms)]
    constraint = TextSetConstraint(tokenizer, texts)
    steps = _decode(constraint, torch.Generator().manual_seed(seed), len(tokenizer))
    text = tokenizer.decode([t for _, t, _ in steps])
    assert text.endswith("\n") and text[:-1] in texts
    decision, error = parse_decision(text, known, n_rooms)
    assert error is None and decision.text() == text.strip()
    for logits, tok, emitted in steps:  # the model's own choice is kept whenever it is allowed, else the best allowed
        allowed = constraint.next[tuple(emitted)]
        assert tok in allowed and logits[tok] == logits[allowed].max()
        if int(logits.argmax()) in allowed:
            assert tok == int(logits.argmax())


def test_decision_texts_are_the_canonical_decisions_the_parser_accepts():
    known, n_rooms = {"red ball", "blue key", "grey box"}, 4
    texts = decision_texts(known, n_rooms)
    k = len(known) + n_rooms
    assert len(texts) == len(set(texts)) == 1 + 2 * k * (k + 1)
    for t in texts:
        decision, error = parse_decision(t, known, n_rooms)
        assert error is None and decision.text() == t
    assert "goto green key" not in texts and parse_syntax("goto green key")  # well-formed, but nobody reported it
    assert not any("room 4" in t for t in texts)


def test_constraint_refuses_an_empty_language_and_a_foreign_prefix(tokenizer):
    with pytest.raises(ValueError, match="at least one allowed text"):
        TextSetConstraint(tokenizer, [])
    c = TextSetConstraint(tokenizer, [" wait", " goto red ball"])
    assert c.max_tokens == len(tokenizer.encode(" goto red ball\n", add_special_tokens=False))
    outside = tokenizer.encode(" explore", add_special_tokens=False)
    with pytest.raises(RuntimeError, match="not a prefix of any allowed text"):
        c.choose(torch.zeros(len(tokenizer)), outside)


def test_constrained_coop_planner_is_never_malformed_and_agrees_with_free_decoding_when_that_is_valid():
    """Shipped planner, one K = 4 episode decoded freely; at every call the constrained planner, given the same
    context, emits the free decision whenever the free one is valid. A random model, constrained: no malformed."""
    free = CoopPlanner.load(SHIPPED_COOP_PLANNER, build("full"))
    constrained = CoopPlanner(free.backbone, free.tokenizer, build("full"), constrained=True)
    compared = []

    def both(ctx, agent):
        text, cost = free(ctx, agent)
        other, _ = constrained(ctx, agent)
        state = ctx.state()
        if parse_decision(text, state.objects.keys(), state.n_rooms)[1] is None:
            compared.append(other == text)
        assert parse_decision(other, state.objects.keys(), state.n_rooms)[1] is None
        return text, cost

    run_coop_episode(both, 4, seed=1_000_000_001, config=CoopConfig(max_rounds=4), tokenizer=free.tokenizer)
    assert len(compared) >= 8 and all(compared)


def test_constrained_random_model_makes_no_malformed_decision(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from thrifty.agents.coop import collect_expert_transcript
    from thrifty.train.planner import train_tokenizer

    texts = [t for s in range(2) for t in collect_expert_transcript(2, s, rng=random.Random(s))["epochs"]]
    tok = train_tokenizer(texts, 300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    planner = CoopPlanner.load(tmp_path, build("full"), constrained=True)
    r = run_coop_planner_episode(planner, 2, seed=1_000_000_000, config=CoopConfig(max_rounds=3))
    assert r["calls"] > 0 and r["malformed"] == 0
