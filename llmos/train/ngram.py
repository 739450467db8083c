"""The classical baseline: an interpolated Kneser-Ney n-gram language model over token ids.

Trained on a prepared dataset's train shards and scored on its validation shards, so its
perplexity sits beside the neural model's on the same tokens. N-grams are encoded as integers
(base vocabulary size) and counted with numpy, which keeps a 5-gram model over a million
characters to a few seconds.

For the highest order, P(w | h) = max(c(hw) - D, 0) / c(h) + D * N1+(h .) / c(h) * P(w | h'),
where h' drops the oldest token; lower orders use continuation counts N1+(. hw) in place of
c(hw) (Kneser and Ney 1995; Chen and Goodman 1998), and the recursion ends in the uniform
distribution. Each order's discount is D = n1 / (n1 + 2 n2) from its count-of-counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def ngram_codes(ids: np.ndarray, k: int, vocab: int) -> np.ndarray:
    """Integer code of every k-gram: ((t0 * V + t1) * V + ...) + t_{k-1}."""
    ids = ids.astype(np.int64)
    n = len(ids) - k + 1
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    code = np.zeros(n, dtype=np.int64)
    for j in range(k):
        code = code * vocab + ids[j : j + n]
    return code


@dataclass
class Level:
    """Counts of one order: sorted unique n-gram codes with their (continuation) counts, and the
    totals and distinct-continuation counts of their contexts."""

    codes: np.ndarray
    counts: np.ndarray
    ctx_codes: np.ndarray
    ctx_totals: np.ndarray
    ctx_types: np.ndarray
    discount: float


def _level(codes: np.ndarray, counts: np.ndarray, vocab: int) -> Level:
    ctx = codes // vocab
    ctx_codes, start = np.unique(ctx, return_index=True)  # codes are sorted, so ctx is too
    ctx_totals = np.add.reduceat(counts, start) if len(counts) else counts
    ctx_types = np.diff(np.append(start, len(codes)))
    n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
    discount = n1 / (n1 + 2 * n2) if n1 + n2 else 0.5
    return Level(codes, counts, ctx_codes, ctx_totals, ctx_types, min(max(discount, 0.05), 0.95))


class KneserNey:
    def __init__(self, order: int, vocab_size: int):
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        if vocab_size ** order >= 2**62:
            raise ValueError(f"order {order} n-grams over {vocab_size} tokens do not fit 64-bit codes; use a lower order")
        self.order, self.vocab = order, vocab_size
        self.levels: list[Level] = []

    def fit(self, ids: np.ndarray) -> KneserNey:
        V, n = self.vocab, self.order
        top_codes, top_counts = np.unique(ngram_codes(ids, n, V), return_counts=True)
        levels = [_level(top_codes, top_counts, V)]
        higher = top_codes
        for k in range(n - 1, 0, -1):
            # continuation count of a k-gram: how many distinct tokens precede it
            suffix = higher % (V**k)
            codes, counts = np.unique(suffix, return_counts=True)
            levels.append(_level(codes, counts, V))
            higher = codes
        self.levels = levels[::-1]  # index 0: unigrams
        return self

    def logprobs(self, ids: np.ndarray) -> np.ndarray:
        """Natural-log probability of ids[i] given up to order-1 preceding tokens, for every i."""
        V = self.vocab
        ids = ids.astype(np.int64)
        p = np.full(len(ids), 1.0 / V)
        for k, lvl in enumerate(self.levels, start=1):
            # k-gram ending at each position (positions with too little history keep p)
            have = np.arange(len(ids)) >= k - 1
            codes = np.zeros(len(ids), dtype=np.int64)
            for j in range(k):
                shifted = np.roll(ids, k - 1 - j)
                codes = codes * V + shifted
            ctx = codes // V
            ci = np.clip(np.searchsorted(lvl.ctx_codes, ctx), 0, max(len(lvl.ctx_codes) - 1, 0))
            seen_ctx = have & (lvl.ctx_codes[ci] == ctx) if len(lvl.ctx_codes) else np.zeros_like(have)
            gi = np.clip(np.searchsorted(lvl.codes, codes), 0, max(len(lvl.codes) - 1, 0))
            c = np.where((lvl.codes[gi] == codes) & seen_ctx, lvl.counts[gi], 0) if len(lvl.codes) else 0
            total = np.where(seen_ctx, lvl.ctx_totals[ci], 1)
            types = np.where(seen_ctx, lvl.ctx_types[ci], 0)
            D = lvl.discount
            interpolated = np.maximum(c - D, 0) / total + D * types / total * p
            p = np.where(seen_ctx, interpolated, p)
        return np.log(p)

    def perplexity(self, ids: np.ndarray) -> tuple[float, float]:
        """(mean negative log-likelihood in nats per token, perplexity) over ids[1:]."""
        nll = -float(self.logprobs(ids)[1:].mean())
        return nll, math.exp(nll)


def evaluate_dataset(data_dir, order: int = 5) -> dict:
    """Fit on the train shards of a prepared dataset, score the validation shards."""
    from llmos.train.data import TokenData

    data = TokenData(data_dir)
    train = np.concatenate([np.asarray(s) for s in data.shards["train"]])
    val = np.concatenate([np.asarray(s) for s in data.shards["val"]])
    model = KneserNey(order, data.vocab_size).fit(train)
    nll, ppl = model.perplexity(val)
    return {"order": order, "val_loss": nll, "val_perplexity": ppl, "train_tokens": len(train), "val_tokens": len(val)}
