"""Demonstrations: the scripted expert's episodes on training layouts, written as memory-mappable shards.

Two domains: Meta-World (the scripted experts; below) and BabyAI grid tasks (`babyai-<Level>`, minigrid's bot;
`thrifty.envs.babyai_grid`), where state is (T, 151), action and taken are (T, 1) action indices, and the noise
executes a random turn or step forward.

Layout of a demonstration directory::

    DIR/manifest.json          format, tasks, instructions, the collection settings, one entry per finished shard
    DIR/shards/<task>-<k>.safetensors

A shard holds `episodes_per_shard` consecutive episodes of one task, concatenated along time (T steps in all):

    state   (T, 39) float32   the observation the action was chosen in
    action  (T, 4)  float32   the expert's action there: the label
    taken   (T, 4)  float32   the action executed (a random one with probability `noise`, else the expert's)
    reward  (T,)    float32   Meta-World's reward after the executed action
    success (T,)    uint8     Meta-World's success flag after it
    episode (T,)    int32     the episode's layout seed (train_seed(i))
    step    (T,)    int32     step index within the episode
    task_id (T,)    int16     index in thrifty.envs.metaworld.TASKS
    frame   (T, H, W, 3) uint8   only when collected with frames

Safetensors is a header plus raw little-endian arrays, so `DemoSet` maps each array with `np.memmap` (nothing is
read until it is used). Collection is deterministic (episode i of a task plays layout train_seed(first_seed + i),
its noise drawn from a generator seeded by (seed, task id)) and resumable: a shard is written to a temporary name,
renamed, then recorded in the manifest, so an interrupted run redoes at most the shard it was writing.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "thrifty-demos/1"
ARRAYS = ("state", "action", "taken", "reward", "success", "episode", "step", "task_id")
_DTYPES = {"F32": np.float32, "U8": np.uint8, "I32": np.int32, "I16": np.int16, "F64": np.float64, "I64": np.int64}


class DemoDirError(ValueError):
    """A demonstration directory that does not match what was asked (another task set, settings or format)."""


@dataclass(frozen=True)
class CollectSettings:
    """What identifies a collection: resuming with other settings is refused."""

    tasks: tuple[str, ...]
    episodes: int
    """episodes per task"""
    noise: float = 0.0
    """probability of executing a uniform random action instead of the expert's (the label stays the expert's)"""
    max_steps: int = 200
    """step cap per episode"""
    first_seed: int = 0
    """episode i plays layout train_seed(first_seed + i)"""
    episodes_per_shard: int = 25
    frames: bool = False
    camera: str = "corner"
    size: int = 64
    domain: str = "metaworld"
    """"metaworld" or "babyai" (tasks named babyai-<Level>)"""

    def __post_init__(self) -> None:
        if self.domain not in ("metaworld", "babyai"):
            raise ValueError(f"unknown demonstration domain {self.domain!r}; choose metaworld or babyai")
        if self.domain == "babyai" and (self.frames or not all(t.startswith("babyai-") for t in self.tasks)):
            raise ValueError(f"BabyAI demonstrations take tasks named babyai-<Level> and no frames, got "
                             f"{list(self.tasks)} with frames={self.frames}")
        if self.episodes < 1 or self.episodes_per_shard < 1:
            raise ValueError(f"episodes and episodes_per_shard must be >= 1, got {self.episodes}, "
                             f"{self.episodes_per_shard}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise is a probability in [0, 1], got {self.noise}")
        if self.first_seed < 0:
            raise ValueError(f"first_seed must be >= 0, got {self.first_seed}")


# ---------------------------------------------------------------------- shard files
def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as one safetensors file, atomically (temporary name, fsync, rename)."""
    from safetensors.numpy import save_file

    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def map_shard(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every array of a safetensors shard (read-only views; nothing is loaded until used)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        dtype = np.dtype(_DTYPES[spec["dtype"]]).newbyteorder("<")
        count = (end - start) // dtype.itemsize
        if count == 0:
            out[name] = np.zeros(spec["shape"], dtype)
            continue
        out[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=tuple(spec["shape"]))
    return out


# ---------------------------------------------------------------------- collection
def play_episode(env, expert: Callable, seed: int, noise: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One expert episode on layout `seed`, with DART-style noise on the executed actions; arrays of its steps."""
    obs, _ = env.reset(seed=seed)
    rows: dict[str, list] = {k: [] for k in ("state", "action", "taken", "reward", "success", "frame")}
    while True:
        label = expert(obs["state"])
        taken = rng.uniform(-1.0, 1.0, size=4).astype(np.float32) if rng.random() < noise else label
        rows["state"].append(obs["state"])
        if "frame" in obs:
            rows["frame"].append(obs["frame"])
        obs, reward, terminated, truncated, info = env.step(taken)
        rows["action"].append(label)
        rows["taken"].append(taken)
        rows["reward"].append(reward)
        rows["success"].append(info["success"])
        if terminated or truncated:
            break
    t = len(rows["action"])
    out = {"state": np.stack(rows["state"]).astype(np.float32), "action": np.stack(rows["action"]).astype(np.float32),
           "taken": np.stack(rows["taken"]).astype(np.float32), "reward": np.asarray(rows["reward"], np.float32),
           "success": np.asarray(rows["success"], np.uint8), "episode": np.full(t, seed, np.int32),
           "step": np.arange(t, dtype=np.int32), "task_id": np.full(t, env.task_id, np.int16)}
    if rows["frame"]:
        out["frame"] = np.stack(rows["frame"]).astype(np.uint8)
    return out


def play_babyai_episode(env, seed: int, noise: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One bot episode of a BabyAI grid task; with probability `noise` a random left/right/forward is executed
    instead (the bot replans from wherever that leads; its action stays the label)."""
    obs, _ = env.reset(seed=seed)
    rows: dict[str, list] = {k: [] for k in ("state", "action", "taken", "reward", "success")}
    while True:
        label = obs["expert_action"]
        taken = int(rng.integers(0, 3)) if rng.random() < noise else label
        rows["state"].append(obs["state"])
        obs, reward, terminated, truncated, info = env.step(taken)
        rows["action"].append([label])
        rows["taken"].append([taken])
        rows["reward"].append(reward)
        rows["success"].append(info["success"])
        if terminated or truncated:
            break
    t = len(rows["action"])
    return {"state": np.stack(rows["state"]).astype(np.float32), "action": np.asarray(rows["action"], np.float32),
            "taken": np.asarray(rows["taken"], np.float32), "reward": np.asarray(rows["reward"], np.float32),
            "success": np.asarray(rows["success"], np.uint8), "episode": np.full(t, seed, np.int32),
            "step": np.arange(t, dtype=np.int32), "task_id": np.zeros(t, np.int16)}


@dataclass
class Manifest:
    format: str
    settings: dict
    instructions: dict[str, str]
    shards: list[dict] = field(default_factory=list)

    @staticmethod
    def path(root: Path) -> Path:
        return Path(root) / "manifest.json"

    def save(self, root: Path) -> None:
        p = self.path(root)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self) | {"counts": self.counts()}, indent=2) + "\n")
        os.replace(tmp, p)

    def counts(self) -> dict:
        per_task: dict[str, dict] = {}
        for s in self.shards:
            c = per_task.setdefault(s["task"], {"episodes": 0, "steps": 0, "expert_successes": 0})
            c["episodes"] += len(s["seeds"])
            c["steps"] += s["steps"]
            c["expert_successes"] += s["successes"]
        for c in per_task.values():
            c["expert_success"] = round(c["expert_successes"] / max(1, c["episodes"]), 4)
        return {"episodes": sum(c["episodes"] for c in per_task.values()),
                "steps": sum(c["steps"] for c in per_task.values()), "per_task": per_task}


