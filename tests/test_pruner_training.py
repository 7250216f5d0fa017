"""Stage 1 saliency and Stage 2 pruner recipes on a tiny planner: files, metadata, padding, losses, exactness."""

import json
import math
import random

import pytest
import torch

from thrifty.backbones import HFDecoder, tiny_model
from thrifty.runtime import Session
from thrifty.techniques.token_pruning import PrunerMismatchError, TokenPruning, TokenScorer
from thrifty.train.pruner import (PrunerRecipe, contexts_from_samples, masked_student, prunable_mask, rank_loss,
                                  train_budgets, train_pruner)
from thrifty.train.saliency import (batched_forward, compute_saliency, load_saliency, load_samples, pad_batch,
                                    train_saliency)


@pytest.fixture(scope="module")
def planner_dir(tmp_path_factory):
    """A tiny untrained planner (BPE tokenizer from a few expert transcripts, random 6-layer Llama) and the
    transcripts as JSON lines."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from thrifty.agents.transcript import Transcript
    from thrifty.train.planner import collect_episode, train_tokenizer

    rng = random.Random(0)
    episodes = [collect_episode(lv, seed, 0.1, rng) for lv in ("GoToLocal", "PutNextLocal") for seed in range(8)]
    tok = train_tokenizer([Transcript(e["mission"], e["observations"], e["taken"]).text() for e in episodes], 320)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("planner")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    data = path / "transcripts.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in episodes))
    return path, data


@pytest.fixture(scope="module")
def saliency_file(planner_dir, tmp_path_factory):
    model, data = planner_dir
    out = tmp_path_factory.mktemp("sal") / "saliency.safetensors"
    return train_saliency(model, out, data=data, samples=16, seed=0)


def test_saliency_file(saliency_file, planner_dir):
    samples, sal, meta = load_saliency(saliency_file)
    assert meta["layers"] == [1, 2, 3] and meta["seed"] == 0 and meta["model"] == str(planner_dir[0])
    assert meta["data"]["kind"] == "planner" and meta["data"]["source"] == str(planner_dir[1])
    assert meta["model_fingerprint"] and meta["hidden_size"] == 32 and meta["n_layers"] == 6
    assert len(samples) == 16 and set(sal) == {1, 2, 3}
    for i, s in enumerate(samples):
        assert s.decisions == [len(s.ids) - 1] and s.observation[1] == len(s.ids) and s.mission[0] == 1
        for l in sal:
            assert sal[l][i].shape == (len(s.ids),) and torch.isfinite(sal[l][i]).all()
        assert sal[1][i].abs().sum() > 0


def test_saliency_is_padding_invariant(planner_dir):
    """A sample's saliency is the same alone and in a padded batch (padding is masked out of everything)."""
    model, data = planner_dir
    from transformers import AutoTokenizer

    bb = HFDecoder.load(model)
    tok = AutoTokenizer.from_pretrained(str(model))
    samples, _ = load_samples(tok, data, 4, seed=1, min_prunable=1)
    lengths = sorted(len(s.ids) for s in samples)
    assert lengths[0] < lengths[-1]
    batch = compute_saliency(bb, samples, (1, 3), tok.pad_token_id, tokens_per_batch=10**6)
    for i, s in enumerate(samples):
        alone = compute_saliency(bb, [s], (1, 3), tok.pad_token_id)
        for l in (1, 3):
            assert torch.allclose(alone[l][0], batch[l][i], atol=1e-7, rtol=1e-4)


def test_memory_share_cuts_memory_episodes_at_their_memory_steps(planner_dir):
    """memory_share=1: every sample of a Memory episode is the context before one of its memory steps (the junction);
    memory_share=0: cuts are uniform, so most are elsewhere. Episodes without memory steps are unaffected."""
    import random

    from transformers import AutoTokenizer

    from thrifty.train.planner import collect_episode
    from thrifty.train.saliency import planner_sample

    model, _ = planner_dir
    tok = AutoTokenizer.from_pretrained(str(model))
    eps = [collect_episode("MemoryRecallS13", s, noise=0.0, rng=random.Random(s)) for s in range(4)]
    at_memory = {tuple(planner_sample(tok, e, m).ids) for e in eps for m in e["memory_steps"]}
    samples, desc = load_samples(tok, None, 12, seed=0, min_prunable=1, episodes=eps, memory_share=1.0)
    assert len(samples) == 12 and all(tuple(s.ids) in at_memory for s in samples)
    assert desc["memory_share"] == 1.0
    samples, _ = load_samples(tok, None, 24, seed=0, min_prunable=1, episodes=eps, memory_share=0.0)
    assert sum(tuple(s.ids) in at_memory for s in samples) < 12
    gtl = [collect_episode("GoToLocal", s, noise=0.0, rng=random.Random(s)) for s in range(3)]
    a, d = load_samples(tok, None, 6, seed=0, min_prunable=1, episodes=gtl, memory_share=1.0)
    b, _ = load_samples(tok, None, 6, seed=0, min_prunable=1, episodes=gtl, memory_share=0.0)
    assert [s.ids for s in a] == [s.ids for s in b] and "memory_share" not in d


