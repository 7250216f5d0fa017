"""Training rows shared by the planner recipes (`thrifty.train.sequences`) and the single-agent planner's encoding."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.train.sequences import collate_rows, make_batches, whole_row, windows


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), prefix=st.integers(1, 20), width=st.integers(2, 64), data=st.data())
def test_windows_keep_true_positions_and_label_each_decision_once(n, prefix, width, data):
    prefix = min(prefix, n - 1)
    overlap = data.draw(st.integers(0, width - 1))
    ids = list(range(1000, 1000 + n))
    labelled = set(data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n)))
    labels = [7 if i in labelled else -100 for i in range(n)]
    lm = [i + 1 for i in range(n)]
    seen = []
    for x, y, z, pos in windows(ids, labels, lm, prefix, width, overlap):
        assert len(x) == len(y) == len(z) == len(pos) <= prefix + width
        assert [ids[p] for p in pos] == x  # every token sits at its true position
        assert pos[:prefix] == list(range(prefix))
        assert z[prefix - 1] == -100  # the task's last token is not followed by its true successor here
        seen += [p for p, v in zip(pos, y) if v != -100 and p >= prefix]
    assert sorted(seen) == sorted(i for i in labelled if i >= prefix)


def test_windows_reject_an_overlap_as_wide_as_the_window():
    with pytest.raises(ValueError, match="overlap"):
        windows([1, 2, 3], [-100] * 3, [-100] * 3, 1, width=4, overlap=4)


def test_batches_cover_every_row_once_and_collate_pads_right():
    rows = [whole_row(list(range(k)), [-100] * k, [1] * k) for k in (3, 5, 9, 2, 7)]
    batches = make_batches(rows, tokens_per_batch=10, rng=random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(5))
    ids, dec, lm, pos, mask = collate_rows(rows, [0, 2], pad_id=0)
    assert ids.shape == (2, 9) and mask[0].tolist() == [1, 1, 1] + [0] * 6 and lm[0, 3:].eq(-100).all()


def test_planner_sequences_label_actions_and_model_the_rest(tiny_planner_dir):
    """Decision labels are the expert's action words (+ newline); the language-modelling labels cover every other
    next token and never an action word (under DART noise the taken word is random); the prefix is BOS + mission."""
    from thrifty.agents.transcript import mission_segment
    from thrifty.train.planner import PlannerRecipe, collect_episode, training_rows, training_sequence

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_planner_dir))
    ep = collect_episode("GoToLocal", 3, noise=0.5, rng=random.Random(1))
    ids, labels, lm, prefix = training_sequence(tok, ep, 4096)
    assert tok.decode(ids[:prefix]) == "<bos>" + mission_segment(ep["mission"])
    for i, (d, m) in enumerate(zip(labels, lm)):
        assert d == -100 or m == -100  # never both
        if d == -100 and i + 1 < len(ids):
            assert m == ids[i + 1]
    actions = [tok.decode([t]).strip() for t in labels if t != -100 and tok.decode([t]).strip()]
    assert actions == ep["labels"]
    recipe = PlannerRecipe(window_tokens=32, window_overlap=8)
    rows = training_rows([(ids, labels, lm, prefix)], recipe, "windows")
    assert sum(v != -100 for r in rows for v in r[1]) == sum(v != -100 for v in labels)


def test_memory_rows_label_only_the_memory_steps(tiny_planner_dir):
    """`memory_rows` gives `memory_repeat` rows per Memory episode, the first the whole episode, each labelling
    exactly the expert's words at its memory steps; BabyAI episodes give none."""
    from transformers import AutoTokenizer

    from thrifty.train.planner import PlannerRecipe, collect_episode, encode_episode, memory_rows

    tok = AutoTokenizer.from_pretrained(str(tiny_planner_dir))
    ep = collect_episode("MemoryRecallS13", 2, noise=0.0, rng=random.Random(2))
    recipe = PlannerRecipe(memory_repeat=4)
    rows = memory_rows(tok, [ep, collect_episode("GoToLocal", 0, noise=0.0, rng=random.Random(0))], recipe)
    assert len(rows) == 4  # the BabyAI episode has no memory step
    assert rows[0][0] == encode_episode(tok, ep, recipe.max_train_tokens)[0]  # the first copy is whole
    assert len({len(r[0]) for r in rows}) > 1  # the others are shortened (seed 0 draws different lengths)
    for ids, dec, lm in (r[:3] for r in rows):
        words = [tok.decode([t]).strip() for t in dec if t != -100 and tok.decode([t]).strip()]
        assert words == [ep["labels"][s] for s in ep["memory_steps"]]
        assert all(v == -100 for v in lm)
    assert memory_rows(tok, [ep], PlannerRecipe(memory_repeat=0)) == []


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 40), noise=st.sampled_from([0.0, 0.2]), draw=st.integers(0, 2**31))
def test_shorten_cue_gap_drops_only_steps_between_cue_and_decision(seed, noise, draw):
    """Property: the shortened episode keeps every step up to the cue sighting and every step from the first memory
    step on (same observations and labels), drops one contiguous run in between, and renumbers the memory steps."""
    from thrifty.train.planner import collect_episode, shorten_cue_gap

    ep = _memory_episode(seed, noise)
    out = shorten_cue_gap(ep, random.Random(draw))
    cue, first = ep["cue_step"], ep["memory_steps"][0]
    n = len(ep["labels"]) - len(out["labels"])
    assert 0 <= n <= max(0, first - cue - 1)
    assert len(out["observations"]) == len(out["taken"]) == len(out["labels"])
    assert out["memory_steps"] == [m - n for m in ep["memory_steps"]]
    for key in ("observations", "taken", "labels"):
        assert out[key][:cue + 1] == ep[key][:cue + 1]
        assert out[key][first - n:] == ep[key][first:]
    assert out["cue_step"] == cue


_EPISODES: dict = {}


def _memory_episode(seed: int, noise: float) -> dict:
    from thrifty.train.planner import collect_episode

    if (seed, noise) not in _EPISODES:
        level = "MemoryS13" if seed % 2 else "MemoryRecallS13"
        _EPISODES[(seed, noise)] = collect_episode(level, seed, noise=noise, rng=random.Random(seed))
    return _EPISODES[(seed, noise)]


def test_memory_step_accuracy_scores_the_junction_of_each_episode(tiny_planner_dir, tmp_path):
    import json

    from thrifty.train.planner import collect_episode, memory_step_accuracy

    eps = [collect_episode("MemoryS13", s, noise=0.0, rng=random.Random(s)) for s in range(3)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in eps))
    out = memory_step_accuracy(tiny_planner_dir, path, episodes=5)
    assert out["episodes"] == 3 and out["accuracy"] in (0, 1 / 3, 2 / 3, 1)
    path.write_text(json.dumps(collect_episode("GoToLocal", 0, noise=0.0, rng=random.Random(0))) + "\n")
    with pytest.raises(ValueError, match="no episode has memory steps"):
        memory_step_accuracy(tiny_planner_dir, path)
