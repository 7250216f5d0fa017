"""Recipe: the BabyAI-Text planner, a small Llama trained from scratch by behaviour cloning on expert transcripts.

Reads top to bottom:
1. collect expert transcripts on training seeds (BabyAIBot), with DART-style noise: at a few steps a random move is
   *taken* instead of the expert's, so the data shows how to recover, while the label stays the expert's action;
2. train a byte-level BPE tokenizer on the transcripts' text;
3. encode each whole episode as one sequence (mission, then every observation and action; contexts reach 1-2k
   tokens on the multi-room level): decision labels on the action tokens (the expert's word), language-modelling
   labels on every other token (the taken action words are not targets: under DART noise they are random);
4. train the Llama (untied embeddings, not weight-decayed) with AdamW, checkpointing so an interrupted run
   resumes, in three phases: 1 short windows (mission + `window_tokens` consecutive tokens at their true
   positions, `thrifty.train.sequences`), so the attention learns to bind the mission's object to the newest
   observation before it must find it among 2k tokens; 2 whole episodes; 3 optional DAgger rounds;
5. save a Hugging Face model directory (safetensors, tokenizer) plus `card.json` saying how it was made.

Closed-loop success is measured afterwards by `thrifty bench planner` (see README) and written into the card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from thrifty.agents.transcript import Transcript, mission_segment
from thrifty.envs.babyai_text import ACTIONS, BabyAITextEnv, LEVELS, train_seed
from thrifty.train.sequences import Row, adamw_plain_embeddings, collate_rows, make_batches, row_loss, whole_row, windows

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]


@dataclass
class PlannerRecipe:
    levels: list[str] = field(default_factory=lambda: list(LEVELS))
    """levels to collect expert transcripts on"""
    episodes_per_level: dict[str, int] = field(default_factory=lambda: {
        "GoToLocal": 6000, "PickupLoc": 6000, "PutNextLocal": 3000, "GoToObjMazeS4": 1500})
    """expert episodes per level (training seeds 0..n-1 of each level)"""
    noise: float = 0.15
    """probability that a random move (left/right/forward) is taken instead of the expert's action"""
    noisy_episode_fraction: float = 0.5
    """fraction of episodes that get noise; the rest are clean expert runs"""
    vocab_size: int = 512
    """BPE vocabulary size (capped by what the corpus supports)"""
    hidden_size: int = 192
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 4096
    """RoPE positions the model accepts; training sequences are cut at `max_train_tokens`"""
    max_train_tokens: int = 2048
    tokens_per_batch: int = 3_500
    """padded tokens per phase-1 optimisation step"""
    tie_embeddings: bool = False
    """untied, and no weight decay on either embedding: tied, decayed ones collapsed the object-type words (mean
    cosine 0.75) and the planner never bound the mission's object to the observation (docs/babyai.md, issue 2)"""
    memory_repeat: int = 0
    """phase 2 adds every episode with memory steps (the Memory levels' junction) this many more times, labelled only
    at those steps, all but the first copy with a shortened cue-to-junction gap (`memory_rows`); 0 leaves the data
    as it is"""
    lm_weight: float = 0.25
    """weight of the language-modelling loss on the non-decision tokens, next to the decision loss"""
    aux_weight: float = 0.0
    """weight of an auxiliary loss in the whole-episode phases: a linear head on the final hidden state at each
    decision names where the current observation shows the mission's object (`aux_class`: out of view, or one of
    the 7 x 7 cells), the binding the decision needs; the head is dropped at export. 0 = off"""
    window_tokens: int = 256
    """phase 1 rows: the mission line + this many consecutive tokens of an episode"""
    window_overlap: int = 64
    """consecutive windows overlap by this much; each decision label is trained in exactly one window"""
    steps: int = 4000
    """phase 1 (windows) optimisation steps"""
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    finetune_steps: int = 1500
    """phase 2: whole episodes after `steps` of windows"""
    finetune_tokens_per_batch: int = 2_500
    finetune_lr: float = 1e-3
    dagger_rounds: int = 0
    """phase 3: DAgger rounds (`thrifty.train.dagger`): the planner plays fresh training seeds, the expert labels
    every state it visits, and training continues on expert + DAgger episodes"""
    dagger_episodes_per_level: int = 50
    dagger_max_steps: int = 64
    """step cap of a DAgger rollout (failures loop; their first 64 steps hold the states worth relabelling)"""
    dagger_steps: int = 400
    """optimisation steps after each round"""
    dagger_tokens_per_batch: int = 2_500
    dagger_lr: float = 5e-4
    dagger_repeat: int = 3
    """DAgger episodes enter the batch pool this many times (they are few next to the expert transcripts)"""
    init: str | None = None
    """start from this planner directory's weights and tokenizer instead of a new model (e.g. DAgger rounds on the
    shipped planner with `steps=0, finetune_steps=0`); its weights' hash enters the fingerprint"""
    seed: int = 0
    checkpoint_every: int = 25
    threads: int = 2

    @property
    def total_steps(self) -> int:
        return self.steps + self.finetune_steps + self.dagger_rounds * self.dagger_steps

    def dagger_start(self, round_idx: int) -> int:
        """The step at which DAgger round `round_idx` collects its rollouts."""
        return self.steps + self.finetune_steps + round_idx * self.dagger_steps

    def fingerprint(self) -> str:
        """Identifies a training run: a checkpoint is resumed only by the same recipe (phase-2 and DAgger fields may
        change without losing an earlier phase's checkpoint, and `threads` never matters)."""
        data = dataclasses.asdict(self)
        for k in ("finetune_steps", "finetune_tokens_per_batch", "finetune_lr", "memory_repeat", "threads",
                  "checkpoint_every"):
            data.pop(k)
        for k in [k for k in data if k.startswith("dagger_")]:
            data.pop(k)
        for k in ("init", "aux_weight"):  # unset: the fingerprint of recipes written before these fields
            if not data[k]:
                data.pop(k)
        if self.init:  # the start model, by content: a run resumes only on the same weights
            data["init"] = init_weights_hash(self.init)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def data_fingerprint(self) -> str:
        """Identifies the expert transcripts (only the fields that change them)."""
        keys = ("levels", "episodes_per_level", "noise", "noisy_episode_fraction", "seed")
        data = {k: getattr(self, k) for k in keys}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def init_weights_hash(model_dir: str | Path) -> str:
    """sha256 (16 hex digits) of a planner directory's weights; a clear error when it holds no planner."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    if not files or not (d / "tokenizer.json").exists():
        raise FileNotFoundError(f"--init {d}: not a planner directory (it needs *.safetensors and tokenizer.json, "
                                f"as `thrifty train planner` writes them)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn())


# 1. expert transcripts -------------------------------------------------------------------------------------------

def collect_episode(level: str, seed: int, noise: float, rng: random.Random) -> dict:
    """One expert episode; `labels[i]` is the expert's action at step i, `taken[i]` what was done, `memory_steps`
    the steps whose expert action depends on something out of view (`BabyAITextEnv.expert_needs_memory`), and
    `cue_step` the first observation in which the Memory expert saw the cue (None on BabyAI levels), `targets[i]`
    where observation i shows the mission's object ([ahead, right], or None: `BabyAITextEnv.target_in_view`)."""
    env = BabyAITextEnv(level)
    obs, info = env.reset(seed=seed)
    observations, taken, labels, memory_steps, targets = [obs], [], [], [], []
    cue_step = None
    done, reward = False, 0.0
    while not done:
        if cue_step is None and env.expert_has_seen_cue():
            cue_step = len(labels)
        if env.expert_needs_memory():
            memory_steps.append(len(labels))
        expert = env.expert_action()
        targets.append(env.target_in_view(observations[-1]))
        action = rng.choice(ACTIONS[:3]) if rng.random() < noise else expert
        obs, reward, terminated, truncated, _ = env.step(ACTIONS.index(action))
        labels.append(expert)
        taken.append(action)
        observations.append(obs)
        done = terminated or truncated
    env.close()
    return {"level": level, "seed": seed, "mission": info["mission"], "observations": observations[:-1],
            "taken": taken, "labels": labels, "memory_steps": memory_steps, "cue_step": cue_step,
            "targets": targets, "success": reward > 0}


