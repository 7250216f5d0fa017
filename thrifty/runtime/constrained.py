"""Greedy decoding restricted to a finite set of texts (constrained decoding over an enumerated language).

A planner whose output language is small and known at call time (a structured decision over the objects the team
has reported) can be decoded so that it can only emit a member of that language: at every step the token chosen is
the highest-scoring one that keeps the emitted tokens a prefix of some allowed text's tokens. The model's scores
are untouched, so on outputs the model already gets right this is plain greedy decoding; it only changes the
outputs that would have left the language (e.g. a blend of two object names, 'green key' for 'green box' and
'red key').

The allowed token sequences are the tokenizer's own encodings of `text + end`, each encoded whole: the same tokens
a context holds for that text, so the planner is kept on the tokenisation it was trained on, and an output is
never longer than `max_tokens`.

Example:
    >>> c = TextSetConstraint(tokenizer, [" wait", " goto red ball"])                # doctest: +SKIP
    >>> session.decode(c.max_tokens, stop_ids=newline_ids, choose=c.choose)         # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class TextSetConstraint:
    """`choose(logits [vocab], emitted ids) -> id`: greedy among the tokens that keep the output inside `texts`.

    texts: the allowed outputs (without `end`); end: what closes an output (the planner's stop text, a newline).
    """

    def __init__(self, tokenizer, texts: Iterable[str], end: str = "\n"):
        texts = list(dict.fromkeys(texts))
        if not texts:
            raise ValueError("a decoding constraint needs at least one allowed text")
        self.texts, self.end = texts, end
        encoded = tokenizer([t + end for t in texts], add_special_tokens=False)["input_ids"]
        self.max_tokens = max(len(e) for e in encoded)
        self.next: dict[tuple[int, ...], list[int]] = {}  # emitted prefix -> the tokens that may follow it
        for ids in encoded:
            for i, tok in enumerate(ids):
                follow = self.next.setdefault(tuple(ids[:i]), [])
                if tok not in follow:
                    follow.append(tok)

    def choose(self, logits: torch.Tensor, emitted: Sequence[int]) -> int:
        """The highest-scoring token (first listed on ties) that continues `emitted` inside the allowed texts."""
        follow = self.next.get(tuple(emitted))
        if follow is None:
            raise RuntimeError(f"the emitted tokens {list(emitted)} are not a prefix of any allowed text "
                               "(the emitted ids must come from this constraint's own choices)")
        if len(follow) == 1:
            return follow[0]
        scores = logits.reshape(-1)[torch.tensor(follow)]
        return follow[int(scores.argmax())]