def test_dolly_records(planner_dir, tmp_path):
    model, _ = planner_dir
    recs = [{"instruction": "go to the red ball", "context": "the ball is to the left of the door " * 3,
             "response": "turn left then go forward", "category": "open_qa"},
            {"instruction": "what is a key", "context": "", "response": "a thing that opens doors"}]
    data = tmp_path / "dolly.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = train_saliency(model, tmp_path / "s.safetensors", data=data, samples=5, seed=0)
    samples, sal, meta = load_saliency(out)
    assert meta["data"]["kind"] == "dolly" and len(samples) == 2
    for s in samples:
        assert s.targets == s.ids[s.decisions[0] + 1:] and s.observation == (s.decisions[0], len(s.ids))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?"}) + "\n")
    with pytest.raises(ValueError, match="expected planner transcripts"):
        train_saliency(model, tmp_path / "b.safetensors", data=bad, samples=2)


def test_hard_masks_equal_pruned_session():
    """The training relaxation is exact at its ends: a key bias of -inf after layer l is the hard drop."""
    bb = HFDecoder.from_model(tiny_model("llama", num_hidden_layers=4))
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(0))
    dropped = [3, 7, 8, 20]

    def after(l, h):
        if l != 1:
            return None
        bias = torch.zeros(1, 30)
        bias[0, dropped] = float("-inf")
        return bias

    with torch.no_grad():
        h = batched_forward(bb, ids, torch.ones(1, 30, dtype=torch.bool), after)
    ref = Session(bb).extend(ids[0], layer_hook=lambda l, hh, p: torch.tensor(
        [i for i in range(30) if i not in dropped]) if l == 1 else None)
    assert (bb.logits(h[0, -1]) - ref.logits[-1]).abs().max() < 1e-5


def test_every_prune_layer_gets_the_saliency_gradient(saliency_file, planner_dir):
    """E-RECAP overwrote its ranking loss per layer, so it never reached the scorers; here every layer's does."""
    samples, sal, meta = load_saliency(saliency_file)
    bb = HFDecoder.load(planner_dir[0])
    batch = samples[:3]
    ids, valid = pad_batch(batch, 0)
    recipe = PrunerRecipe()
    pr = prunable_mask(batch, ids.shape[1], recipe)
    sc = TokenScorer(32, (1, 2, 3), {})
    g = torch.Generator().manual_seed(0)
    _, scores, cum = masked_student(bb, sc, ids, valid, pr, 0.6, 0.25, 0.3, g)
    loss = sum(rank_loss(scores[l][r, :len(s.ids)], sal[l][r], pr[r, :len(s.ids)], 64, g)
               for l in (1, 2, 3) for r, s in enumerate(batch))
    loss.backward()
    for l in ("1", "2", "3"):
        assert sc.scorers[l][0].weight.grad.abs().sum() > 0
    assert all((cum[l] <= 0).all() for l in cum)
    assert (cum[3] <= cum[1] + 1e-6).all()  # masks compound


@pytest.mark.parametrize("max_kept", [None, 6, 0])
def test_student_keeps_what_inference_keeps_under_a_cap(saliency_file, planner_dir, max_kept):
    """Stage 2 trains at the counts inference will keep: with a token cap, long contexts train at the capped
    budget (`train_budgets`), and those are the counts a capped technique reports on the same context."""
    from thrifty.techniques import build

    samples, _, _ = load_saliency(saliency_file)
    bb = HFDecoder.load(planner_dir[0])
    batch = samples[:3]
    ids, valid = pad_batch(batch, 0)
    pr = prunable_mask(batch, ids.shape[1], PrunerRecipe())
    sc = TokenScorer(32, (1, 2, 3), {})
    with torch.no_grad():
        _, _, cum = masked_student(bb, sc, ids, valid, pr, 0.6, 0.1, 0.3, torch.Generator().manual_seed(0),
                                   max_kept)
    alive, prev, student = pr.clone(), torch.zeros(ids.shape), []
    for l in (1, 2, 3):  # a token stays alive while its mask at each layer is above one half
        alive = alive & (cum[l] - prev > math.log(0.5))
        prev = cum[l]
        student.append(alive.sum(-1).tolist())
    for r, (s, ctx) in enumerate(zip(batch, contexts_from_samples(batch))):
        t = build("random_pruning", keep_ratio=0.6, layers=(1, 2, 3), max_kept=max_kept)
        session, new_from = t.open_session(bb, ctx)
        session.extend(ctx.token_ids[new_from:], layer_hook=t.prefill_hook(ctx, bb.n_layers, new_from))
        kept = t.report()["kept"]
        assert kept == train_budgets(int(pr[r].sum()), (1, 2, 3), bb.n_layers, 0.6, max_kept)
        assert [c[r] for c in student] == kept
        if max_kept is not None:
            assert max(kept) <= max_kept