def collect_transcripts(recipe: PlannerRecipe, path: Path) -> list[dict]:
    """Collect (or reload) the recipe's expert transcripts as JSON lines at `path`."""
    if path.exists():
        episodes = [json.loads(line) for line in path.read_text().splitlines()]
        if all("targets" in e for e in episodes):
            return episodes  # (files written before memory_steps, cue_step and targets existed are collected again)
    rng = random.Random(recipe.seed)
    episodes = []
    total = sum(recipe.episodes_per_level[lv] for lv in recipe.levels)
    with _progress() as bar:
        task = bar.add_task("expert transcripts", total=total)
        for level in recipe.levels:
            for i in range(recipe.episodes_per_level[level]):
                noise = recipe.noise if rng.random() < recipe.noisy_episode_fraction else 0.0
                episodes.append(collect_episode(level, train_seed(i), noise, rng))
                bar.advance(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in episodes))
    tmp.replace(path)
    return episodes


# 2. tokenizer ----------------------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # every action word must become one token, even the ones the expert never says (e.g. "done")
    primer = ["".join(f"act: {word}\n" for word in ACTIONS)] * max(200, len(texts))
    tok.train_from_iterator(list(texts) + primer, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    for word in ACTIONS:  # the loss and the parser rely on one token per action word
        ids = hf.encode(f" {word}", add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"action {word!r} is {len(ids)} tokens; collect more data or raise vocab_size")
    return hf


# 3. encoding -----------------------------------------------------------------------------------------------------

def encode_episode(tokenizer, episode: dict, max_tokens: int,
                   only_steps: set[int] | None = None) -> tuple[list[int], list[int]]:
    """Input ids of the whole episode and labels (-100 except on action tokens and their newline; with
    `only_steps`, only on those steps' actions)."""
    t = Transcript(episode["mission"], episode["observations"], episode["taken"])
    ids, labels = [tokenizer.bos_token_id], [-100]
    step = 0
    for kind, text in t.segments():
        piece = tokenizer.encode(text, add_special_tokens=False)
        if kind == "action":
            expert = tokenizer.encode(f" {episode['labels'][step]}", add_special_tokens=False)[0]
            lab = [expert] + piece[1:]  # expert's word as the target; the taken word stays in the input
            if only_steps is not None and step not in only_steps:
                lab = [-100] * len(piece)
            step += 1
        else:
            lab = [-100] * len(piece)
        if len(ids) + len(piece) > max_tokens:
            break
        ids += piece
        labels += lab
    # labels are next-token targets: shift so position i predicts token i+1
    return ids[:-1], labels[1:]


def training_sequence(tokenizer, episode: dict, max_tokens: int) -> tuple[list[int], list[int], list[int], int]:
    """`encode_episode` plus language-modelling labels (every next token except the action words and their
    newline) and the length of the task lines (BOS + mission), which every phase-1 window keeps."""
    ids, labels = encode_episode(tokenizer, episode, max_tokens)
    # labels[i] is the target of position i (ids[i + 1]); the last target lies past the input, unknown here
    lm = [-100 if d != -100 else t for t, d in zip(ids[1:] + [-100], labels)]
    prefix = 1 + len(tokenizer.encode(mission_segment(episode["mission"]), add_special_tokens=False))
    return ids, labels, lm, prefix


def memory_rows(tokenizer, episodes: list[dict], recipe: PlannerRecipe) -> list[Row]:
    """`recipe.memory_repeat` rows per episode with memory steps (the junction of the Memory levels), labelled only
    at those steps: the decisions that need the cue are one step in ~12, so under the plain loss they barely move
    the model. The first copy is the whole episode; each other copy drops a random run of the steps between the cue
    sighting and the first memory step (`shorten_cue_gap`), so the cue-to-turn binding is also seen at short
    distances (a curriculum over distance, not ablated; evaluation episodes are never shortened)."""
    rng = random.Random(recipe.seed)
    out = []
    for e in episodes:
        if not e.get("memory_steps"):
            continue
        for copy in range(recipe.memory_repeat):
            ep = e if copy == 0 else shorten_cue_gap(e, rng)
            x, y = encode_episode(tokenizer, ep, recipe.max_train_tokens, only_steps=set(ep["memory_steps"]))
            out.append(whole_row(x, y, [-100] * len(y)))
    return out


def shorten_cue_gap(episode: dict, rng: random.Random) -> dict:
    """A copy of `episode` without a random contiguous run (0 to all) of the steps strictly between `cue_step` and
    the first memory step; memory steps are renumbered. Unchanged when the episode has no `cue_step`."""
    cue, first = episode.get("cue_step"), min(episode["memory_steps"], default=None)
    if cue is None or first is None or first - cue < 2:
        return episode
    n = rng.randint(0, first - cue - 1)  # how many of the first - cue - 1 middle steps to drop
    start = rng.randint(cue + 1, first - n)
    keep = [i for i in range(len(episode["labels"])) if not start <= i < start + n]
    return {**episode, "observations": [episode["observations"][i] for i in keep],
            "taken": [episode["taken"][i] for i in keep], "labels": [episode["labels"][i] for i in keep],
            "memory_steps": [m - n for m in episode["memory_steps"]], "cue_step": cue}


AUX_CLASSES = 1 + 7 * 7
"""0: the mission's object is not shown; 1 + 7 * ahead + (right + 3): shown that many cells ahead (0..6) and to the
right (-3..3) in the 7x7 view"""


def aux_class(target) -> int:
    if target is None:
        return 0
    ahead, right = target
    return 1 + 7 * ahead + (right + 3)


def aux_labels(episode: dict, labels: list[int], action_ids: set[int]) -> list[int]:
    """Per position of an encoded episode (`encode_episode`'s labels): the auxiliary class of the step decided
    there (positions whose target is an action word, in order), -100 elsewhere."""
    steps = iter(episode.get("targets") or [])
    return [aux_class(next(steps, None)) if y in action_ids else -100 for y in labels]


def training_rows(sequences, recipe: PlannerRecipe, phase: str) -> list[Row]:
    """Phase "windows" cuts every sequence into windows; "whole" keeps them whole."""
    if phase == "whole":
        return [whole_row(x, y, lm) for x, y, lm, _ in sequences]
    return [w for x, y, lm, p in sequences for w in windows(x, y, lm, p, recipe.window_tokens, recipe.window_overlap)]


# 4. training -----------------------------------------------------------------------------------------------------

def build_model(recipe: PlannerRecipe, vocab_size: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=recipe.tie_embeddings, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(cfg)


def load_start_model(model_dir: str | Path):
    """(tokenizer, model) of the planner directory a run continues from (`PlannerRecipe.init`)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    init_weights_hash(model_dir)  # the clear error on a directory that holds no planner
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return tokenizer, LlamaForCausalLM.from_pretrained(str(model_dir), local_files_only=True)


def collate_aux(rows: list[list[int] | None], shape: torch.Size) -> torch.Tensor:
    """[B, T] auxiliary labels of a batch, right-padded with -100 (a row without them: all -100)."""
    out = torch.full(tuple(shape), -100, dtype=torch.long)
    for r, labels in enumerate(rows):
        if labels:
            out[r, :len(labels)] = torch.tensor(labels)
    return out


def _cosine(peak: float, step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def round_at(step: int, start: int, round_steps: int, rounds: int) -> int | None:
    """The round (of `rounds`, each `round_steps` long, the first at `start`) that `step` belongs to, or None
    before `start` or when there are no rounds. Shared by both planner recipes' DAgger phases."""
    if step < start or not rounds:
        return None
    return min((step - start) // round_steps, rounds - 1)


def dagger_round_at(recipe: PlannerRecipe, step: int) -> int | None:
    """The DAgger round that `step` belongs to, or None before phase 3."""
    return round_at(step, recipe.dagger_start(0), recipe.dagger_steps, recipe.dagger_rounds)


def lr_at(recipe: PlannerRecipe, step: int) -> float:
    """Phase 1: warm-up then cosine to 5% of `lr`; phase 2: the same shape again from `finetune_lr`; phase 3:
    the same shape from `dagger_lr` after each DAgger round."""
    if step < recipe.steps:
        return _cosine(recipe.lr, step, recipe.warmup_steps, recipe.steps)
    r = dagger_round_at(recipe, step)
    if r is None:
        return _cosine(recipe.finetune_lr, step - recipe.steps, 20, recipe.finetune_steps)
    return _cosine(recipe.dagger_lr, step - recipe.dagger_start(r), 20, recipe.dagger_steps)


def tokens_per_batch_at(recipe: PlannerRecipe, step: int) -> int:
    if step < recipe.steps:
        return recipe.tokens_per_batch
    return recipe.finetune_tokens_per_batch if dagger_round_at(recipe, step) is None else recipe.dagger_tokens_per_batch


def resume(ckpt: Path, fingerprint: str, model, opt, rng: random.Random) -> tuple[int, list[float], float]:
    """Restore model, optimiser and RNGs from `ckpt` when its fingerprint matches; returns (step, losses,
    train_seconds), (0, [], 0.0) when there is nothing to resume."""
    if not ckpt.exists():
        return 0, [], 0.0
    state = torch.load(ckpt, weights_only=False)
    if state["fingerprint"] != fingerprint:
        return 0, [], 0.0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    rng.setstate(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"], state["losses"], state["train_seconds"]


def save_checkpoint(ckpt: Path, fingerprint: str, model, opt, rng: random.Random, step: int, losses: list[float],
                    train_seconds: float) -> None:
    """Write the resumable state atomically (a temporary file, then a rename)."""
    tmp = ckpt.with_suffix(".tmp")
    torch.save({"fingerprint": fingerprint, "model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "losses": losses, "train_seconds": train_seconds, "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(ckpt)


def _dagger_round(recipe: PlannerRecipe, model, tokenizer, round_idx: int, run_dir: Path, bar) -> dict:
    """Collect DAgger round `round_idx` with the current weights (cached per round in `run_dir`)."""
    from thrifty.train.dagger import agreement, collect_dagger_round

    path = run_dir / f"dagger-{recipe.fingerprint()}-r{round_idx}.jsonl"
    model.eval()
    with torch.no_grad():
        episodes = collect_dagger_round(model, tokenizer, recipe.levels, recipe.dagger_episodes_per_level,
                                        round_idx, recipe.dagger_max_steps, path, progress=bar)
    model.train()
    by_level = {lv: [e for e in episodes if e["level"] == lv] for lv in recipe.levels}
    return {"round": round_idx, "episodes": episodes, "file": path.name,
            "planner_success": {lv: round(sum(e["success"] for e in es) / max(1, len(es)), 3)
                                for lv, es in by_level.items()},
            "planner_expert_agreement": round(agreement(episodes), 4),
            "states_labelled": sum(len(e["labels"]) for e in episodes)}


def train_planner(recipe: PlannerRecipe, out_dir: Path, run_dir: Path, command: str = "",
                  stop_at: int | None = None) -> Path:
    """Run the whole recipe; resumes from `run_dir/checkpoint.pt` when its fingerprint matches.

    `stop_at` ends training at that step of the same schedule (the card records it) and exports the model."""
    last = min(stop_at, recipe.total_steps) if stop_at else recipe.total_steps
    torch.set_num_threads(recipe.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    episodes = collect_transcripts(recipe, run_dir / f"transcripts-{recipe.data_fingerprint()}.jsonl")
    if recipe.init:
        tokenizer, model = load_start_model(recipe.init)
    else:
        texts = [Transcript(e["mission"], e["observations"], e["taken"]).text() for e in episodes]
        tokenizer = train_tokenizer(texts, recipe.vocab_size)
        model = build_model(recipe, len(tokenizer), tokenizer)
    sequences = [training_sequence(tokenizer, e, recipe.max_train_tokens) for e in episodes]
    n_tokens = sum(len(s[0]) for s in sequences)
    n_labels = sum(sum(1 for v in s[1] if v != -100) for s in sequences)
    window_rows, whole_rows = training_rows(sequences, recipe, "windows"), training_rows(sequences, recipe, "whole")
    if recipe.memory_repeat:  # phase 2 also sees each episode's memory decisions alone, memory_repeat times
        whole_rows = whole_rows + memory_rows(tokenizer, episodes, recipe)

    aux_head, aux_of = None, {}
    if recipe.aux_weight:  # whole rows' auxiliary labels by row index (memory and DAgger rows carry none)
        action_ids = {tokenizer.encode(f" {w}", add_special_tokens=False)[0] for w in ACTIONS}
        aux_of = {i: aux_labels(e, s[1], action_ids) for i, (e, s) in enumerate(zip(episodes, sequences))}
        torch.manual_seed(recipe.seed + 1)
        aux_head = torch.nn.Linear(model.config.hidden_size, AUX_CLASSES)
        model.add_module("aux_head", aux_head)  # trained, checkpointed and resumed with the model; dropped at export
    opt = adamw_plain_embeddings(model, recipe.lr, recipe.weight_decay)
    rng = random.Random(recipe.seed)
    ckpt = run_dir / "checkpoint.pt"
    step, losses, train_seconds = resume(ckpt, recipe.fingerprint(), model, opt, rng)
    batches: list[list[int]] = []
    pool = window_rows if step < recipe.steps else whole_rows  # then + DAgger episodes in phase 3
    dagger: dict[int, dict] = {}
    model.train()
    with _progress() as bar:
        task = bar.add_task("planner BC", total=recipe.total_steps, completed=step)
        while step < last:
            if step == recipe.steps:
                pool, batches = whole_rows, []  # phase 2: whole episodes
            r = dagger_round_at(recipe, step)
            if r is not None and r not in dagger:  # phase 3: (re)load or collect rounds 0..r, then regroup
                for k in range(r + 1):
                    if k not in dagger:
                        dagger[k] = _dagger_round(recipe, model, tokenizer, k, run_dir, bar)
                extra = training_rows([training_sequence(tokenizer, e, recipe.max_train_tokens)
                                       for k in sorted(dagger) for e in dagger[k]["episodes"]], recipe, "whole")
                pool = whole_rows + extra * recipe.dagger_repeat
                batches = []
            if not batches:
                batches = make_batches(pool, tokens_per_batch_at(recipe, step), rng)
            t0 = time.time()
            idx = batches.pop()
            batch = collate_rows(pool, idx, tokenizer.pad_token_id)
            for g in opt.param_groups:
                g["lr"] = lr_at(recipe, step)
            if aux_head is not None and pool is not window_rows:
                aux = collate_aux([aux_of.get(i) for i in idx], batch[0].shape)
                loss = row_loss(model, batch, recipe.lm_weight, aux=(aux_head, aux, recipe.aux_weight))
            else:
                loss = row_loss(model, batch, recipe.lm_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            train_seconds += time.time() - t0
            losses.append(round(loss.item(), 5))
            bar.update(task, completed=step, description=f"planner BC loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if step % recipe.checkpoint_every == 0 or step in (recipe.steps, last):
                save_checkpoint(ckpt, recipe.fingerprint(), model, opt, rng, step, losses, train_seconds)

    # 5. save the model directory and its card
    if aux_head is not None:
        del model.aux_head
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    card = {
        "name": "thrifty BabyAI-Text planner",
        "architecture": "LlamaForCausalLM",
        "parameters": sum(p.numel() for p in model.parameters()),
        "recipe": dataclasses.asdict(recipe),
        "command": command or "thrifty train planner",
        "data": {"episodes": len(episodes), "tokens": n_tokens, "labelled_tokens": n_labels,
                 "windows": len(window_rows),
                 "episodes_per_level": {lv: recipe.episodes_per_level[lv] for lv in recipe.levels},
                 "expert_success": sum(e["success"] for e in episodes) / len(episodes),
                 "seeds": "training seeds 0..n-1 per level; evaluation uses seeds >= 1e9 (disjoint)"},
        "seed": recipe.seed,
        "init": {"model": recipe.init, "weights_sha256_16": init_weights_hash(recipe.init)} if recipe.init else None,
        "training": {"steps": step, "schedule_steps": recipe.total_steps, "stopped_early": step < recipe.total_steps, "train_seconds": round(train_seconds, 1),
                     "wall_seconds_this_run": round(time.time() - t_start, 1),
                     "threads": recipe.threads, "final_loss_mean20": sum(losses[-20:]) / max(1, len(losses[-20:]))},
        "dagger": [{k: v for k, v in dagger[r].items() if k != "episodes"} for r in sorted(dagger)],
        "loss_curve_every_50": losses[::50],
        "success": {},
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out_dir


def memory_step_accuracy(model_dir: str | Path, transcripts: str | Path, episodes: int = 150, seed: int = 0) -> dict:
    """Teacher-forced accuracy of a planner at the first memory step (MemoryS13: the turn at the junction) of
    `episodes` transcripts drawn with `seed`: 0.5 on MemoryS13 means the cue-to-turn binding is not learned, even
    on data the model was trained on (then the fault is optimisation, not generalisation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    pool = [e for e in map(json.loads, Path(transcripts).read_text().splitlines()) if e.get("memory_steps")]
    if not pool:
        raise ValueError(f"{transcripts}: no episode has memory steps (collect MemoryS13 transcripts)")
    picked = random.Random(seed).sample(pool, min(episodes, len(pool)))
    right = 0
    for e in picked:
        ids, labels = encode_episode(tokenizer, e, 1 << 30, only_steps={e["memory_steps"][0]})
        i = next(i for i, t in enumerate(labels) if t != -100)
        with torch.no_grad():
            logits = model(torch.tensor([ids[: i + 1]])).logits[0, -1]
        right += int(logits.argmax()) == labels[i]
    return {"accuracy": right / len(picked), "episodes": len(picked)}
