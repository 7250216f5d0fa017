"""Recipe: the cooperative (CoopGrid) planner, a small Llama trained from scratch by behaviour cloning.

Reads top to bottom:
1. train a byte-level BPE tokenizer on the text of a few expert episodes per team size;
2. encode the data *exactly as the agent does at inference*: every expert episode (team sizes mixed, training
   seeds < 1e9; evaluation uses 1e9 + i) is played again with `run_coop_episode`, and every call is tokenised by
   `SharedContextTokens` itself, the object the inference adapter (`thrifty.agents.coop_planner`) uses. One
   training sequence = the token list of one context epoch (it only grows within an epoch, so every call's
   tokens are a prefix of it); the decision tokens right after each `rN do:` prompt are labelled, but only where
   the decision taken equals the expert's label. DART noise: in a fraction of the episodes a random valid
   decision is *taken* at some calls (the sequence shows the resulting state, the label stays the expert's, so
   those calls are not labelled, not even by the language-modelling loss, and the later ones teach recovery);
3. train the Llama with AdamW and checkpointing (an interrupted run resumes; the checkpoint carries the recipe's
   fingerprint), two phases, both with the decision loss plus a language-modelling loss on every context token:
   1 short windows (the task lines + `window_tokens` consecutive tokens, at their true positions), so the
   attention learns to read from the first step; 2 whole sequences (contexts of 0.3-3.5k tokens);
4. save a Hugging Face model directory (safetensors, tokenizer) plus `card.json`.

Why (the previous recipe failed closed loop, success 0 at every K): with tied input/output embeddings and weight
decay on them, the colour and type tokens (unpredictable in the reports, so the output loss pushes their logits
together) collapsed to one input vector (pairwise cosine 0.95 for the six colours, 0.99 for the three types):
the model could not even copy `goto blue key` into `claim: blue key`. Here the embeddings are untied and not
decayed. And the role line now lists the caller's free targets and free rooms (`TeamState.role_text`), so the
facts a decision needs sit next to the prompt instead of 1-3k tokens back.

Closed-loop success per team size is measured afterwards (`measure_coop_planner`, run by
`thrifty train coop-planner` once training ends) and written into the card next to the expert's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from thrifty.agents.coop import CoopConfig, collect_expert_transcript, random_decision, run_coop_episode
from thrifty.agents.coop_context import CoopContext, SharedContextTokens
from thrifty.agents.coop_expert import expert_decision
from thrifty.envs.babyai_text import EVAL_SEED_BASE
from thrifty.train.planner import _cosine, _progress, resume, round_at, save_checkpoint, train_tokenizer
from thrifty.train.sequences import Row, adamw_plain_embeddings, collate_rows, make_batches, row_loss, whole_row, windows

SHIPPED_COOP_PLANNER = Path(__file__).resolve().parent.parent / "assets" / "coop_planner"


@dataclass
class CoopPlannerRecipe:
    team_sizes: list[int] = field(default_factory=lambda: [2, 4, 8])
    """robots per episode; the data mixes them equally"""
    episodes_per_size: int = 400
    """expert episodes per team size, on training seeds 0..n-1"""
    tokenizer_episodes: int = 60
    """episodes per team size whose text trains the tokenizer"""
    noise: float = 0.1
    """DART: probability per call that a random valid decision is taken instead of the expert's"""
    noisy_episode_fraction: float = 0.5
    """fraction of episodes with noise; the rest are clean expert runs"""
    vocab_size: int = 512
    """BPE vocabulary size (the coop text saturates it below 512: byte-level BPE never merges across words)"""
    hidden_size: int = 160
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 416
    tie_embeddings: bool = False
    """untied, and no weight decay on either embedding: tied ones collapsed the colour / type tokens"""
    max_positions: int = 4096
    """RoPE positions; compaction (`CoopConfig.max_records`) keeps contexts below ~3.5k tokens"""
    lm_weight: float = 0.25
    """weight of the mean next-token loss over every context token next to the mean over the decision tokens"""
    window_tokens: int = 384
    """phase 1: windows of this many consecutive tokens, after the task lines"""
    window_overlap: int = 96
    """consecutive windows overlap by this much; the decision labels in a window's first `window_overlap` tokens
    are left to the previous window, so every label is seen once with at least that much context before it"""
    window_steps: int = 1400
    window_tokens_per_batch: int = 3500
    lr: float = 2e-3
    warmup_steps: int = 40
    weight_decay: float = 0.05
    final_steps: int = 500
    """phase 2: whole sequences"""
    final_tokens_per_batch: int = 3500
    final_lr: float = 5e-4
    dagger_rounds: int = 2
    """phase 3: DAgger rounds (`thrifty.train.coop_dagger`): the planner plays fresh training seeds, the expert
    labels its calls; each round then trains `dagger_steps` on the whole sequences + the DAgger rows. Two rounds
    gave the best rollouts on training seeds (round-2 rollouts: 0.94 / 1.0 / 0.94 at K = 2 / 4 / 8); a third
    round fell to 0.2 at K = 8 on the evaluation seeds (docs/coop.md)"""
    dagger_episodes_per_size: int = 16
    dagger_steps: int = 250
    dagger_lr: float = 5e-4
    dagger_repeat: int = 3
    """DAgger rows enter the batch pool this many times"""
    dagger_keep_agreeing: int = 4
    """of the calls the planner got right, one in this many becomes a row (all wrong ones do)"""
    seed: int = 0
    checkpoint_every: int = 25
    threads: int = 1

    @property
    def total_steps(self) -> int:
        return self.window_steps + self.final_steps + self.dagger_rounds * self.dagger_steps

    def dagger_start(self, round_idx: int) -> int:
        return self.window_steps + self.final_steps + round_idx * self.dagger_steps

    def dagger_round_at(self, step: int) -> int | None:
        """The DAgger round that `step` belongs to, or None before phase 3."""
        return round_at(step, self.dagger_start(0), self.dagger_steps, self.dagger_rounds)

    def phase_starts(self) -> tuple[int, ...]:
        return (0, self.window_steps) + tuple(self.dagger_start(r) for r in range(self.dagger_rounds))

    def lr_at(self, step: int) -> float:
        """Each phase (and each DAgger round): warm-up then cosine to 5% of its peak."""
        if step < self.window_steps:
            return _cosine(self.lr, step, self.warmup_steps, self.window_steps)
        r = self.dagger_round_at(step)
        if r is None:
            return _cosine(self.final_lr, step - self.window_steps, 20, self.final_steps)
        return _cosine(self.dagger_lr, step - self.dagger_start(r), 20, self.dagger_steps)

    def tokens_per_batch_at(self, step: int) -> int:
        return self.window_tokens_per_batch if step < self.window_steps else self.final_tokens_per_batch

    def fingerprint(self) -> str:
        """Identifies a training run (`threads` and `checkpoint_every` never matter; the DAgger fields may change
        without losing the checkpoint of phases 1-2)."""
        data = dataclasses.asdict(self)
        for k in ["threads", "checkpoint_every"] + [k for k in data if k.startswith("dagger_")]:
            data.pop(k)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def data_fingerprint(self) -> str:
        keys = ("team_sizes", "episodes_per_size", "tokenizer_episodes", "noise", "noisy_episode_fraction",
                "vocab_size", "seed")
        data = {k: getattr(self, k) for k in keys}
        data["format"] = "role-v2"  # the role line lists free targets and rooms
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# 1. tokenizer ----------------------------------------------------------------------------------------------------

