"""Recipe, Stage 1 of E-RECAP: per-token saliency at the prune layers, the ranking target of the pruner.

Reads top to bottom:
1. decision samples: by default the planner's own transcripts (each sample = an episode cut at a random step:
   mission, observations and actions so far, the current observation and the decision prompt, exactly as the
   agent builds it; the target is the expert's action); or instruction data in Dolly-15k JSONL form
   (instruction, context, response; the targets are the response tokens);
2. a frozen forward of the model, layer by layer, on right-padded batches (padding is masked out of attention,
   of the loss and of the saliency), with the LM loss on the decision tokens only;
3. saliency of token t at prune layer l: sal_l[t] = sum_d h_l[t, d] * dL/dh_l[t, d] (gradient x hidden state
   at the layer's output, signed, as E-RECAP; Stage 2 ranks by its magnitude);
4. one safetensors file: the token ids, spans, decision positions and targets of every sample, the saliency of
   every token at every prune layer, and metadata (model, its weights fingerprint, data, layers, seed).

Differences from E-RECAP's Stage 1 (see docs/pruning.md): padding is masked; the model's parameters are frozen
(only activation gradients are computed); the loss is on the tokens the planner must predict.
"""

from __future__ import annotations

import glob
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from thrifty.backbones import HFDecoder

FORMAT = "thrifty-saliency/1"
DEFAULT_TRANSCRIPTS = "runs/planner/transcripts-*.jsonl"
"""Where `thrifty train planner` leaves the expert transcripts the planner was trained on."""


@dataclass
class Sample:
    """One decision context. ids [T]; spans in positions (end exclusive); decisions: positions whose next-token
    prediction is scored, targets: the tokens they must predict."""

    ids: list[int]
    mission: tuple[int, int]
    observation: tuple[int, int]
    decisions: list[int]
    targets: list[int]
    level: str = ""

    @property
    def spans(self) -> dict[str, tuple[int, int]]:
        return {"mission": self.mission, "observation": self.observation, "stable_prefix": (0, self.observation[0])}


@dataclass
class SaliencyRecipe:
    samples: int = 1500
    """decision samples (episodes cut at random steps, or instruction records)"""
    layers: tuple[int, ...] | None = None
    """prune layers; None: derived from the model depth (thrifty.techniques.pruning_common)"""
    max_tokens: int = 2048
    """longer samples are skipped"""
    min_prunable: int = 24
    """planner samples with fewer tokens outside mission, current observation, first 4 and newest 16 are skipped"""
    memory_share: float = 0.5
    """planner episodes with memory steps (the Memory levels' junction) are cut at one of those steps with this
    probability: elsewhere the decision rarely needs old context, so uniform cuts can teach the pruner to drop it"""
    tokens_per_batch: int = 6000
    seed: int = 0
    threads: int = 1


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn())


# 1. samples --------------------------------------------------------------------------------------------------------

def find_transcripts(pattern: str = DEFAULT_TRANSCRIPTS) -> Path | None:
    """The newest planner transcripts file matching `pattern`, or None."""
    files = sorted(glob.glob(pattern), key=lambda f: Path(f).stat().st_mtime)
    return Path(files[-1]) if files else None


def data_kind(path: Path) -> str:
    """"planner" (thrifty transcripts) or "dolly" (instruction/context/response JSONL), from the first record."""
    with open(path) as f:
        first = f.readline()
    try:
        rec = json.loads(first)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON lines ({e})") from e
    if {"mission", "observations", "taken"} <= set(rec):
        return "planner"
    if {"instruction", "response"} <= set(rec):
        return "dolly"
    if {"n_robots", "seed", "calls"} <= set(rec):
        return "coop"
    raise ValueError(f"{path}: records have keys {sorted(rec)}; expected planner transcripts (mission, observations, "
                     f"taken, labels), Dolly-15k records (instruction, context, response) or coop transcripts "
                     f"(n_robots, seed, calls: thrifty.agents.coop.collect_expert_transcripts)")


def planner_sample(tokenizer, episode: dict, step: int) -> Sample:
    """The context the agent builds before deciding at `step` of a transcript episode; target: the expert action."""
    from thrifty.agents.planner import PlannerContext

    ctx = PlannerContext(tokenizer)
    ctx.start(episode["mission"])
    for i in range(step + 1):
        ctx.add_observation(episode["observations"][i])
        if i < step:
            ctx.add_action(episode["taken"][i])
    labels = episode.get("labels") or episode["taken"]
    target = tokenizer.encode(f" {labels[step]}", add_special_tokens=False)[0]
    n = len(ctx.ids)
    return Sample(list(ctx.ids), ctx.spans["mission"], ctx.spans["observation"], [n - 1], [target],
                  episode.get("level", ""))


