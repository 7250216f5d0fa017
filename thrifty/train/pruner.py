"""Recipe, Stage 2 of E-RECAP: the token scorers, trained against the frozen planner.

Reads top to bottom:
1. load the Stage 1 file (decision samples, saliency per prune layer); hold out a seeded fraction for evaluation;
2. one scorer per prune layer (`TokenScorer`: rms-normalised hidden -> d/4 -> 1), trained with the model frozen.
   At prune layer j the scores of the prunable tokens still present are standardised per sample and thresholded
   at exactly the count inference keeps there (E-RECAP's compounding keep ratio); the soft keep mask is
   m = sigmoid((z - threshold) / temperature), with logistic noise on z for exploration; tokens under the
   threshold leave the present set (as at inference). log(m) is added to that token's attention scores as a
   *key* in every deeper layer, so a mask of 0 is exactly the hard drop done at inference and 1 the full model;
3. loss, summed over all prune layers (never overwritten per layer):
   kl_weight     * KL(full model || soft-masked model) of the next-token distribution at the decision tokens
 + rank_weight   * pairwise logistic ranking of the keep logits against |Stage 1 saliency| (sampled pairs)
 + budget_weight * (mean soft keep of the prunable tokens after prune layer j - k_j / P)^2 (small by
                   construction of the threshold; it corrects the sigmoid's asymmetry around it);
   padding is excluded everywhere; scorers are trained in float32 with Adam;
4. evaluate on the held-out samples with *hard* pruning through the real runtime (`Session` + the technique):
   next-action agreement and KL with the full model, for token_pruning and its count-matched baselines;
5. save safetensors (+ metadata: model id and weights fingerprint, hidden size, layers, data) and a JSON card.

Differences from E-RECAP's Stage 2 (docs/pruning.md): its saliency losses were overwritten by every non-prune
layer and never reached the gradient; its soft masks scaled hidden states, which the next RMSNorm undoes; the
final norm was skipped before the head; no term tied the masks to the keep budget; training was pure fp16.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from thrifty.backbones import HFDecoder
from thrifty.cost import forward_flops
from thrifty.runtime import Session
from thrifty.techniques import DecisionContext, Technique, build
from thrifty.techniques.pruning_common import keep_counts, protected_mask
from thrifty.techniques.token_pruning import TokenScorer, model_fingerprint
from thrifty.train.saliency import (Sample, _progress, batched_forward, decision_logits, length_batches, load_saliency,
                                    pad_batch)

BASELINES = ("random_pruning", "recency_pruning", "sink_window")


@dataclass
class PrunerRecipe:
    keep_ratio: float = 0.6
    """the compounding per-layer keep ratio the budget term aims at (inference may use any other)"""
    keep_jitter: float = 0.0
    """each batch trains at a keep ratio drawn uniformly from keep_ratio +- keep_jitter (0.3 was tried: worse than
    random on held-out contexts for the shipped planner)"""
    max_kept: int | None = None
    """token cap trained for (the inference setting `max_kept`): at most this many prunable tokens survive each
    prune layer, on top of the keep ratio. Long contexts then train at the harsh budgets a cap gives them at
    inference; None: no cap"""
    steps: int = 300
    """optimisation steps"""
    lr: float = 2e-3
    tokens_per_batch: int = 4000
    """padded tokens per step"""
    temperature: float = 0.1
    """soft-mask temperature, in standard deviations of the layer's standardised scores"""
    noise: float = 0.3
    """scale of the logistic noise added to the standardised scores during training (exploration)"""
    kl_weight: float = 1.0
    rank_weight: float = 0.1
    """small: on the shipped planner the KL term carries the signal (docs/pruning.md)"""
    budget_weight: float = 4.0
    rank_pairs: int = 128
    """sampled token pairs per sample and prune layer for the ranking loss"""
    sink_tokens: int = 4
    recent_tokens: int = 16
    holdout: float = 0.15
    """fraction of the samples held out for the evaluation"""
    eval_samples: int = 150
    """held-out samples evaluated (hard pruning, all baselines)"""
    seed: int = 0
    threads: int = 1


# 2. soft masks ---------------------------------------------------------------------------------------------------