def coop_tokenizer(recipe: CoopPlannerRecipe, config: CoopConfig):
    """A BPE tokenizer trained on the text of `tokenizer_episodes` noisy expert episodes per team size."""
    texts = []
    for k in recipe.team_sizes:
        rng = random.Random(recipe.seed * 1000 + k)
        for s in range(recipe.tokenizer_episodes):
            texts += collect_expert_transcript(k, s, config, recipe.noise, rng)["epochs"]
    return train_tokenizer(texts, recipe.vocab_size)


# 2. encoding = inference encoding -------------------------------------------------------------------------------

def encode_coop_episode(tokenizer, n_robots: int, seed: int, noise: float, rng: random.Random,
                        config: CoopConfig | None = None) -> dict:
    """Play one expert episode (DART noise `noise`) and return its training sequences.

    Returns {"n_robots", "seed", "success", "sequences": [(ids, labels)], "lm_labels": [labels],
    "prefix_tokens": [n], "calls", "labelled_calls"}: one sequence per context epoch, `labels` already shifted
    (position i predicts token i+1; -100 = no loss) on the labelled decisions; `lm_labels` the same shift on
    every token except the decisions taken against the expert's label; `prefix_tokens` the length of the task
    lines (with the BOS). Each call's tokens come from the same `SharedContextTokens` the inference adapter
    uses; the assertions check that they are a prefix of the epoch's sequence and that the decision follows
    the prompt token for token.
    """
    tokens = SharedContextTokens(tokenizer)
    calls: list[tuple[list[int], int, int, str, str]] = []  # (epoch ids, prompt end, hash of call ids, label, taken)
    seen: list[CoopContext] = []

    def decide(ctx: CoopContext, agent: int) -> str:
        if not seen:
            seen.append(ctx)
        ids, _ = tokens.call(ctx, agent)  # exactly what the adapter feeds the model
        label = expert_decision(ctx.state(), agent).text()
        taken = random_decision(ctx, rng).text() if noise and rng.random() < noise else label
        calls.append((tokens.ids, len(ids), hash(tuple(ids)), label, taken))
        return " " + taken

    result = run_coop_episode(decide, n_robots, seed, config)
    ctx = seen[0]
    if ctx.epoch == tokens._epoch:  # the last decisions were appended after the last call: encode them too
        tokens.sync(ctx)
    prefix = tokens.spans["task"][1]  # the same in every epoch: BOS + task + rule lines
    labels_of: dict[int, list[int]] = {}
    lm_of: dict[int, list[int]] = {}
    epochs: dict[int, list[int]] = {}
    labelled = 0
    for seq, end, h, label, taken in calls:
        epochs.setdefault(id(seq), seq)
        lab = labels_of.setdefault(id(seq), [-100] * len(seq))
        lm = lm_of.setdefault(id(seq), list(seq))
        assert hash(tuple(seq[:end])) == h, "a call's tokens are not a prefix of its epoch's sequence"
        target = tokenizer.encode(f" {taken}\n", add_special_tokens=False)
        assert seq[end:end + len(target)] == target, "the decision does not follow the prompt token for token"
        if taken == label:
            lab[end:end + len(target)] = target
            labelled += 1
        else:
            lm[end:end + len(target)] = [-100] * len(target)
    sequences = [(seq[:-1], labels_of[k][1:]) for k, seq in epochs.items()]
    return {"n_robots": n_robots, "seed": seed, "success": result["success"], "sequences": sequences,
            "lm_labels": [lm_of[k][1:] for k in epochs], "prefix_tokens": [prefix] * len(sequences),
            "calls": len(calls), "labelled_calls": labelled}