def dolly_sample(tokenizer, rec: dict) -> Sample:
    """[bos] instruction (mission span), context (prunable), response (decision tokens, protected)."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    m0 = len(ids)
    ids += tokenizer.encode(f"instruction: {rec['instruction']}\n", add_special_tokens=False)
    m1 = len(ids)
    if rec.get("context"):
        ids += tokenizer.encode(f"context: {rec['context']}\n", add_special_tokens=False)
    ids += tokenizer.encode("response:", add_special_tokens=False)
    r0 = len(ids)
    ids += tokenizer.encode(f" {rec['response']}", add_special_tokens=False)
    decisions = list(range(r0 - 1, len(ids) - 1))
    return Sample(ids, (m0, m1), (r0 - 1, len(ids)), decisions, ids[r0:], "dolly")


def _prunable(sample: Sample, sink: int = 4, recent: int = 16) -> int:
    n = len(sample.ids)
    prot = set(range(min(sink, n))) | set(range(max(0, n - recent), n))
    for s, e in (sample.mission, sample.observation):
        prot |= set(range(s, e))
    return n - len(prot)


def load_samples(tokenizer, data: str | Path | None, n: int, seed: int, max_tokens: int = 2048,
                 min_prunable: int = 24, episodes: list[dict] | None = None,
                 memory_share: float = 0.5) -> tuple[list[Sample], dict]:
    """`n` samples from `data` (None: the planner transcripts, collected afresh if none are on disk).

    Planner samples: episodes drawn level by level in turn, each cut at a uniformly random step (an episode with
    memory steps: at one of them with probability `memory_share`); cuts whose context has fewer than
    `min_prunable` prunable tokens are redrawn (they teach nothing). Returns the samples
    and a description of the data for the metadata.
    """
    rng = random.Random(seed)
    desc: dict[str, Any] = {"kind": "planner", "source": "episodes given in memory"}
    if episodes is None and data is None:
        data = find_transcripts()
        if data is None:
            episodes = _fresh_transcripts(seed)
            desc["source"] = "expert transcripts collected afresh (thrifty.train.planner.collect_episode)"
    if episodes is None:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"no data file at {path}")
        kind = data_kind(path)
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        desc = {"kind": kind, "source": str(path), "records": len(records)}
        if kind == "dolly":
            rng.shuffle(records)
            out = []
            for rec in records:
                if len(out) == n:
                    break
                s = dolly_sample(tokenizer, rec)
                if len(s.ids) <= max_tokens:
                    out.append(s)
            desc["samples"] = len(out)
            return out, desc
        if kind == "coop":  # calls replayed through SharedContextTokens, see thrifty.train.coop_planner
            from thrifty.train.coop_planner import coop_saliency_samples

            out = coop_saliency_samples(tokenizer, records, n, rng, max_tokens)
            desc.update(samples=len(out), per_team_size={k: sum(s.level == f"K{k}" for s in out) for k in (2, 4, 8)},
                        records_by_source={src: sum(r.get("source", "expert") == src for r in records)
                                           for src in sorted({r.get("source", "expert") for r in records})})
            return out, desc
        episodes = records
    by_level: dict[str, list[dict]] = {}
    for e in episodes:
        if e.get("observations"):
            by_level.setdefault(e.get("level", ""), []).append(e)
    levels = sorted(by_level)
    out, tries = [], 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        level = levels[len(out) % len(levels)]
        ep = rng.choice(by_level[level])
        memory = ep.get("memory_steps") or []  # (no draw without them: BabyAI samples are as before)
        if memory and rng.random() < memory_share:
            step = rng.choice(memory)
        else:
            step = rng.randrange(len(ep["observations"]))
        s = planner_sample(tokenizer, ep, step)
        if len(s.ids) <= max_tokens and _prunable(s) >= min_prunable:
            out.append(s)
    desc["samples"] = len(out)
    desc["per_level"] = {lv: sum(1 for s in out if s.level == lv) for lv in levels}
    if any(e.get("memory_steps") for e in episodes):
        desc["memory_share"] = memory_share
    return out, desc


def _fresh_transcripts(seed: int, per_level: int = 150) -> list[dict]:
    from thrifty.envs.babyai_text import LEVELS, train_seed
    from thrifty.train.planner import collect_episode

    rng = random.Random(seed)
    episodes = []
    with _progress() as bar:
        task = bar.add_task("expert transcripts", total=per_level * len(LEVELS))
        for level in LEVELS:
            for i in range(per_level):
                episodes.append(collect_episode(level, train_seed(i), 0.1, rng))
                bar.advance(task)
    return episodes


# 2. the layer-by-layer forward on padded batches --------------------------------------------------------------

def pad_batch(samples: list[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, n] right-padded with pad_id, valid [B, n] (True on real tokens)."""
    n = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    valid = torch.zeros((len(samples), n), dtype=torch.bool)
    for i, s in enumerate(samples):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        valid[i, : len(s.ids)] = True
    return ids, valid


