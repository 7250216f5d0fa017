"""The coop planner: training encoding equals inference encoding, the decide_fn adapter, protected spans under
token pruning, and `bench-coop` end to end (tiny random models; behaviour, never timings)."""

import random

import pytest
import torch

from thrifty.agents.coop import CoopConfig, run_coop_episode
from thrifty.agents.coop_context import SharedContextTokens
from thrifty.agents.coop_planner import COOP_PROTECT, CoopPlanner, run_coop_planner_episode
from thrifty.techniques import build

SHORT = CoopConfig(max_rounds=3)


@pytest.fixture(scope="module")
def coop_model_dir(tmp_path_factory):
    """A tokenizer trained on a few coop expert episodes and a random 3-layer Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from thrifty.agents.coop import collect_expert_transcript
    from thrifty.train.planner import train_tokenizer

    rng = random.Random(0)
    texts = [t for k in (2, 4) for s in range(4) for t in collect_expert_transcript(k, s, noise=0.1, rng=rng)["epochs"]]
    tok = train_tokenizer(texts, 400)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_coop_planner")
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def coop_pruner_path(coop_model_dir, tmp_path_factory):
    """A random-initialised `TokenScorer` of the right shape for the tiny coop model (prune layer 1)."""
    from thrifty.backbones import HFDecoder
    from thrifty.techniques.token_pruning import TokenScorer, model_fingerprint

    backbone = HFDecoder.load(coop_model_dir)
    torch.manual_seed(0)
    scorer = TokenScorer(backbone.shape.d_model, (1,), {"n_layers": backbone.n_layers, "model": str(coop_model_dir),
                                                         "model_fingerprint": model_fingerprint(backbone)})
    return scorer.save(tmp_path_factory.mktemp("tiny_coop_pruner") / "model.safetensors")


def test_training_encoding_equals_inference_encoding(coop_model_dir):
    """Every call's token ids (as the adapter builds them) are a prefix of the training sequence, and the labels
    sit exactly on the decision tokens right after the call's prompt."""
    from transformers import AutoTokenizer

    from thrifty.train.coop_planner import encode_coop_episode

    tok = AutoTokenizer.from_pretrained(str(coop_model_dir))
    enc = encode_coop_episode(tok, 3, seed=5, noise=0.2, rng=random.Random(1), config=SHORT)
    (ids, labels), = enc["sequences"]  # no compaction in 3 rounds: one epoch, one sequence

    # replay the same episode the way inference does (same DART draws), check each call against the sequence
    from thrifty.agents.coop import random_decision
    from thrifty.agents.coop_expert import expert_decision

    tokens = SharedContextTokens(tok)
    taken_rng = random.Random(1)
    calls, taken = [], []

    def decide_replay(ctx, agent):
        calls.append(tokens.call(ctx, agent))
        label = expert_decision(ctx.state(), agent).text()
        t = random_decision(ctx, taken_rng).text() if taken_rng.random() < 0.2 else label
        taken.append((t, label))
        return " " + t

    run_coop_episode(decide_replay, 3, 5, SHORT)
    assert len(calls) == enc["calls"] > 0
    seq = ids + [None]  # labels are shifted: labels[i] is the target of position i, i.e. token i + 1
    labelled_positions = {i + 1 for i, y in enumerate(labels) if y != -100}
    expected = set()
    for (call_ids, spans), (t, label) in zip(calls, taken):
        assert ids[:len(call_ids)] == call_ids  # inference tokens = a prefix of the training sequence
        assert tok.decode(call_ids[-4:]).endswith("do:")
        target = tok.encode(f" {t}\n", add_special_tokens=False)
        assert seq[len(call_ids):len(call_ids) + len(target)] == target or len(call_ids) + len(target) > len(ids)
        if t == label:
            expected |= set(range(len(call_ids), len(call_ids) + len(target)))
    assert labelled_positions == {p for p in expected if p <= len(ids)}
    assert enc["labelled_calls"] == sum(t == label for t, label in taken)


