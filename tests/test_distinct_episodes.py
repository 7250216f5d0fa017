"""Distinct-episode accounting (issue 23): every result row names its episode (`episode_key`), summaries and
intervals count each distinct episode once, collapsing seeds are reported, and every shipped suite's seeds give at
least the distinct episodes its definition states (by resetting the envs only: no model)."""

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from thrifty.bench.coop import EPISODES, MIN_DISTINCT, TEAM_SIZES, coop_distinct_episodes, eval_config
from thrifty.bench.coop_report import summarize_coop
from thrifty.bench.paired import paired_difference, paired_rows
from thrifty.bench.report import collapse_warning, distinct_success, print_table, summarize, wilson_interval
from thrifty.bench.suites import SUITES, BenchConfig, SeedsCollapseError, Suite
from thrifty.cli import app
from thrifty.envs import BabyAITextEnv, eval_seed
from thrifty.envs.babyai_text import episode_keys


# --- the key ------------------------------------------------------------------------------------------------------

def test_episode_key_follows_the_initial_state_not_the_seed():
    """Hand-made seed lists: a repeated seed is one episode; MemoryRecallS13's seeds give one episode per cue type
    (its walls, start and junction are fixed), so the count of distinct keys is the count of distinct cues."""
    seeds = [eval_seed(i) for i in (0, 1, 0, 2, 1)]
    keys = episode_keys("GoToLocal", seeds)
    assert keys[0] == keys[2] and keys[1] == keys[4] and len(set(keys)) == 3
    recall = [eval_seed(i) for i in range(12)]
    cues = []
    for seed in recall:
        env = BabyAITextEnv("MemoryRecallS13")
        env.reset(seed=seed)
        u = env._env.unwrapped
        cues.append(u.grid.get(1, u.height // 2 - 1).type)
    keys = episode_keys("MemoryRecallS13", recall)
    assert len(set(keys)) == len(set(cues)) == 2
    assert all((keys[i] == keys[j]) == (cues[i] == cues[j]) for i in range(12) for j in range(12))
    # the same initial grid on another level is another episode
    assert episode_keys("MemoryS13", recall[:1]) != episode_keys("MemoryRecallS13", recall[:1])


def test_coop_rows_carry_the_key_of_their_episode():
    from thrifty.agents.coop import run_coop_episode
    from thrifty.agents.coop_expert import expert_decide

    env = eval_config().make_env(2)
    env.reset(seed=eval_seed(0))
    result = run_coop_episode(expert_decide, 2, eval_seed(0), eval_config())
    assert result["episode_key"] == env.episode_key()
    env4 = eval_config().make_env(4)
    env4.reset(seed=eval_seed(0))
    assert env4.episode_key() != env.episode_key()  # another team on the same seed is another episode


# --- summaries over distinct episodes -----------------------------------------------------------------------------

def _ep(config, seed, success, key, level="L"):
    row = {"config": config, "level": level, "seed": seed, "success": success}
    if key is not None:
        row["episode_key"] = key
    return row


def test_summary_counts_each_distinct_episode_once_by_its_mean_success():
    """Six seeds, two episodes: A solves episode x on all four of its seeds and y on neither of two: 1 of 2, not
    4 of 6; R solves x on one of its four replays (a random technique): x scores 0.25."""
    rows = [_ep("A", s, s < 4, "x" if s < 4 else "y") for s in range(6)]
    rows += [_ep("R", s, s == 0, "x" if s < 4 else "y") for s in range(6)]
    a, r = summarize(rows)
    assert (a["episodes"], a["distinct_episodes"], a["success"]) == (6, 2, 0.5)
    assert (a["success_lo"], a["success_hi"]) == pytest.approx(wilson_interval(1, 2))
    assert r["distinct_episodes"] == 2 and r["success"] == pytest.approx(0.125)
    assert (r["success_lo"], r["success_hi"]) == pytest.approx(wilson_interval(0.25, 2))
    assert distinct_success(rows[:6]) == (1.0, 2)


def test_rows_without_a_key_are_each_their_own_episode():
    """Backward compatible: results written before episode_key (and policy rows) summarize as before."""
    old = [_ep("A", s, s % 3 == 0, None) for s in range(6)]
    (a,) = summarize(old)
    assert (a["episodes"], a["distinct_episodes"], a["success"]) == (6, 6, pytest.approx(2 / 6))
    assert (a["success_lo"], a["success_hi"]) == pytest.approx(wilson_interval(2, 6))
    assert collapse_warning([a]) is None
    mixed = old + [_ep("A", 9, True, "k"), _ep("A", 10, True, "k")]
    assert summarize(mixed)[0]["distinct_episodes"] == 7


def test_the_table_shows_distinct_episodes_and_warns_when_seeds_collapse():
    rows = summarize([_ep("full", s, True, "xy"[s % 2], "MemoryRecallS13") for s in range(40)]
                     + [_ep("other", s, True, str(s), "GoToLocal") for s in range(5)], by_level=True)
    out = io.StringIO()
    print_table(rows, console=Console(file=out, width=200), title="t")
    text = out.getvalue()
    assert "distinct" in text and "warning:" in text
    assert "MemoryRecallS13: 40 seeds gave 2 distinct episodes (1 config: full)" in text
    assert "GoToLocal" not in collapse_warning(rows)
    clean = io.StringIO()
    print_table(rows[1:], console=Console(file=clean, width=200), title="t")
    assert "warning" not in clean.getvalue()


def test_paired_comparison_counts_distinct_episodes():
    """40 seeds of 2 episodes: full solves both, a config loses one: 1 of 2 pairs lost, not 20 of 40, and the
    interval is the paired one of 2 pairs."""
    rows = [_ep("full", s, True, "xy"[s % 2]) for s in range(40)]
    rows += [_ep("pruned", s, s % 2 == 0, "xy"[s % 2]) for s in range(40)]
    (r,) = paired_rows(rows)
    assert (r["pairs"], r["distinct_pairs"], r["both"], r["reference_only"], r["config_only"]) == (40, 2, 1, 1, 0)
    assert (r["difference"], r["difference_lo"], r["difference_hi"]) == pytest.approx(paired_difference(1, 1, 0, 0))
    # a random technique losing episode y on half its seeds: half a pair lost
    rows = [_ep("full", s, True, "xy"[s % 2]) for s in range(8)]
    rows += [_ep("random", s, s % 4 != 1, "xy"[s % 2]) for s in range(8)]
    (r,) = paired_rows(rows)
    assert r["distinct_pairs"] == 2 and r["both"] == 1.5 and r["reference_only"] == 0.5
    # without keys every seed is its own pair, as before
    (r,) = paired_rows([_ep("full", s, True, None) for s in range(4)] + [_ep("b", s, s < 2, None) for s in range(4)])
    assert (r["pairs"], r["distinct_pairs"], r["reference_only"]) == (4, 4, 2)


def test_coop_summary_counts_distinct_episodes():
    base = {"calls": 2, "rounds": 3, "malformed": 0, "context_tokens_mean": 10, "tokens_per_round_mean": 20}
    records = [{**base, "config": "expert", "level": "K2", "seed": s, "success": s % 2 == 0, "episode_key": "ab"[s % 2]}
               for s in range(4)]
    (row,) = summarize_coop(records)
    assert (row["episodes"], row["distinct_episodes"], row["success"]) == (4, 2, 0.5)


# --- the floors of the shipped suites -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SUITES))
def test_every_shipped_suite_meets_its_distinct_episode_floor(name):
    suite = SUITES[name]
    counts = suite.check_distinct()
    assert set(counts) == set(suite.levels)
    assert all(n >= suite.distinct_floor for n in counts.values()), counts


def test_the_memory_suites_state_their_honest_floors():
    """MemoryRecallS13's 40 seeds are 2 episodes: `memory-recall`'s floor says so rather than claiming 40; the
    `memory` suite's level gives a distinct episode per seed."""
    recall = SUITES["memory-recall"]
    assert recall.episodes == 40 and recall.min_distinct == 2
    assert recall.distinct_episodes() == {"MemoryRecallS13": 2}
    memory = SUITES["memory"]
    assert memory.levels == ("MemoryVariedTyped",) and memory.min_distinct >= 0.9 * memory.episodes >= 60
    assert memory.distinct_episodes() == {"MemoryVariedTyped": memory.episodes}


def test_coop_seeds_are_distinct_per_team_size():
    assert coop_distinct_episodes() == {k: EPISODES for k in TEAM_SIZES} and MIN_DISTINCT == EPISODES


def test_a_suite_whose_seeds_collapse_below_its_floor_is_refused():
    collapsing = Suite("collapsing", "d", (BenchConfig("full"),), levels=("MemoryRecallS13", "GoToLocal"),
                       episodes=10, min_distinct=5)
    with pytest.raises(SeedsCollapseError, match=r"only 2 on MemoryRecallS13 distinct episodes, below its floor of 5"):
        collapsing.check_distinct()
    assert collapsing.check_distinct(("GoToLocal",)) == {"GoToLocal": 10}
    with pytest.raises(SeedsCollapseError, match="floor of 10"):  # no floor stated: every seed distinct
        Suite("x", "d", (BenchConfig("full"),), levels=("MemoryRecallS13",), episodes=10).check_distinct()
    with pytest.raises(ValueError, match="min_distinct must be in 1..10"):
        Suite("x", "d", (BenchConfig("full"),), episodes=10, min_distinct=11)
    with pytest.raises(ValueError, match="min_distinct must be in 1..10"):
        Suite("x", "d", (BenchConfig("full"),), episodes=10, min_distinct=0)


def test_thrifty_bench_refuses_a_suite_below_its_floor(monkeypatch, tmp_path):
    monkeypatch.setitem(SUITES, "collapsing", Suite("collapsing", "d", (BenchConfig("full"),),
                                                    levels=("MemoryRecallS13",), episodes=6, min_distinct=3))
    r = CliRunner().invoke(app, ["bench", "collapsing", "--out", str(tmp_path / "c.jsonl")])
    assert r.exit_code == 2 and "below its floor of 3" in r.output
    assert not (tmp_path / "c.jsonl").exists()