def _open_manifest(root: Path, settings: CollectSettings) -> Manifest:
    from thrifty.envs.metaworld import INSTRUCTIONS

    p = Manifest.path(root)
    want = json.loads(json.dumps(asdict(settings)))
    if not p.exists():
        if settings.domain == "babyai":
            from thrifty.envs.babyai_grid import BabyAIGridEnv

            instructions = {}
            for t in settings.tasks:
                env = BabyAIGridEnv(t)
                instructions[t] = env.reset(seed=0)[1]["mission"]
                env.close()
            return Manifest(FORMAT, want, instructions)
        return Manifest(FORMAT, want, {t: INSTRUCTIONS[t] for t in settings.tasks})
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DemoDirError(f"{p} is not valid JSON ({e}); delete the directory or pass --out with another path") from e
    if raw.get("format") != FORMAT:
        raise DemoDirError(f"{p} has format {raw.get('format')!r}, not {FORMAT!r}: not a thrifty demonstration "
                           "directory; pass --out with another path")
    have = {"domain": "metaworld", **raw.get("settings", {})}  # directories from before BabyAI were Meta-World's
    if have != want:
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        raise DemoDirError(f"{root} holds demonstrations collected with other settings {diff} (theirs, asked); "
                           "pass --out with another path to collect these, or the same settings to resume")
    return Manifest(raw["format"], have, raw["instructions"], raw.get("shards", []))