def batched_forward(backbone: HFDecoder, ids: torch.Tensor, valid: torch.Tensor,
                    after_layer: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None,
                    track_input: bool = False) -> torch.Tensor:
    """Final hidden states [B, n, d] of right-padded ids [B, n] (valid [B, n] bool), run layer by layer.

    Padding is right-padding, so under the causal mask a real token never sees a pad; pad rows are garbage that
    callers ignore. `after_layer(l, h [B, n, d])` may return a key bias [B, n] (log of a soft keep mask) that is
    added to the attention scores of those keys in every deeper layer, accumulating: a bias of -inf is exactly
    the token dropped after layer l (for every query but its own).
    `track_input`: make the embeddings require grad, so activation gradients exist with a frozen model.
    """
    B, n = ids.shape
    if not bool((valid[:, :-1] | ~valid[:, 1:]).all()):
        raise ValueError("batched_forward needs right padding (valid tokens first in every row)")
    pos = torch.arange(n, device=backbone.device)
    h = backbone.embed(ids)
    if track_input:
        h = h.detach().requires_grad_(True)
    pe = backbone.rotary(h, pos)
    low = torch.finfo(h.dtype).min
    sdpa = backbone.is_sdpa
    bias = None
    for l in range(backbone.n_layers):
        if bias is None and sdpa and backbone.sliding_window(l) is None:
            mask = None  # plain causal: sdpa's is_causal
        else:
            mask = backbone.attention_mask(pos, pos, l)
            if bias is not None:
                mask = (mask + bias[:, None, None, :]).clamp(min=low)  # [B, 1, n, n]
        h = backbone.run_layer(l, h, pos, mask, None, position_embeddings=pe)
        if after_layer is not None:
            extra = after_layer(l, h)
            if extra is not None:
                bias = extra if bias is None else bias + extra
    return h


def length_batches(lengths: list[int], tokens_per_batch: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length so a padded batch holds about `tokens_per_batch` tokens; shuffled."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, cur_max = [], [], 0
    for i in order:
        if cur and max(cur_max, lengths[i]) * (len(cur) + 1) > tokens_per_batch:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, lengths[i])
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def decision_logits(backbone: HFDecoder, h: torch.Tensor, samples: list[Sample]) -> torch.Tensor:
    """Logits [M, vocab] at every decision position of the batch's samples, in order."""
    rows = [(i, p) for i, s in enumerate(samples) for p in s.decisions]
    b = torch.tensor([r[0] for r in rows], device=h.device)
    p = torch.tensor([r[1] for r in rows], device=h.device)
    return backbone.logits(h[b, p])


# 3. saliency ---------------------------------------------------------------------------------------------------

def compute_saliency(backbone: HFDecoder, samples: list[Sample], layers: tuple[int, ...], pad_id: int,
                     tokens_per_batch: int = 6000, seed: int = 0) -> dict[int, list[torch.Tensor]]:
    """layer -> one float32 tensor [T_i] per sample: sum_d h * dL/dh at the layer's output (padding excluded)."""
    out: dict[int, list[torch.Tensor | None]] = {l: [None] * len(samples) for l in layers}
    batches = length_batches([len(s.ids) for s in samples], tokens_per_batch, random.Random(seed))
    with _progress() as bar:
        task = bar.add_task("saliency (stage 1)", total=len(samples))
        for idx in batches:
            batch = [samples[i] for i in idx]
            ids, valid = pad_batch(batch, pad_id)
            kept: dict[int, torch.Tensor] = {}

            def grab(l: int, h: torch.Tensor) -> None:
                if l in layers:
                    h.retain_grad()
                    kept[l] = h
                return None

            with torch.enable_grad():
                h = batched_forward(backbone, ids, valid, grab, track_input=True)
                logits = decision_logits(backbone, h, batch)
                targets = torch.tensor([t for s in batch for t in s.targets], device=logits.device)
                # sum over samples of each sample's mean loss: every sample weighs the same
                weights = torch.tensor([1.0 / len(s.targets) for s in batch for _ in s.targets], device=logits.device)
                ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
                (ce * weights).sum().backward()
            for l, hl in kept.items():
                sal = (hl.detach() * hl.grad).sum(-1).float().cpu()  # [B, n]
                for r, i in enumerate(idx):
                    out[l][i] = sal[r, : len(samples[i].ids)].clone()
            bar.advance(task, len(idx))
    return out  # type: ignore[return-value]


# 4. the saliency file ---------------------------------------------------------------------------------------------

