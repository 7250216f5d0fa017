"""DAgger rollouts: the planner drives, the expert labels every visited state; rounds resume from their file."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv
from thrifty.train.dagger import agreement, collect_dagger_round, dagger_seed
from thrifty.train.planner import PlannerRecipe, dagger_round_at, encode_episode, lr_at


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_rollout_labels_are_the_experts_actions_at_the_visited_states(tmp_path, tiny_planner_dir):
    model, tok = _load(tiny_planner_dir)
    with torch.no_grad():
        (ep,) = collect_dagger_round(model, tok, ["GoToLocal"], 1, 0, 12, tmp_path / "r0.jsonl")
    assert len(ep["observations"]) == len(ep["taken"]) == len(ep["labels"]) <= 12
    assert set(ep["taken"]) | set(ep["labels"]) <= set(ACTIONS)
    # replay the planner's actions: at every state the label is what the bot says there
    env = BabyAITextEnv("GoToLocal", max_steps=12)
    obs, _ = env.reset(seed=ep["seed"])
    for o, taken, label in zip(ep["observations"], ep["taken"], ep["labels"]):
        assert obs == o and env.expert_action() == label
        obs, *_ = env.step(ACTIONS.index(taken))
    ids, labels = encode_episode(tok, ep, 4096)  # trains like an expert transcript
    assert sum(v != -100 for v in labels) == 2 * len(ep["taken"])
    assert 0.0 <= agreement([ep]) <= 1.0


def test_a_round_resumes_and_drops_a_torn_line(tmp_path, tiny_planner_dir):
    model, tok = _load(tiny_planner_dir)
    path = tmp_path / "r1.jsonl"
    with torch.no_grad():
        first = collect_dagger_round(model, tok, ["GoToLocal"], 1, 1, 6, path)
        path.write_text(path.read_text() + '{"level": "GoTo')  # an interrupted write
        both = collect_dagger_round(model, tok, ["GoToLocal"], 2, 1, 6, path)
    assert both[0] == first[0] and [e["seed"] for e in both] == [dagger_seed(1, 0), dagger_seed(1, 1)]
    assert [json.loads(x)["seed"] for x in path.read_text().splitlines()] == [e["seed"] for e in both]


def test_dagger_seeds_are_disjoint_from_expert_and_evaluation_seeds():
    r = PlannerRecipe()
    assert dagger_seed(0, 0) > max(r.episodes_per_level.values()) and dagger_seed(9, 99_999) < 1_000_000_000


def test_schedule_has_a_dagger_phase_after_phase_two():
    r = PlannerRecipe(steps=10, finetune_steps=10, dagger_rounds=2, dagger_steps=5)
    assert [dagger_round_at(r, s) for s in (0, 19, 20, 24, 25, 29)] == [None, None, 0, 0, 1, 1]
    assert lr_at(r, 20) < r.dagger_lr and r.total_steps == 30
    assert PlannerRecipe(dagger_rounds=0).fingerprint() == PlannerRecipe().fingerprint()  # resumes phase 2


def test_a_run_continued_from_a_planner_starts_at_its_weights_and_trains_on_its_own_rollouts(tmp_path,
                                                                                             tiny_planner_dir):
    from safetensors.torch import load_file

    from thrifty.train.planner import train_planner

    recipe = PlannerRecipe(levels=["GoToLocal"], episodes_per_level={"GoToLocal": 4}, steps=0, finetune_steps=0,
                           dagger_rounds=1, dagger_episodes_per_level=2, dagger_max_steps=8, dagger_steps=2,
                           init=str(tiny_planner_dir), threads=1)
    out = train_planner(recipe, tmp_path / "export", tmp_path / "run")
    card = json.loads((out / "card.json").read_text())
    assert card["init"]["model"] == str(tiny_planner_dir) and card["training"]["steps"] == 2
    assert card["dagger"][0]["states_labelled"] > 0
    before, after = load_file(tiny_planner_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tiny_planner_dir).get_vocab()
    # the fingerprint follows the start model's weights: another start model never resumes this run
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes((tiny_planner_dir / "model.safetensors").read_bytes() + b" ")
    (other / "tokenizer.json").write_text("{}")
    assert PlannerRecipe(init=str(other)).fingerprint() != PlannerRecipe(init=str(tiny_planner_dir)).fingerprint()


def test_init_from_a_directory_without_a_planner_is_refused(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="not a planner directory"):
        PlannerRecipe(init=str(tmp_path)).fingerprint()


def test_targets_name_where_the_observation_shows_the_missions_object():
    import random

    from thrifty.train.planner import AUX_CLASSES, aux_class, collect_episode

    seen = 0
    for seed in range(6):
        e = collect_episode("GoToLocal", seed, 0.0, random.Random(seed))
        mission = e["mission"].split(" ", 3)[-1]  # "go to the red key" -> "red key"
        assert len(e["targets"]) == len(e["labels"])
        for obs, target in zip(e["observations"], e["targets"]):
            if target is None:
                continue
            seen += 1
            ahead, right = target
            where = " ".join(p for p in (f"{ahead} ahead" if ahead else "",
                                         f"{abs(right)} {'right' if right > 0 else 'left'}" if right else "") if p)
            assert f"{mission} {where}" in obs, (obs, target)
            assert 0 < aux_class(target) < AUX_CLASSES
    assert seen and aux_class(None) == 0


def test_the_auxiliary_head_trains_and_is_not_exported(tmp_path, tiny_planner_dir):
    from safetensors.torch import load_file

    from thrifty.train.planner import train_planner

    recipe = PlannerRecipe(levels=["GoToLocal"], episodes_per_level={"GoToLocal": 4}, steps=0, finetune_steps=2,
                           aux_weight=0.5, init=str(tiny_planner_dir), threads=1)
    out = train_planner(recipe, tmp_path / "export", tmp_path / "run")
    assert not any(k.startswith("aux_head") for k in load_file(out / "model.safetensors"))
    assert "aux_head.weight" in torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    assert PlannerRecipe(aux_weight=0.5).fingerprint() != PlannerRecipe().fingerprint()