def encode_dataset(recipe: CoopPlannerRecipe, tokenizer, config: CoopConfig) -> list[dict]:
    rng = random.Random(recipe.seed)
    out = []
    with _progress() as bar:
        task = bar.add_task("expert episodes (encoded)", total=len(recipe.team_sizes) * recipe.episodes_per_size)
        for i in range(recipe.episodes_per_size):
            for k in recipe.team_sizes:  # sizes interleaved so a stopped collection is still balanced
                noise = recipe.noise if rng.random() < recipe.noisy_episode_fraction else 0.0
                out.append(encode_coop_episode(tokenizer, k, i, noise, rng, config))
                bar.advance(task)
    return out


def whole_sequences(episodes: list[dict]) -> list[Row]:
    return [whole_row(x, y, lm) for e in episodes for (x, y), lm in zip(e["sequences"], e["lm_labels"])]


def episode_windows(episodes: list[dict], width: int, overlap: int) -> list[Row]:
    return [w for e in episodes for (x, y), lm, p in zip(e["sequences"], e["lm_labels"], e["prefix_tokens"])
            for w in windows(x, y, lm, p, width, overlap)]


# 3. training -----------------------------------------------------------------------------------------------------

def build_coop_model(recipe: CoopPlannerRecipe, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=recipe.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(cfg)


def _data(recipe: CoopPlannerRecipe, run_dir: Path, config: CoopConfig):
    """The tokenizer and the encoded episodes, cached in `run_dir` (a resumed run reuses them)."""
    from transformers import AutoTokenizer

    fp = recipe.data_fingerprint()
    tok_dir, data_path = run_dir / f"tokenizer-{fp}", run_dir / f"encoded-{fp}.pt"
    if tok_dir.is_dir() and data_path.is_file():
        return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True), torch.load(data_path)
    tokenizer = coop_tokenizer(recipe, config)
    episodes = encode_dataset(recipe, tokenizer, config)
    tokenizer.save_pretrained(tok_dir)
    tmp = data_path.with_suffix(".tmp")
    torch.save(episodes, tmp)
    tmp.replace(data_path)
    return tokenizer, episodes