def collect(root: str | Path, settings: CollectSettings, progress: Callable[[int], None] | None = None) -> Manifest:
    """Collect (or resume) the demonstrations `settings` describe into `root`; `progress(episodes_done)`."""
    from thrifty.envs.metaworld import TASKS, MetaWorldEnv, scripted_expert, train_seed

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    manifest = _open_manifest(root, settings)
    done = {s["file"] for s in manifest.shards}
    for task in settings.tasks:
        if settings.domain == "babyai":
            from thrifty.envs.babyai_grid import BabyAIGridEnv

            env, expert = BabyAIGridEnv(task), None
        else:
            env = MetaWorldEnv(task, max_steps=settings.max_steps, render=settings.frames, camera=settings.camera,
                               size=settings.size)
            expert = scripted_expert(task)
        for k, start in enumerate(range(0, settings.episodes, settings.episodes_per_shard)):
            name = f"shards/{task}-{k:04d}.safetensors"
            seeds = [train_seed(settings.first_seed + i)
                     for i in range(start, min(settings.episodes, start + settings.episodes_per_shard))]
            if name in done:
                if progress:
                    progress(len(seeds))
                continue
            episodes = []
            for seed in seeds:
                if expert is None:
                    rng = np.random.default_rng([seed, settings.tasks.index(task)])
                    episodes.append(play_babyai_episode(env, seed, settings.noise, rng))
                else:
                    rng = np.random.default_rng([seed, TASKS.index(task)])
                    episodes.append(play_episode(env, expert, seed, settings.noise, rng))
                if progress:
                    progress(1)
            arrays = {key: np.concatenate([e[key] for e in episodes]) for key in episodes[0]}
            write_shard(root / name, arrays)
            manifest.shards.append({"file": name, "task": task, "seeds": seeds, "steps": int(len(arrays["step"])),
                                    "successes": int(sum(int(e["success"][-1]) for e in episodes))})
            manifest.save(root)
        env.close()
    manifest.save(root)
    return manifest


# ---------------------------------------------------------------------- reading
class DemoSet:
    """A demonstration directory, read through memory maps. `arrays(tasks)` concatenates the shards' arrays."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        p = Manifest.path(self.root)
        if not p.exists():
            raise DemoDirError(f"no demonstrations at {self.root} (no manifest.json); collect them with "
                               "`thrifty collect metaworld --tasks MT10 --episodes N --out DIR`")
        raw = json.loads(p.read_text())
        if raw.get("format") != FORMAT:
            raise DemoDirError(f"{p} has format {raw.get('format')!r}, not {FORMAT!r}")
        self.manifest = raw
        self.settings = raw["settings"]
        self.tasks = tuple(self.settings["tasks"])

    def shard_arrays(self) -> list[tuple[str, dict[str, np.ndarray]]]:
        return [(s["task"], map_shard(self.root / s["file"])) for s in self.manifest["shards"]]

    def arrays(self, tasks: tuple[str, ...] | None = None, names: tuple[str, ...] = ARRAYS) -> dict[str, np.ndarray]:
        """The named arrays of every shard of `tasks` (default all), concatenated (this copies them into memory)."""
        tasks = tasks or self.tasks
        missing = [t for t in tasks if t not in self.tasks]
        if missing:
            raise DemoDirError(f"{self.root} has no demonstrations of {missing}; it holds {list(self.tasks)}")
        shards = [a for t, a in self.shard_arrays() if t in tasks]
        if not shards:
            raise DemoDirError(f"{self.root} has no finished shard yet; resume its collection first")
        return {n: np.concatenate([np.asarray(a[n]) for a in shards]) for n in names}

    def counts(self) -> dict:
        return self.manifest.get("counts", {})
