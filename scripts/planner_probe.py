"""Two probes of a BabyAI-Text planner: single-context action distributions, and object-word embedding similarity.

    python scripts/planner_probe.py [--model DIR] [--transcripts runs/planner/transcripts-*.jsonl]

1. For `go to the red ball` and one-line observations that differ only in where the ball is (left, right, ahead)
   or whether a wall is ahead, prints the planner's distribution over the movement words at the first decision.
2. Mean pairwise cosine and mean norm of the input embeddings of the colours, object types and directions, next to
   the mean norm over the whole vocabulary (collapsed words have cosine near 1 and small norms).
3. With --transcripts: at decisions 2 and 5 of the first GoToLocal expert transcripts, the distribution with the
   real current observation next to the one with that observation swapped for the episode's first.
A diagnostic for the planner card, not part of the package.
"""

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from thrifty.agents.transcript import Transcript
from thrifty.bench import SHIPPED_PLANNER

p = argparse.ArgumentParser()
p.add_argument("--model", default=str(SHIPPED_PLANNER))
p.add_argument("--transcripts", default=None)
a = p.parse_args()
torch.set_num_threads(1)
tok = PreTrainedTokenizerFast.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model).eval()
first = lambda w: tok.encode(" " + w, add_special_tokens=False)[0]
words = ["left", "right", "forward", "pickup"]


def movement(mission, observations, actions):
    ids = [tok.bos_token_id]
    for _, text in Transcript(mission, observations, actions).segments():
        ids += tok.encode(text, add_special_tokens=False)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1, [first(w) for w in words]], -1)
    return " ".join(f"{w}={q:.2f}" for w, q in zip(words, probs.tolist()))


for obs in ["red ball 2 left", "red ball 2 right", "red ball 2 ahead", "red ball 1 ahead 2 left; blue key 3 right",
            "blue key 1 ahead 2 left; red ball 3 right", "wall 1 ahead"]:
    print(f"{obs:45s} " + movement("go to the red ball", [f"facing east; carrying nothing; {obs}"], []))
emb = model.get_input_embeddings().weight.detach()
for group in (["red", "green", "blue", "purple", "yellow", "grey"], ["key", "ball", "box"], ["left", "right", "ahead"]):
    v = emb[[first(w) for w in group]]
    cos = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(v, dim=-1).T
    k = len(group)
    print(f"{' '.join(group):32s} mean cosine {(cos.sum() - k).item() / (k * k - k):.2f}  "
          f"mean norm {v.norm(dim=-1).mean().item():.2f}")
print(f"all tokens: mean norm {emb.norm(dim=-1).mean().item():.2f}")
if a.transcripts:
    shown = 0
    for line in open(a.transcripts):
        e = json.loads(line)
        if e["level"] != "GoToLocal" or shown == 4:
            continue
        shown += 1
        for k in (2, 5):
            if k < len(e["observations"]):
                obs, acts = e["observations"][: k + 1], e["taken"][:k]
                print(f"{e['mission']} | step {k} | expert {e['labels'][k]} | {obs[-1][:60]}")
                print(f"    real observation:    {movement(e['mission'], obs, acts)}")
                print(f"    first observation:   {movement(e['mission'], obs[:-1] + obs[:1], acts)}  ({obs[0][:40]})")
