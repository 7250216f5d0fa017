"""Does the planner architecture learn the mission-object binding when the context is short?

    python scripts/window_probe.py [--steps 600] [--history 0] [--untied]

Trains the shipped planner's architecture from scratch on windows "<bos>mission\\n(last HISTORY steps)obs\\nact:"
cut from the expert transcripts of `thrifty train planner` (GoToLocal and PickupLoc), then reports held-out
next-action accuracy per expert label. `--untied` unties input and output embeddings and exempts them from weight
decay (the coop planner's fix for collapsed object-word embeddings). A diagnostic for issue 2, not in the package.
"""

import argparse
import collections
import json
import random

import torch
from transformers import PreTrainedTokenizerFast

from thrifty.agents.transcript import Transcript
from thrifty.bench import SHIPPED_PLANNER
from thrifty.train.planner import PlannerRecipe, build_model

p = argparse.ArgumentParser()
p.add_argument("--transcripts", default="runs/planner/transcripts-b00e42019c1499f2.jsonl")
p.add_argument("--steps", type=int, default=600)
p.add_argument("--history", type=int, default=0)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--max-episodes", type=int, default=1500)
p.add_argument("--untied", action="store_true")
a = p.parse_args()
torch.set_num_threads(1)
rng = random.Random(0)
tok = PreTrainedTokenizerFast.from_pretrained(SHIPPED_PLANNER)
enc = lambda s: tok.encode(s, add_special_tokens=False)
samples, n_episodes = [], 0
for line in open(a.transcripts):
    e = json.loads(line)
    if e["level"] not in ("GoToLocal", "PickupLoc"):
        continue
    n_episodes += 1
    if n_episodes > a.max_episodes:
        break
    for k in range(len(e["labels"])):
        lo = max(0, k - a.history)
        segs = Transcript(e["mission"], e["observations"][lo:k + 1], e["taken"][lo:k]).segments()
        ids = [tok.bos_token_id] + [i for _, s in segs for i in enc(s)]
        samples.append((ids, enc(" " + e["labels"][k])[0], e["labels"][k]))
rng.shuffle(samples)
held, train = samples[:2000], samples[2000:]
model = build_model(PlannerRecipe(tie_embeddings=not a.untied), len(tok), tok)
embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
decayed = [q for q in model.parameters() if id(q) not in embeddings]
plain = [q for q in model.parameters() if id(q) in embeddings]
opt = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.05},
                         {"params": plain, "weight_decay": 0.05 if not a.untied else 0.0}], lr=2e-3)


def batch(rows):
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), tok.pad_token_id)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):  # right-aligned so the decision is the last position of every row
        ids[i, n - len(r[0]):] = torch.tensor(r[0])
        mask[i, n - len(r[0]):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, torch.tensor([r[1] for r in rows])


for step in range(a.steps):
    ids, mask, pos, y = batch(rng.sample(train, a.batch))
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1], y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        print(f"step {step} loss {loss.item():.3f}", flush=True)
model.eval()
hits, tot = collections.Counter(), collections.Counter()
with torch.no_grad():
    for i in range(0, len(held), 100):
        rows = held[i:i + 100]
        ids, mask, pos, y = batch(rows)
        pred = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
        for r, q in zip(rows, pred.tolist()):
            tot[r[2]] += 1
            hits[r[2]] += q == r[1]
print(f"{'untied' if a.untied else 'tied'}, history {a.history}, {len(train)} windows, {a.steps} steps: held-out accuracy "
      f"{sum(hits.values()) / sum(tot.values()):.3f}; " + ", ".join(f"{k} {hits[k] / tot[k]:.2f} (n={tot[k]})" for k in tot))