def test_train_pruner(saliency_file, planner_dir, tmp_path):
    model, _ = planner_dir
    out = train_pruner(model, saliency_file, tmp_path / "pruner", keep_ratio=0.6, steps=3, seed=0,
                       recipe=PrunerRecipe(keep_ratio=0.6, steps=3, eval_samples=4, tokens_per_batch=2000))
    assert out == tmp_path / "pruner" / "model.safetensors"
    card = json.loads((tmp_path / "pruner" / "card.json").read_text())
    assert card["prune_layers"] == [1, 2, 3] and card["seed"] == 0 and card["for_model"]["hidden_size"] == 32
    assert set(card["heldout"]) >= {"token_pruning", "random_pruning", "recency_pruning", "sink_window"}
    assert card["stage1"]["data"]["kind"] == "planner" and card["training"]["steps"] == 3
    tp = card["heldout"]["token_pruning"]
    assert 0 <= tp["agreement"] <= 1 and tp["work"] < 1
    assert card["heldout"]["random_pruning"]["work"] == tp["work"]  # count-matched
    sc = TokenScorer.load(out)
    assert sc.meta["hidden_size"] == 32 and sc.meta["n_layers"] == 6 and sc.meta["data"]["kind"] == "planner"
    bb = HFDecoder.load(model)
    TokenPruning(keep_ratio=0.6, pruner=str(tmp_path / "pruner")).bind(bb)
    other = HFDecoder.from_model(tiny_model("llama", num_hidden_layers=6))
    with pytest.raises(PrunerMismatchError, match="hidden size 32"):
        TokenPruning(keep_ratio=0.6, pruner=str(out)).bind(other)
    with pytest.raises(ValueError, match="keep_ratio"):
        train_pruner(model, saliency_file, tmp_path / "p2", keep_ratio=1.5, steps=1)
    with pytest.raises(ValueError, match="max_kept must be a whole number >= 1"):
        train_pruner(model, saliency_file, tmp_path / "p2", steps=1, max_kept=0)


def test_train_pruner_for_a_token_cap(saliency_file, planner_dir, tmp_path):
    """A cap-trained pruner records its cap; the held-out comparison runs every technique at that cap."""
    model, _ = planner_dir
    out = train_pruner(model, saliency_file, tmp_path / "pruner",
                       recipe=PrunerRecipe(keep_ratio=0.6, steps=2, eval_samples=3, max_kept=5))
    card = json.loads((tmp_path / "pruner" / "card.json").read_text())
    assert card["recipe"]["max_kept"] == 5 and card["heldout"]["settings"]["max_kept"] == 5
    assert TokenScorer.load(out).meta["max_kept_trained"] == 5
    works = {card["heldout"][name]["work"] for name in ("token_pruning", "random_pruning", "recency_pruning")}
    assert len(works) == 1  # count-matched at the cap


def test_pruning_quality_on_heldout_contexts(saliency_file, planner_dir, tmp_path):
    from thrifty.bench.pruning_quality import run_pruning_quality

    model, _ = planner_dir
    pruner = train_pruner(model, saliency_file, tmp_path / "pruner",
                          recipe=PrunerRecipe(keep_ratio=0.5, steps=1, eval_samples=2))
    out = run_pruning_quality(model, keeps=(0.5,), settings={"pruner": str(pruner)}, episodes_per_level=1,
                              per_level=3, out_json=tmp_path / "q.json")
    rows = json.loads((tmp_path / "q.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(out["rows"]))
    pooled = {r["technique"]: r for r in rows if r["level"] == "all"}
    assert set(pooled) == {"token_pruning", "random_pruning", "recency_pruning", "sink_window"}
    works = {round(r["work"], 9) for r in pooled.values()}
    assert len(works) == 1 and works.pop() < 1  # count-matched
    assert all(0 <= r["agreement"] <= 1 and r["kl"] >= -1e-6 and r["contexts"] > 0 for r in pooled.values())
