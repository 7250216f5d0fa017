"""Training rows shared by the planner recipes: whole sequences, short windows at true positions, batching.

A row is `(ids, decision_labels, lm_labels, position_ids)`, labels already shifted (position i predicts token
i+1; -100 = no loss). Both planners train in two views of the same sequences: first short windows (the task
lines + a run of consecutive tokens, at their true positions, so RoPE sees the offsets it sees at inference),
which teach the attention to read the task and the newest observation before it has to find them thousands of
tokens apart; then the whole sequences.
"""

from __future__ import annotations

import random

import torch

Row = tuple[list[int], list[int], list[int], list[int]]
"""(input ids, decision labels, language-modelling labels, position ids): one training row."""


def whole_row(ids: list[int], labels: list[int], lm: list[int]) -> Row:
    return ids, labels, lm, list(range(len(ids)))


def windows(ids: list[int], labels: list[int], lm: list[int], prefix: int, width: int, overlap: int) -> list[Row]:
    """The first `prefix` tokens (the task lines) + `width` consecutive tokens of one sequence, at their true
    positions, for every window that covers the sequence. Decision labels in a window's first `overlap` tokens are
    dropped (the previous window, which overlaps it, has them with more context); the next-token target of the
    last task token (it is not followed by the window's first token) is dropped too."""
    if not 0 <= overlap < width:
        raise ValueError(f"window overlap must be in [0, width={width}), got {overlap}")
    out, start = [], prefix
    while start < len(ids):
        stop = min(len(ids), start + width)
        skip = 0 if start == prefix else overlap
        dec = [-100] * skip + labels[start + skip:stop]
        out.append((ids[:prefix] + ids[start:stop], labels[:prefix] + dec, lm[:prefix - 1] + [-100] + lm[start:stop],
                    list(range(prefix)) + list(range(start, stop))))
        if stop == len(ids):
            break
        start = stop - overlap
    return out


def make_batches(rows: list, tokens_per_batch: int, rng: random.Random) -> list[list[int]]:
    """Group rows (`row[0]` = ids) of similar length so each padded batch holds about `tokens_per_batch` tokens."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    batches, cur, cur_max = [], [], 0
    for i in order:
        n = len(rows[i][0])
        if cur and max(cur_max, n) * (len(cur) + 1) > tokens_per_batch:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate_rows(rows: list[Row], idx: list[int], pad_id: int):
    """Right-padded tensors (ids, decision labels, lm labels, position ids, attention mask), each [B, T]."""
    n = max(len(rows[i][0]) for i in idx)
    ids = torch.full((len(idx), n), pad_id, dtype=torch.long)
    dec = torch.full((len(idx), n), -100, dtype=torch.long)
    lm = torch.full((len(idx), n), -100, dtype=torch.long)
    pos = torch.zeros((len(idx), n), dtype=torch.long)
    mask = torch.zeros((len(idx), n), dtype=torch.long)
    for r, i in enumerate(idx):
        x, y, z, p = rows[i]
        ids[r, :len(x)], dec[r, :len(x)], lm[r, :len(x)] = torch.tensor(x), torch.tensor(y), torch.tensor(z)
        pos[r, :len(x)], mask[r, :len(x)] = torch.tensor(p), 1
    return ids, dec, lm, pos, mask


def row_loss(model, batch, lm_weight: float, aux=None) -> torch.Tensor:
    """Decision cross-entropy + `lm_weight` x language-modelling cross-entropy on one collated batch; with
    `aux = (head, labels [B, T], weight)`, + weight x cross-entropy of `head` on the final hidden states."""
    ids, dec, lm, pos, mask = batch
    ce = torch.nn.functional.cross_entropy
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=aux is not None)
    logits = out.logits.flatten(0, 1)
    loss = logits.sum() * 0.0
    if aux is not None and bool((aux[1] != -100).any()):
        head, labels, weight = aux
        loss = loss + weight * ce(head(out.hidden_states[-1]).flatten(0, 1), labels.flatten(), ignore_index=-100)
    if lm_weight and bool((lm != -100).any()):  # a batch of DAgger rows holds no language-modelling target
        loss = loss + lm_weight * ce(logits, lm.flatten(), ignore_index=-100)
    if bool((dec != -100).any()):  # a batch of windows may hold no decision
        loss = loss + ce(logits, dec.flatten(), ignore_index=-100)
    return loss


def adamw_plain_embeddings(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on the transformer's matrices only: not on the embeddings (decayed, tied embeddings
    collapsed the object-word vectors of both planners), norms and biases."""
    emb = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in emb]
    rest = [p for p in model.parameters() if p.dim() < 2 or id(p) in emb]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
