"""Beam search: keep the `beams` most likely continuations at every step.

Scores are summed log-probabilities; finished hypotheses are ranked by score / length**alpha
(alpha = length_penalty), as in HF transformers, so longer texts are not unduly punished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llmos.engine.generate import Timings, cache_dtype, check_context, decode_step, prefill
from llmos.model import KVCache, Transformer


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float  # sum of token log-probabilities
    normalized: float  # score / len**length_penalty: what hypotheses are ranked by
    finish_reason: str


@torch.inference_mode()
def beam_search(
    model: Transformer,
    prompt: list[int],
    beams: int,
    max_tokens: int,
    stop_token_ids: list[int],
    length_penalty: float = 1.0,
    n: int = 1,
    timings: Timings | None = None,
) -> list[Hypothesis]:
    """Return the n best hypotheses (n <= beams), best first."""
    if beams < 1:
        raise ValueError(f"beams must be at least 1, got {beams}")
    if not 1 <= n <= beams:
        raise ValueError(f"n must be between 1 and beams ({beams}), got {n}")
    timings = timings or Timings()
    P = len(prompt)
    check_context(model, P)
    max_new = min(max_tokens, model.config.max_seq_len - P)
    stop = set(stop_token_ids)
    t0 = time.perf_counter()
    cache = KVCache.allocate(model.config, 1, P + max_new, cache_dtype(model))
    logits = prefill(model, cache, prompt)
    timings.prompt_tokens, timings.prefill_s = P, time.perf_counter() - t0
    live_tokens: list[list[int]] = [[]]
    live_scores = torch.zeros(1)
    finished: list[Hypothesis] = []

    def rank(score: float, length: int) -> float:
        return score / max(length, 1) ** length_penalty

    t_decode = time.perf_counter()
    for step in range(max_new):
        logp = logits.log_softmax(dim=-1)  # (B, V)
        total = (live_scores[:, None] + logp).view(-1)
        top_scores, top_ids = torch.topk(total, min(2 * beams, total.numel()))
        V = logp.shape[-1]
        next_rows, next_tokens, next_scores = [], [], []
        for score, flat in zip(top_scores.tolist(), top_ids.tolist()):
            row, token = divmod(flat, V)
            tokens = live_tokens[row] + [token]
            if token in stop:
                finished.append(Hypothesis(tokens, score, rank(score, len(tokens)), "stop"))
            else:
                next_rows.append(row)
                next_tokens.append(tokens)
                next_scores.append(score)
            if len(next_rows) == beams:
                break
        timings.generated_tokens += len(next_rows)
        if step == 0:
            timings.first_token_s = time.perf_counter() - t0
        # Done when enough hypotheses finished and no live beam can still overtake the worst
        # of the best n (scores only fall as tokens are added; with length_penalty > 0 a
        # longer hypothesis divides by more, so this bound is the one HF uses by default).
        finished.sort(key=lambda h: h.normalized, reverse=True)
        if not next_rows or (
            len(finished) >= n
            and finished[n - 1].normalized >= rank(next_scores[0], step + 1)
        ):
            live_tokens = []
            break
        live_tokens, live_scores = next_tokens, torch.tensor(next_scores)
        if step == max_new - 1:
            break
        cache.select(torch.tensor(next_rows))
        logits = decode_step(model, cache, [t[-1] for t in next_tokens], [P + step] * len(next_tokens))
        timings.decode_steps += 1
        timings.decode_tokens += len(next_rows)
    timings.decode_s = time.perf_counter() - t_decode
    for tokens, score in zip(live_tokens, live_scores.tolist()):
        finished.append(Hypothesis(tokens, score, rank(score, len(tokens)), "length"))
    finished.sort(key=lambda h: h.normalized, reverse=True)
    return finished[:n]