def test_coop_decide_fn_never_crashes_and_counts_malformed(coop_model_dir):
    planner = CoopPlanner.load(coop_model_dir, build("full"))
    r = run_coop_planner_episode(planner, 2, seed=1_000_000_000, config=SHORT)
    assert r["calls"] == r["decisions"] > 0
    assert 0 <= r["malformed"] <= r["calls"]
    assert r["malformed"] > 0 and len(r["malformed_errors"]) == min(5, r["malformed"])  # a random model: garbage
    assert r["flops_per_call"] > 0 and r["tokens_context_mean"] > 0


def test_protected_spans_survive_token_pruning(coop_model_dir, coop_pruner_path):
    """With a random scorer at a low keep ratio, the task, the caller's role and its own observation are all
    present in every layer after the prune layer."""
    from thrifty.agents.coop_context import CoopContext
    from thrifty.runtime import Session
    from thrifty.techniques import DecisionContext

    planner = CoopPlanner.load(coop_model_dir)
    tok = planner.tokenizer
    ctx = CoopContext.start("find the red ball and the blue key", n_robots=3, rows=3, cols=3)
    ctx.start_round()
    for a in range(3):
        ctx.add_observation(a, room=a, objects={"red ball": 4} if a == 1 else None)
    ctx.add_plan()
    for a in range(3):
        ctx.begin_call(a)
        ctx.add_decision(a, f"explore {a} | claim: room {a}")
    for a in range(3):
        ctx.add_observation(a, room=a + 3)
    ctx.start_round()
    ctx.begin_call(1)
    ids, spans = SharedContextTokens(tok).call(ctx, 1)
    technique = build("token_pruning", keep_ratio=0.2, layers=(1,), protect=COOP_PROTECT, pruner=str(coop_pruner_path),
                      recent_tokens=1, sink_tokens=0)
    dctx = DecisionContext(torch.tensor(ids), spans)
    kept: dict[int, set] = {}

    def hook(layer, hidden, positions):
        rows = inner(layer, hidden, positions)
        kept[layer] = set(positions[rows].tolist()) if rows is not None else set(positions.tolist())
        return rows

    inner = technique.prefill_hook(dctx, planner.backbone.n_layers, 0)
    Session(planner.backbone).extend(torch.tensor(ids), logits="last", layer_hook=hook)
    assert len(kept[1]) < len(ids)  # something was pruned
    for name in COOP_PROTECT:
        s, e = spans[name]
        assert e > s and set(range(s, e)) <= kept[1], name


def test_bench_coop_writes_and_resumes(coop_model_dir, coop_pruner_path, tmp_path, monkeypatch):
    import thrifty.bench.coop as bc
    from thrifty.bench.coop_report import context_plot, coop_plots, summarize_coop
    from thrifty.bench.results import ResultsFile
    from thrifty.bench.runner import run_jobs

    monkeypatch.setattr(bc, "eval_config", lambda: SHORT)
    configs = bc.coop_configs(0.5, coop_pruner_path)  # prune layers: the pruner's own, (1,)
    assert {tuple(c.settings["layers"]) for c in configs if c.technique and "pruning" in c.technique} == {(1,)}
    jobs = bc.coop_jobs(configs, episodes=1, team_sizes=(2,))
    out = tmp_path / "coop.jsonl"
    fn = bc.coop_episode_fn(configs, coop_model_dir)
    records = run_jobs(jobs, fn, ResultsFile(out, bc.SUITE), progress=False)
    assert len(records) == len(configs) and len(out.read_text().splitlines()) == 1 + len(configs)
    calls = []
    records2 = run_jobs(jobs, lambda job: calls.append(job) or {}, ResultsFile(out, bc.SUITE), progress=False)
    assert calls == [] and [r["config"] for r in records2] == [c.name for c in configs]  # resumed, nothing rerun
    rows = summarize_coop(records2)
    assert {r["config"] for r in rows} == {c.name for c in configs}
    full = next(r for r in rows if r["config"] == "full")
    pruned = next(r for r in rows if r["config"].startswith("random_pruning"))
    assert pruned["flops_per_call"] < full["flops_per_call"]
    reuse, reuse_pruned = (next(r for r in rows if r["config"] == name)
                           for name in ("prefix_reuse", "reuse+random_pruning@0.5"))
    assert reuse_pruned["tokens_per_call"] == reuse["tokens_per_call"]  # the same episode (malformed -> default)...
    assert reuse_pruned["kv_bytes_max"] < reuse["kv_bytes_max"]  # ...but pruned history left the deep caches
    flops_png, success_png = coop_plots(rows, tmp_path / "coop")
    assert flops_png.stat().st_size > 0 and success_png.stat().st_size > 0
    assert context_plot(records2, tmp_path / "coop").stat().st_size > 0
    assert context_plot([r for r in records2 if r["config"] == "expert"], tmp_path / "expert") is None  # no model