def prunable_mask(samples: list[Sample], n: int, recipe: PrunerRecipe) -> torch.Tensor:
    """[B, n] True where a token may be dropped (real tokens outside the protected set)."""
    out = torch.zeros(len(samples), n, dtype=torch.bool)
    for i, s in enumerate(samples):
        pos = torch.arange(len(s.ids))
        prot = protected_mask(pos, s.spans, ("mission", "observation"), recipe.sink_tokens, recipe.recent_tokens,
                              len(s.ids))
        out[i, : len(s.ids)] = ~prot
    return out


def train_budgets(n_prunable: int, layers: tuple[int, ...], n_layers: int, keep_ratio: float,
                  max_kept: int | None) -> list[int]:
    """Prunable tokens kept after each prune layer, exactly as inference counts them (compound schedule, then
    the cap)."""
    return keep_counts(n_prunable, 0, layers, n_layers, "compound", keep_ratio, max_kept)[0]


def masked_student(backbone: HFDecoder, scorer: TokenScorer, ids: torch.Tensor, valid: torch.Tensor,
                   prunable: torch.Tensor, keep_ratio: float, temperature: float, noise: float,
                   gen: torch.Generator | None, max_kept: int | None = None):
    """Soft-pruned forward at the inference budget.

    At prune layer j the scorer's logits of the prunable tokens still present (`alive`, hard) are standardised
    per sample (so the scorer sets the ranking, not the sharpness), perturbed by logistic noise of scale `noise`
    (exploration), and thresholded at the k_j-th largest, k_j being exactly the count inference keeps there
    (`train_budgets`: compound schedule, then the cap `max_kept`). Soft mask m = sigmoid((z - threshold) /
    temperature); tokens below the threshold leave `alive`. Returns the final hidden [B, n, d], the raw logits per prune layer [B, n] and the
    cumulative log keep mask per prune layer [B, n] (0 on protected and padding tokens).
    """
    B = ids.shape[0]
    n_pr = prunable.sum(-1).tolist()
    budgets = [train_budgets(int(p), scorer.layers, backbone.n_layers, keep_ratio, max_kept) for p in n_pr]
    alive = prunable.clone()
    scores: dict[int, torch.Tensor] = {}
    cum: dict[int, torch.Tensor] = {}
    total = torch.zeros(ids.shape, dtype=torch.float32)

    def after(l: int, h: torch.Tensor):
        nonlocal total, alive
        if l not in scorer.layers:
            return None
        j = scorer.layers.index(l)
        s = scorer(l, h.float())  # [B, n]
        scores[l] = s
        cnt = alive.sum(-1, keepdim=True).clamp(min=1)
        mean = (s * alive).sum(-1, keepdim=True) / cnt
        std = (((s - mean) ** 2 * alive).sum(-1, keepdim=True) / cnt).add(1e-6).sqrt()
        z = (s - mean) / std
        if gen is not None and noise > 0:
            u = torch.rand(s.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
            z = z + noise * (torch.log(u) - torch.log1p(-u))
        ranked = torch.where(alive, z.detach(), torch.full_like(z, float("-inf"))).sort(-1, descending=True).values
        k = torch.tensor([budgets[b][j] for b in range(B)])
        # threshold halfway between the last kept and the first dropped (open-ended when nothing or all stay)
        top = ranked.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)
        nxt = ranked.gather(1, k.clamp(max=ranked.shape[1] - 1)[:, None]).squeeze(1)
        thr = torch.where(k == 0, ranked[:, 0] + 1.0, torch.where(torch.isfinite(nxt), (top + nxt) / 2, top - 1.0))
        logm = F.logsigmoid((z - thr[:, None]) / temperature) * alive
        alive = alive & (z.detach() > thr[:, None])
        total = total + logm
        cum[l] = total
        return logm.to(h.dtype)

    h = batched_forward(backbone, ids, valid, after)
    return h, scores, cum