def _dagger_round(recipe: CoopPlannerRecipe, model, tokenizer, round_idx: int, run_dir: Path, bar) -> dict:
    """Collect DAgger round `round_idx` with the current weights (cached per round in `run_dir`)."""
    from thrifty.agents.coop_planner import EVAL_CONFIG, CoopPlanner
    from thrifty.backbones import HFDecoder
    from thrifty.techniques import build
    from thrifty.train.coop_dagger import agreement, collect_coop_dagger_round

    path = run_dir / f"dagger-{recipe.fingerprint()}-r{round_idx}.jsonl"
    model.eval()
    planner = CoopPlanner(HFDecoder.from_model(model), tokenizer, build("prefix_reuse", store_bytes=0))
    with torch.no_grad():
        episodes = collect_coop_dagger_round(planner, recipe.team_sizes, recipe.dagger_episodes_per_size, round_idx,
                                             path, recipe.window_tokens, recipe.dagger_keep_agreeing, EVAL_CONFIG,
                                             progress=bar)
    model.train()
    by_size = {k: [e for e in episodes if e["n_robots"] == k] for k in recipe.team_sizes}
    return {"round": round_idx, "episodes": episodes, "file": path.name,
            "planner_success": {str(k): round(sum(e["success"] for e in es) / max(1, len(es)), 3)
                                for k, es in by_size.items()},
            "planner_expert_agreement": {str(k): round(agreement(es), 4) for k, es in by_size.items()},
            "rows": sum(len(e["rows"]) for e in episodes)}