def test_training_windows_keep_true_positions_and_label_each_decision_once(coop_model_dir):
    """Phase 1 windows: the task lines + a slice of the sequence at its true positions; every decision label of
    the sequence appears in exactly one window; noisy decisions carry no language-modelling target."""
    from transformers import AutoTokenizer

    from thrifty.train.coop_planner import encode_coop_episode, episode_windows, whole_sequences

    tok = AutoTokenizer.from_pretrained(str(coop_model_dir))
    eps = [encode_coop_episode(tok, k, seed=s, noise=0.3, rng=random.Random(s), config=SHORT)
           for k, s in ((2, 1), (4, 2))]
    (x, y, lm, pos), = whole_sequences(eps[:1])
    assert pos == list(range(len(x))) and len(lm) == len(x)
    assert any(v == -100 for v in lm[eps[0]["prefix_tokens"][0]:])  # a noisy decision is masked
    for e in eps:
        p = e["prefix_tokens"][0]
        labelled = []
        for wx, wy, wlm, wpos in episode_windows([e], width=64, overlap=16):
            assert len(wx) == len(wy) == len(wlm) == len(wpos) <= p + 64
            assert wpos[:p] == list(range(p)) and wpos[p:] == list(range(wpos[p], wpos[p] + len(wx) - p))
            labelled += [(q, v) for q, v in zip(wpos, wy) if v != -100]
        (sx, sy, _, _), = whole_sequences([e])
        assert sorted(labelled) == [(q, v) for q, v in enumerate(sy) if v != -100]


def test_coop_dagger_rows_label_the_expert_at_true_positions_and_resume(coop_model_dir, tmp_path):
    """A DAgger round: every call the planner got wrong becomes a row whose decision label is the expert's and whose
    tokens sit at their positions in the call; a second collection over the same file replays nothing."""
    from thrifty.agents.coop_planner import CoopPlanner
    from thrifty.techniques import build
    from thrifty.train.coop_dagger import agreement, collect_coop_dagger_round, dagger_row

    row = dagger_row(list(range(100, 120)), prefix=3, label_ids=[7, 8], window_tokens=5)
    assert row["ids"] == [100, 101, 102, 115, 116, 117, 118, 119, 7]
    assert row["positions"] == [0, 1, 2, 15, 16, 17, 18, 19, 20]
    assert row["labels"] == [-100] * 7 + [7, 8]

    planner = CoopPlanner.load(coop_model_dir, build("prefix_reuse", store_bytes=0))
    path = tmp_path / "r0.jsonl"
    eps = collect_coop_dagger_round(planner, [2], 2, 0, path, window_tokens=64, keep_agreeing=1, config=SHORT)
    assert len(eps) == 2 and all(e["calls"] > 0 for e in eps)
    assert sum(len(e["rows"]) for e in eps) == sum(e["calls"] for e in eps)  # keep_agreeing=1 keeps every call
    tok = planner.tokenizer
    for e in eps:
        for r in e["rows"]:
            target = tok.decode([t for t in r["labels"] if t != -100])
            assert target.endswith("\n") and r["positions"] == sorted(r["positions"])
    assert 0.0 <= agreement(eps) <= 1.0
    before = path.read_text()
    again = collect_coop_dagger_round(planner, [2], 2, 0, path, window_tokens=64, keep_agreeing=1, config=SHORT)
    assert path.read_text() == before and again == eps


def test_coop_recipe_dagger_phase_keeps_the_checkpoint_fingerprint():
    from thrifty.train.coop_planner import CoopPlannerRecipe

    r = CoopPlannerRecipe(window_steps=10, final_steps=10, dagger_rounds=2, dagger_steps=5)
    assert r.total_steps == 30 and r.phase_starts() == (0, 10, 20, 25)
    assert [r.dagger_round_at(s) for s in (19, 20, 24, 25, 29)] == [None, 0, 0, 1, 1]
    assert CoopPlannerRecipe(dagger_rounds=0).fingerprint() == CoopPlannerRecipe().fingerprint()


