"""Teacher-forced next-action confusion of a planner against the expert labels of recorded episodes.

    python scripts/planner_confusion.py RUN_FILE.jsonl [--model DIR] [--level GoToLocal] [--episodes 40]

RUN_FILE is a transcript or DAgger file of `thrifty train planner` (fields mission, observations, taken, labels).
Prints accuracy, the confusion counts (label -> predicted), and accuracy split by whether the mission's object
("<colour> <type>") is in the current observation. A diagnostic for the planner card, not part of the package.
"""

import argparse
import collections
import json
import re

import torch

from thrifty.bench import SHIPPED_PLANNER
from thrifty.train.planner import encode_episode
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

p = argparse.ArgumentParser()
p.add_argument("run_file")
p.add_argument("--model", default=str(SHIPPED_PLANNER))
p.add_argument("--level", default="GoToLocal")
p.add_argument("--episodes", type=int, default=40)
a = p.parse_args()
torch.set_num_threads(1)
tok = PreTrainedTokenizerFast.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model).eval()
words = {tok.encode(f" {w}", add_special_tokens=False)[0]: w
         for w in ("left", "right", "forward", "pickup", "drop", "toggle", "done")}
conf, split = collections.Counter(), collections.Counter()
n = 0
with open(a.run_file) as fh:
    for line in fh:
        ep = json.loads(line)
        if ep["level"] != a.level:
            continue
        n += 1
        if n > a.episodes:
            break
        ids, labels = encode_episode(tok, ep, 4096)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        target = re.search(r"(red|green|blue|purple|yellow|grey) (key|ball|box)", ep["mission"])
        steps = [i for i, y in enumerate(labels) if y in words]
        for k, i in enumerate(steps):
            allowed = torch.tensor(list(words))
            pred = words[int(allowed[logits[i, allowed].argmax()])]
            lab = words[labels[i]]
            conf[(lab, pred)] += 1
            seen = bool(target) and target.group(0) in ep["observations"][k]
            split[(seen, lab == pred)] += 1
total = sum(conf.values())
print(f"{a.level}: {min(n, a.episodes)} episodes, {total} decisions, accuracy "
      f"{sum(v for (l, q), v in conf.items() if l == q) / total:.3f}")
for (lab, pred), v in sorted(conf.items()):
    print(f"  label {lab:8s} -> predicted {pred:8s} {v}")
for seen in (True, False):
    m = split[(seen, True)] + split[(seen, False)]
    if m:
        print(f"  target {'in' if seen else 'not in'} view: {split[(seen, True)] / m:.3f} of {m}")
