"""`thrifty memory-level`: the three figures that say whether a memory level tests memory (issue 23).

On the evaluation seeds eval_seed(0..n-1) of a level:

- `distinct_fraction`: distinct episodes (`BabyAITextEnv.episode_key`: level, initial grid, start pose, mission)
  over seeds; MemoryRecallS13 gives 2 of 40, so every figure measured on it is a figure over two episodes;
- `expert_success`: the level's expert, acting only on what it has seen (`VariedMemoryExpert` on MemoryVaried);
- `blind_success`: the same expert never recording the cue's name (`blind=True`: at the junction it takes the
  first object it saw). MemoryVaried makes the matching arm independent of everything but the cue, so this is
  chance, 1/2; only MemoryVaried has a cue-blind expert (None elsewhere).

Success figures carry 95% Wilson intervals (`thrifty.bench.report.wilson_interval`).
"""

from __future__ import annotations

from thrifty.bench.report import distinct_success, wilson_interval
from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv, level_id
from thrifty.envs.memory_expert import VariedMemoryExpert
from thrifty.envs.memory_varied import MemoryVariedEnv
from thrifty.envs.seeds import eval_seed


def _play(env: BabyAITextEnv, seed: int, blind: bool) -> bool:
    env.reset(seed=seed)
    if blind:
        env._bot = VariedMemoryExpert(env._env.unwrapped, blind=True)
    done, reward = False, 0.0
    while not done:
        _, reward, terminated, truncated, _ = env.step(ACTIONS.index(env.expert_action()))
        done = terminated or truncated
    return reward > 0


def measure_memory_level(level: str = "MemoryVaried", episodes: int = 200) -> dict:
    """The level's distinct episodes, expert success and cue-blind expert success over `episodes` evaluation seeds
    (module doc). Raises `UnknownLevelError` for an unknown level, ValueError for episodes < 1."""
    level_id(level)
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    env = BabyAITextEnv(level)
    seeds = [eval_seed(i) for i in range(episodes)]
    keys = []
    for seed in seeds:
        env.reset(seed=seed)
        keys.append(env.episode_key)
    varied = isinstance(env._env.unwrapped, MemoryVariedEnv)
    out = {"level": level, "episodes": episodes, "distinct_episodes": len(set(keys)),
           "distinct_fraction": len(set(keys)) / episodes}
    for name, blind in (("expert", False), ("blind", True)):
        if blind and not varied:
            out.update({f"{name}_success": None, f"{name}_success_ci95": None})
            continue
        # success over distinct episodes: seeds that replay one episode count once (thrifty.bench.report)
        score, n = distinct_success([{"success": _play(env, seed, blind), "episode_key": key}
                                     for seed, key in zip(seeds, keys)])
        out[f"{name}_success"] = score / n
        out[f"{name}_success_ci95"] = list(wilson_interval(score, n))
    env.close()
    return out