def test_planner_transcripts_replay_to_the_same_episode(coop_model_dir):
    """`collect_planner_transcript` records what the planner did (canonical, parsed) and what the expert would have
    done; replaying `taken` reproduces the episode's decisions, which is how Stage 1 turns them into samples."""
    from thrifty.agents.coop_planner import collect_planner_transcript
    from thrifty.agents.coop_expert import expert_decision

    planner = CoopPlanner.load(coop_model_dir, build("full"), constrained=True)
    rec = collect_planner_transcript(planner, 2, 5, SHORT)
    assert rec["source"] == "planner" and rec["calls"]
    seen: list[str] = []

    def replay(ctx, agent):
        taken = rec["calls"][len(seen)]["taken"]
        seen.append(expert_decision(ctx.state(), agent).text())
        return " " + taken

    replayed = run_coop_episode(replay, 2, 5, SHORT)
    assert replayed["decisions"] == [c["taken"] for c in rec["calls"]]
    assert seen == [c["label"] for c in rec["calls"]]


def test_decision_changes_mark_each_robots_reassignments():
    from thrifty.train.coop_planner import decision_changes

    calls = [{"agent": a, "label": lab} for a, lab in
             [(0, "explore 1"), (1, "wait"), (0, "explore 1"), (1, "goto red key"), (0, "goto red key"), (1, "wait")]]
    assert decision_changes(calls) == [0, 1, 3, 4, 5]


def test_planner_transcripts_resume_after_a_cut_line(coop_model_dir, tmp_path):
    """An interrupted run leaves a cut last line: it is dropped and that episode is played again; episodes already
    written are kept, not replayed."""
    from thrifty.train.coop_planner import write_planner_transcripts

    path = tmp_path / "planner.jsonl"
    write_planner_transcripts(path, coop_model_dir, team_sizes=(2,), episodes_per_size=2, first_seed=7)
    first, second = path.read_text().splitlines()
    path.write_text(first + "\n" + second[: len(second) // 2])
    write_planner_transcripts(path, coop_model_dir, team_sizes=(2,), episodes_per_size=2, first_seed=7)
    assert path.read_text().splitlines() == [first, second]


def test_paired_coop_counts_lost_and_gained_seeds_and_prices_only_seeds_both_solve():
    from thrifty.bench.coop_report import paired_coop

    def ep(config, k, seed, success, flops, calls=10):
        return {"config": config, "level": f"K{k}", "seed": seed, "success": success, "decisions": calls,
                "flops_total": flops * calls}

    records = [ep("full", 2, 0, True, 100), ep("full", 2, 1, True, 100), ep("full", 2, 2, False, 900),
               ep("cap", 2, 0, True, 50), ep("cap", 2, 1, False, 999), ep("cap", 2, 2, True, 40),
               ep("full", 8, 0, True, 400), ep("cap", 8, 0, True, 100), ep("cap", 8, 1, True, 100),
               {"config": "expert", "level": "K2", "seed": 0, "success": True}]
    rows = {(r["config"], r["n_robots"]): r for r in paired_coop(records)}
    two = rows[("cap", 2)]
    assert (two["pairs"], two["both"], two["reference_only"], two["config_only"]) == (3, 1, 1, 1)
    assert two["difference"] == 0 and two["difference_lo"] < 0 < two["difference_hi"]
    assert two["flops_per_call"] == 50 and two["reference_flops_per_call"] == 100 and two["flops_ratio"] == 0.5
    eight = rows[("cap", 8)]
    assert eight["pairs"] == 1  # seed 1 has no full episode at K = 8
    assert eight["flops_ratio"] == 0.25 and eight["flops_growth"] == 2.0 and eight["reference_growth"] == 4.0
    assert eight["flops_per_robot"] == (100 - 50) / 6 and eight["reference_flops_per_robot"] == (400 - 100) / 6
    assert two["flops_per_robot"] is None  # the smallest K adds nothing
    assert rows[("expert", 2)]["flops_ratio"] is None  # no model, no cost
    assert paired_coop([r for r in records if r["config"] != "full"]) == []