def rank_loss(scores: torch.Tensor, saliency: torch.Tensor, prunable: torch.Tensor, pairs: int,
              gen: torch.Generator) -> torch.Tensor:
    """Pairwise logistic ranking of scores [n] against |saliency| [n] over prunable [n] tokens (sampled pairs)."""
    idx = torch.nonzero(prunable).flatten()
    if idx.numel() < 2:
        return scores.sum() * 0.0
    a = idx[torch.randint(idx.numel(), (pairs,), generator=gen)]
    b = idx[torch.randint(idx.numel(), (pairs,), generator=gen)]
    target = torch.sign(saliency[a].abs() - saliency[b].abs())
    keep = target != 0
    if not bool(keep.any()):
        return scores.sum() * 0.0
    return F.softplus(-target[keep] * (scores[a[keep]] - scores[b[keep]])).mean()


# 4. evaluation through the runtime ----------------------------------------------------------------------------------

def contexts_from_samples(samples: list[Sample]) -> list[DecisionContext]:
    """The decision contexts of samples whose last decision is their final token (planner samples)."""
    return [DecisionContext(torch.tensor(s.ids), s.spans, seed=i) for i, s in enumerate(samples)
            if s.decisions and s.decisions[-1] == len(s.ids) - 1]


def compare_to_full(backbone: HFDecoder, contexts: list[DecisionContext], technique: Technique,
                    progress: Any = None, full_cache: dict | None = None) -> dict[str, float]:
    """Hard pruning with `technique` vs the full model on each context's last-token logits.

    agreement: fraction of contexts where the argmax (next action token) is the same; kl: mean KL(full || pruned)
    in nats; work: mean realised fraction of token-layer work; flops_fraction: sum of pruned / sum of full prefill
    FLOPs (analytic, scorers included). `full_cache` (a dict) keeps the full model's results between calls.
    """
    agree, kls, work, f_full, f_pruned = 0, [], [], 0, 0
    shape = backbone.shape
    for ctx in contexts:
        key = (id(backbone), tuple(ctx.token_ids.tolist()))
        with torch.inference_mode():
            full = full_cache.get(key) if full_cache is not None else None
            if full is None:
                full = Session(backbone).extend(ctx.token_ids)
                if full_cache is not None:
                    full_cache[key] = full
            session, new_from = technique.open_session(backbone, ctx)
            if hasattr(technique, "bind"):
                technique.bind(backbone)
            hook = technique.prefill_hook(ctx, shape.n_layers, new_from)
            pruned = session.extend(ctx.token_ids[new_from:], layer_hook=hook)
        p, q = full.logits[-1].float().log_softmax(-1), pruned.logits[-1].float().log_softmax(-1)
        agree += int(p.argmax() == q.argmax())
        kls.append(float((p.exp() * (p - q)).sum()))
        tokens = [w.queries for w in pruned.works]
        work.append(sum(tokens) / (shape.n_layers * int(ctx.token_ids.numel())))
        f_full += forward_flops(shape, full.works, 1)
        f_pruned += forward_flops(shape, pruned.works, 1) + _scorer_flops(technique, tokens)
        if progress is not None:
            progress()
    n = max(1, len(contexts))
    return {"agreement": agree / n, "kl": sum(kls) / n, "work": sum(work) / n,
            "flops_fraction": f_pruned / max(1, f_full), "contexts": len(contexts)}


def _scorer_flops(technique: Technique, tokens_per_layer: list[int]) -> int:
    scorer = getattr(technique, "scorer", None)
    if scorer is None:
        return 0
    # a prune layer scores the tokens present after it (protected ones are not scored; this is an upper bound)
    return scorer.flops_per_token() * sum(tokens_per_layer[l] for l in scorer.layers if l < len(tokens_per_layer))


# the whole recipe --------------------------------------------------------------------------------------------------