def save_saliency(path: Path, samples: list[Sample], saliency: dict[int, list[torch.Tensor]], meta: dict) -> Path:
    from safetensors.torch import save_file

    lengths = [len(s.ids) for s in samples]
    n_dec = [len(s.decisions) for s in samples]
    tensors = {
        "ids": torch.tensor([t for s in samples for t in s.ids], dtype=torch.long),
        "offsets": torch.tensor([0] + list(_cumsum(lengths)), dtype=torch.long),
        "spans": torch.tensor([[*s.mission, *s.observation] for s in samples], dtype=torch.long).reshape(-1, 4),
        "decision_offsets": torch.tensor([0] + list(_cumsum(n_dec)), dtype=torch.long),
        "decisions": torch.tensor([p for s in samples for p in s.decisions], dtype=torch.long),
        "targets": torch.tensor([t for s in samples for t in s.targets], dtype=torch.long),
    }
    for l, sal in saliency.items():
        tensors[f"saliency.{l}"] = torch.cat(sal).float()
    meta = dict(meta, format=FORMAT, levels=[s.level for s in samples])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"thrifty": json.dumps(meta)})
    return path


def load_saliency(path: str | Path) -> tuple[list[Sample], dict[int, list[torch.Tensor]], dict]:
    """Samples, layer -> per-sample saliency [T_i], and the metadata of a Stage 1 file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saliency file at {path} (make one with `thrifty train saliency`)")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("thrifty", "{}"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a thrifty saliency file (format {meta.get('format')!r})")
        t = {k: f.get_tensor(k) for k in f.keys()}
    off, doff = t["offsets"].tolist(), t["decision_offsets"].tolist()
    ids, dec, tgt, spans = t["ids"].tolist(), t["decisions"].tolist(), t["targets"].tolist(), t["spans"].tolist()
    levels = meta.get("levels") or [""] * (len(off) - 1)
    samples = [Sample(ids[off[i]:off[i + 1]], (spans[i][0], spans[i][1]), (spans[i][2], spans[i][3]),
                      dec[doff[i]:doff[i + 1]], tgt[doff[i]:doff[i + 1]], levels[i]) for i in range(len(off) - 1)]
    saliency = {int(k.split(".")[1]): [v[off[i]:off[i + 1]] for i in range(len(off) - 1)]
                for k, v in t.items() if k.startswith("saliency.")}
    return samples, saliency, meta


def _cumsum(xs: list[int]):
    total = 0
    for x in xs:
        total += x
        yield total


# the whole recipe --------------------------------------------------------------------------------------------------

def train_saliency(model_dir: str | Path, out: str | Path, data: str | Path | None = None,
                   layers: tuple[int, ...] | list[int] | None = None, samples: int = 1500, seed: int = 0,
                   max_tokens: int = 2048, threads: int = 1, command: str = "", memory_share: float = 0.5) -> Path:
    """Stage 1: write the saliency file `out` for the model in `model_dir` (see the module docstring)."""
    from transformers import AutoTokenizer

    from thrifty.techniques.pruning_common import check_prune_layers, default_prune_layers
    from thrifty.techniques.token_pruning import model_fingerprint

    if not 0.0 <= memory_share <= 1.0:
        raise ValueError(f"memory_share must be in [0, 1], got {memory_share}")
    recipe = SaliencyRecipe(samples=samples, layers=tuple(layers) if layers else None, max_tokens=max_tokens,
                            seed=seed, threads=threads, memory_share=memory_share)
    torch.set_num_threads(recipe.threads)
    t0 = time.time()
    backbone = HFDecoder.load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    n_layers = backbone.n_layers
    prune_layers = check_prune_layers(recipe.layers, n_layers) if recipe.layers else default_prune_layers(n_layers)
    data_samples, desc = load_samples(tokenizer, data, recipe.samples, recipe.seed, recipe.max_tokens,
                                      recipe.min_prunable, memory_share=recipe.memory_share)
    if not data_samples:
        raise ValueError(f"no usable samples in {desc.get('source')}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sal = compute_saliency(backbone, data_samples, prune_layers, pad, recipe.tokens_per_batch, recipe.seed)
    meta = {
        "model": str(model_dir), "model_fingerprint": model_fingerprint(backbone), "n_layers": n_layers,
        "hidden_size": backbone.shape.d_model, "layers": list(prune_layers), "data": desc,
        "tokens": sum(len(s.ids) for s in data_samples), "recipe": asdict(recipe), "seed": recipe.seed,
        "loss": "cross-entropy of the decision tokens (planner: the expert action; dolly: the response)",
        "seconds": round(time.time() - t0, 1), "command": command or "thrifty train saliency",
    }
    return save_saliency(Path(out), data_samples, sal, meta)