def train_coop_planner(recipe: CoopPlannerRecipe, out_dir: Path, run_dir: Path, command: str = "",
                       config: CoopConfig | None = None) -> Path:
    """Run the recipe; resumes from `run_dir/checkpoint.pt` when its fingerprint matches. Returns `out_dir`."""
    config = config or CoopConfig()
    torch.set_num_threads(recipe.threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tokenizer, episodes = _data(recipe, run_dir, config)
    pools = {0: episode_windows(episodes, recipe.window_tokens, recipe.window_overlap),
             recipe.window_steps: whole_sequences(episodes)}
    encoded = pools[recipe.window_steps]
    n_tokens = sum(len(r[0]) for r in encoded)
    n_labels = sum(sum(1 for v in r[1] if v != -100) for r in encoded)

    model = build_coop_model(recipe, tokenizer)
    opt = adamw_plain_embeddings(model, recipe.lr, recipe.weight_decay)
    rng = random.Random(recipe.seed)
    ckpt = run_dir / "checkpoint.pt"
    step, losses, train_seconds = resume(ckpt, recipe.fingerprint(), model, opt, rng)
    batches: list[list[int]] = []
    dagger: dict[int, dict] = {}
    model.train()
    with _progress() as bar:
        task = bar.add_task("coop planner BC", total=recipe.total_steps, completed=step)
        while step < recipe.total_steps:
            r = recipe.dagger_round_at(step)
            if r is not None and r not in dagger:  # phase 3: (re)load or collect rounds 0..r, then regroup
                for k in range(r + 1):
                    if k not in dagger:
                        dagger[k] = _dagger_round(recipe, model, tokenizer, k, run_dir, bar)
                rows = [(d["ids"], d["labels"], [-100] * len(d["ids"]), d["positions"])
                        for k in sorted(dagger) for e in dagger[k]["episodes"] for d in e["rows"]]
                pools[recipe.dagger_start(r)] = pools[recipe.window_steps] + rows * recipe.dagger_repeat
                batches = []
            pool = pools[max(s for s in pools if s <= step)]
            if step in recipe.phase_starts():
                batches = []  # every phase regroups the data
            if not batches:
                batches = make_batches(pool, recipe.tokens_per_batch_at(step), rng)
            t0 = time.time()
            batch = collate_rows(pool, batches.pop(), tokenizer.pad_token_id)
            for g in opt.param_groups:
                g["lr"] = recipe.lr_at(step)
            loss = row_loss(model, batch, recipe.lm_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            train_seconds += time.time() - t0
            losses.append(round(loss.item(), 5))
            bar.update(task, completed=step,
                       description=f"coop planner BC loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if step % recipe.checkpoint_every == 0 or step in recipe.phase_starts() + (recipe.total_steps,):
                save_checkpoint(ckpt, recipe.fingerprint(), model, opt, rng, step, losses, train_seconds)

    # 4. the model directory and its card
    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    by_size = {k: [e for e in episodes if e["n_robots"] == k] for k in recipe.team_sizes}
    card = {
        "name": "thrifty CoopGrid planner",
        "architecture": "LlamaForCausalLM",
        "parameters": sum(p.numel() for p in model.parameters()),
        "recipe": dataclasses.asdict(recipe),
        "env_config": dataclasses.asdict(config),
        "command": command or "thrifty train coop-planner",
        "data": {"episodes": len(episodes), "sequences": len(encoded), "tokens": n_tokens,
                 "labelled_tokens": n_labels, "windows": len(pools[0]), "calls": sum(e["calls"] for e in episodes),
                 "labelled_calls": sum(e["labelled_calls"] for e in episodes),
                 "expert_success_with_noise": {str(k): round(sum(e["success"] for e in es) / max(1, len(es)), 3)
                                               for k, es in by_size.items()},
                 "seeds": f"training seeds 0..{recipe.episodes_per_size - 1} per team size; evaluation uses "
                          f"{EVAL_SEED_BASE} + i (disjoint)",
                 "encoding": "SharedContextTokens, the inference adapter's own encoder (asserted per call)"},
        "seed": recipe.seed,
        "training": {"steps": step, "phase_starts": list(recipe.phase_starts()),
                     "train_seconds": round(train_seconds, 1), "wall_seconds_this_run": round(time.time() - t_start, 1),
                     "threads": recipe.threads, "final_loss_mean20": sum(losses[-20:]) / max(1, len(losses[-20:]))},
        "dagger": [{k: v for k, v in dagger[r].items() if k != "episodes"} for r in sorted(dagger)],
        "loss_curve_every_25": losses[::25],
        "success": {},
    }
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out_dir


# Stage 1 data for the coop pruner (`thrifty train saliency --data` with coop transcripts) --------------------------

def decision_changes(calls: list[dict]) -> list[int]:
    """Indices of the calls whose expert label differs from the same robot's previous label (its first call
    included): the moments a robot is (re)assigned. Most calls repeat the robot's current subgoal, which almost
    any pruned context still gets right; these are where pruning can flip a decision."""
    last: dict[int, str] = {}
    out = []
    for j, c in enumerate(calls):
        if last.get(c["agent"]) != c["label"]:
            out.append(j)
        last[c["agent"]] = c["label"]
    return out


def coop_saliency_samples(tokenizer, records: list[dict], n: int, rng: random.Random, max_tokens: int = 4096,
                          per_episode: int = 3, change_share: float = 0.5) -> list:
    """Up to `n` saliency samples from coop transcripts (`collect_expert_transcripts` records, or closed-loop
    planner records from `collect_planner_transcript`, as JSON lines), team sizes drawn in turn.

    Each episode is replayed with the decisions it took, and a few of its calls (where the expert's label was
    taken; with probability `change_share` each pick is one of the `decision_changes`) become samples exactly
    as the adapter tokenises them (`SharedContextTokens`): ids = the call's tokens
    followed by the first tokens of ' <label>\\n' up to a random cut before the newline (teacher forcing); the
    decision positions predict the label's tokens up to and including the one after the cut, so the last token's
    prediction is a decision token (what the pruner's held-out evaluation compares with the full model).
    Spans: mission = the task lines, observation = the caller's role line, its prompt and the decision; the
    caller's own latest observation is *not* a protected span here (a Stage 1 sample holds two spans), so the
    scorer also learns to rank it, while inference protects it (`COOP_PROTECT`).
    """
    from thrifty.train.saliency import Sample

    by_size: dict[int, list[dict]] = {}
    for rec in records:
        by_size.setdefault(int(rec["n_robots"]), []).append(rec)
    sizes = sorted(by_size)
    out: list = []
    for i in range(50 * n):
        if len(out) >= n or not sizes:
            break
        rec = rng.choice(by_size[sizes[i % len(sizes)]])
        good = [j for j, c in enumerate(rec["calls"]) if c["taken"] == c["label"]]
        changes = set(decision_changes(rec["calls"])) & set(good)
        picks: set[int] = set()
        for _ in range(min(per_episode, len(good), n - len(out))):
            pool = sorted(changes - picks) if changes - picks and rng.random() < change_share else \
                sorted(set(good) - picks)
            picks.add(rng.choice(pool))
        tokens = SharedContextTokens(tokenizer)
        state = {"call": 0}

        def decide(ctx: CoopContext, agent: int) -> str:
            j = state["call"]
            state["call"] += 1
            call = rec["calls"][j]
            if j in picks:
                ids, spans = tokens.call(ctx, agent)
                target = tokenizer.encode(f" {call['label']}\n", add_special_tokens=False)
                cut = rng.randrange(len(target) - 1)  # the sample ends inside the decision, before its newline
                full = ids + target[:cut]
                if len(full) <= max_tokens:
                    out.append(Sample(full, spans["task"], (spans["role"][0], len(full)),
                                      list(range(len(ids) - 1, len(full))), target[:cut + 1], f"K{rec['n_robots']}"))
            return " " + call["taken"]

        run_coop_episode(decide, int(rec["n_robots"]), int(rec["seed"]))
    return out[:n]


def write_coop_transcripts(path: Path, team_sizes=(2, 4, 8), episodes_per_size: int = 200, noise: float = 0.1,
                           first_seed: int = 100_000, seed: int = 0) -> Path:
    """Coop expert transcripts (training seeds from `first_seed` on, disjoint from the planner's data and from
    evaluation) as JSON lines: the data file `thrifty train saliency --data` reads for a coop model."""
    from thrifty.agents.coop import collect_expert_transcripts

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for k in team_sizes:
        seeds = list(range(first_seed, first_seed + episodes_per_size))
        lines += [json.dumps(r) for r in collect_expert_transcripts(k, seeds, noise=noise, seed=seed * 100 + k)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_planner_transcripts(path: Path, model_dir: str | Path, team_sizes=(8,), episodes_per_size: int = 100,
                              first_seed: int = 300_000, threads: int = 1) -> Path:
    """Closed-loop transcripts of the planner at `model_dir` (constrained decoding, exact prefix reuse), seeds from
    `first_seed` on (disjoint from the expert transcripts, the planner's data and evaluation), appended one JSON
    line per episode: an interrupted run resumes where it stopped."""
    import torch
    from rich.progress import Progress

    from thrifty.agents.coop_planner import CoopPlanner, collect_planner_transcript
    from thrifty.techniques import build

    torch.set_num_threads(threads)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept: list[str] = []
    if path.is_file():  # a line cut short by an interrupted run is dropped and its episode played again
        for line in path.read_text().splitlines():
            try:
                json.loads(line)
                kept.append(line)
            except json.JSONDecodeError:
                continue
        path.write_text("".join(line + "\n" for line in kept))
    done = {(r["n_robots"], r["seed"]) for r in map(json.loads, kept)}
    todo = [(k, first_seed + i) for k in team_sizes for i in range(episodes_per_size) if (k, first_seed + i) not in done]
    if not todo:
        return path
    planner = CoopPlanner.load(model_dir, build("prefix_reuse", store_bytes=0), constrained=True)
    with Progress() as bar, path.open("a") as f:
        task = bar.add_task("closed-loop planner transcripts", total=len(todo))
        for k, seed in todo:
            f.write(json.dumps(collect_planner_transcript(planner, k, seed)) + "\n")
            f.flush()
            bar.advance(task)
    return path