def train_pruner(model_dir: str | Path, saliency_path: str | Path, out: str | Path, keep_ratio: float = 0.6,
                 steps: int = 300, seed: int = 0, threads: int = 1, command: str = "",
                 recipe: PrunerRecipe | None = None, max_kept: int | None = None) -> Path:
    """Stage 2: train the scorers for the model in `model_dir` on the Stage 1 file; write `out` (a directory:
    model.safetensors + card.json; or a .safetensors path, the card beside it as <stem>.card.json)."""
    recipe = recipe or PrunerRecipe(keep_ratio=keep_ratio, steps=steps, seed=seed, threads=threads, max_kept=max_kept)
    if not 0.0 < recipe.keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {recipe.keep_ratio}")
    if recipe.max_kept is not None and (isinstance(recipe.max_kept, bool) or not isinstance(recipe.max_kept, int)
                                        or recipe.max_kept < 1):
        raise ValueError(f"max_kept must be a whole number >= 1 (or None for no cap), got {recipe.max_kept!r}")
    torch.set_num_threads(recipe.threads)
    t0 = time.time()
    backbone = HFDecoder.load(model_dir)
    samples, saliency, sal_meta = load_saliency(saliency_path)
    fp = model_fingerprint(backbone)
    if sal_meta.get("model_fingerprint") not in (None, fp):
        raise ValueError(f"{saliency_path} was computed on {sal_meta.get('model')} (weights "
                         f"{sal_meta.get('model_fingerprint')}), not on {model_dir} (weights {fp})")
    layers = tuple(sal_meta["layers"])
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # 1. split
    order = list(range(len(samples)))
    random.Random(recipe.seed).shuffle(order)
    n_hold = max(1, int(len(samples) * recipe.holdout))
    held, train = order[:n_hold], order[n_hold:]

    # 2-3. train
    torch.manual_seed(recipe.seed)
    d = backbone.shape.d_model
    scorer = TokenScorer(d, layers, {
        "model": str(model_dir), "model_fingerprint": fp, "n_layers": backbone.n_layers, "hidden_size": d,
        "family": backbone.family})
    scorer.train()
    opt = torch.optim.Adam(scorer.parameters(), lr=recipe.lr)
    rng = random.Random(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    lengths = [len(samples[i].ids) for i in train]
    batches: list[list[int]] = []
    history: list[dict[str, float]] = []
    train_seconds = 0.0
    teacher_cache: dict[int, torch.Tensor] = {}
    cache_ok = sum(len(samples[i].decisions) for i in train) * backbone.shape.vocab_size <= 50_000_000
    with _progress() as bar:
        task = bar.add_task("pruner (stage 2)", total=recipe.steps)
        for step in range(recipe.steps):
            ts = time.time()
            if not batches:
                batches = length_batches(lengths, recipe.tokens_per_batch, rng)
            idx = [train[i] for i in batches.pop()]
            batch = [samples[i] for i in idx]
            ids, valid = pad_batch(batch, pad)
            prunable = prunable_mask(batch, ids.shape[1], recipe)
            lr = recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, recipe.steps))))
            for g in opt.param_groups:
                g["lr"] = lr
            if not all(i in teacher_cache for i in idx):  # the frozen model's decisions, computed once per sample
                with torch.no_grad():
                    full = decision_logits(backbone, batched_forward(backbone, ids, valid), batch).float()
                for i, part in zip(idx, full.log_softmax(-1).split([len(s.decisions) for s in batch])):
                    if cache_ok:
                        teacher_cache[i] = part
                pt = full.log_softmax(-1)
            else:
                pt = torch.cat([teacher_cache[i] for i in idx])
            keep = recipe.keep_ratio
            if recipe.keep_jitter:
                keep = min(1.0, max(0.05, keep + rng.uniform(-recipe.keep_jitter, recipe.keep_jitter)))
            h, scores, cum = masked_student(backbone, scorer, ids, valid, prunable, keep,
                                            recipe.temperature, recipe.noise, gen, recipe.max_kept)
            student = decision_logits(backbone, h, batch).float()
            weights = torch.tensor([1.0 / len(s.decisions) for s in batch for _ in s.decisions])
            kl = ((pt.exp() * (pt - student.log_softmax(-1))).sum(-1) * weights).sum() / len(batch)
            rank = torch.zeros(())
            budget = torch.zeros(())
            n_pr = prunable.sum(-1)
            targets = torch.tensor([train_budgets(int(p), layers, backbone.n_layers, keep, recipe.max_kept)
                                    for p in n_pr.tolist()], dtype=torch.float32)
            has = n_pr > 0
            for j, l in enumerate(layers):
                for r, i in enumerate(idx):
                    n_i = len(samples[i].ids)
                    rank = rank + rank_loss(scores[l][r, :n_i], saliency[l][i], prunable[r, :n_i],
                                            recipe.rank_pairs, gen)
                kept = (cum[l].exp() * prunable).sum(-1) / n_pr.clamp(min=1)  # [B] soft fraction kept
                gap = (kept - targets[:, j] / n_pr.clamp(min=1)) ** 2
                budget = budget + (gap * has).sum() / max(1, int(has.sum()))
            rank = rank / len(batch)
            loss = recipe.kl_weight * kl + recipe.rank_weight * rank + recipe.budget_weight * budget
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_seconds += time.time() - ts
            history.append({"loss": loss.item(), "kl": kl.item(), "rank": rank.item(), "budget": budget.item()})
            last = history[-20:]
            bar.update(task, advance=1, description=(
                f"pruner (stage 2) kl {sum(x['kl'] for x in last) / len(last):.4f} "
                f"rank {sum(x['rank'] for x in last) / len(last):.3f} "
                f"budget {sum(x['budget'] for x in last) / len(last):.4f}"))
    scorer.eval()
    scorer.requires_grad_(False)

    # 4. evaluate on held-out samples, hard pruning through the runtime
    contexts = contexts_from_samples([samples[i] for i in held])[: recipe.eval_samples]
    metrics: dict[str, Any] = {}
    full_cache: dict = {}
    settings = {"keep_ratio": recipe.keep_ratio, "layers": layers, "sink_tokens": recipe.sink_tokens,
                "recent_tokens": recipe.recent_tokens, "max_kept": recipe.max_kept}
    with _progress() as bar:
        task = bar.add_task("held-out evaluation", total=len(contexts) * (1 + len(BASELINES)))
        for name in ("token_pruning",) + BASELINES:
            tech = build(name, **settings)
            if name == "token_pruning":
                tech.use_scorer(scorer)
            metrics[name] = {k: round(v, 4) for k, v in
                             compare_to_full(backbone, contexts, tech, lambda: bar.advance(task), full_cache).items()}

    # 5. save
    out = Path(out)
    weights_path = out / "model.safetensors" if out.suffix != ".safetensors" else out
    card_path = weights_path.with_name("card.json") if out.suffix != ".safetensors" else out.with_suffix(".card.json")
    scorer.meta.update({"layers": list(layers), "keep_ratio_trained": recipe.keep_ratio,
                        "max_kept_trained": recipe.max_kept,
                        "data": sal_meta.get("data"), "saliency_file": str(saliency_path), "recipe": asdict(recipe)})
    probe_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else samples[0].ids[0]
    scorer.record_probe(backbone, probe_token)
    scorer.save(weights_path)
    card = {
        "name": "thrifty token pruner (E-RECAP stage 2)",
        "for_model": {"path": str(model_dir), "fingerprint": fp, "family": backbone.family,
                      "n_layers": backbone.n_layers, "hidden_size": d},
        "architecture": f"per prune layer: rmsnorm(h) -> Linear({d}, {d // 4}) -> GELU -> Linear({d // 4}, 1)",
        "parameters": sum(p.numel() for p in scorer.parameters()),
        "prune_layers": list(layers),
        "recipe": asdict(recipe),
        "command": command or "thrifty train pruner",
        "stage1": {k: sal_meta.get(k) for k in ("data", "tokens", "seed", "layers", "seconds", "command", "loss")},
        "data": {"samples": len(samples), "train": len(train), "held_out": len(held)},
        "seed": recipe.seed,
        "training": {"steps": recipe.steps, "train_seconds": round(train_seconds, 1),
                     "wall_seconds": round(time.time() - t0, 1), "threads": recipe.threads,
                     "final": {k: round(sum(x[k] for x in history[-20:]) / max(1, len(history[-20:])), 5)
                               for k in ("loss", "kl", "rank", "budget")}},
        "loss_every_25": [round(x["loss"], 5) for x in history[::25]],
        "heldout": {"settings": {**settings, "layers": list(layers)}, **metrics},
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return weights_path
