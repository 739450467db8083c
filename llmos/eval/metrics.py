"""The measures of `llmos eval`: pure functions on texts, plus one on a model and token ids
(the negative log-likelihood of a text, for perplexity and bits per byte).

Text is cut into units by `units`: each Han character is a unit of its own, any other run of
letters and digits is a word (lower-cased), punctuation and spaces are dropped. So every
measure here is word-level for English and character-level for Chinese, and mixed text mixes.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from llmos.languages import HAN

_UNIT = re.compile(rf"[{HAN}]|[^\W{HAN}]+")


def units(text: str) -> list[str]:
    """Words (lower-cased) and single Han characters, in order."""
    return _UNIT.findall(text.lower())


def ngrams(seq: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct n-grams over all n-grams of all the texts together (Li et al., 2016): 1 when no
    n-gram occurs twice anywhere; None when the texts hold no n-gram at all."""
    grams = [g for t in texts for g in ngrams(units(t), n)]
    return len(set(grams)) / len(grams) if grams else None


def bleu(hypothesis: Sequence[str], references: list[Sequence[str]], max_n: int = 4) -> float:
    """BLEU of one tokenized hypothesis against references, smoothed as BLEU+1 (Lin and Och,
    2004): orders 2..max_n add one to matches and to totals, so a short text without a shared
    4-gram still scores above zero; unigrams are not smoothed. The brevity penalty uses the
    reference length closest to the hypothesis (the shorter one on a tie)."""
    c = len(hypothesis)
    if c == 0 or not references:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp = Counter(ngrams(hypothesis, n))
        most = Counter()
        for ref in references:
            for g, k in Counter(ngrams(ref, n)).items():
                most[g] = max(most[g], k)
        matches = sum(min(k, most[g]) for g, k in hyp.items())
        total = sum(hyp.values())
        if n == 1:
            if matches == 0:
                return 0.0
            log_p += math.log(matches / total)
        else:
            log_p += math.log((matches + 1) / (total + 1))
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(log_p / max_n)


def self_bleu(texts: list[str], max_n: int = 4) -> float | None:
    """The mean BLEU of each text against all the others (Zhu et al., 2018): high when the
    samples say the same thing in the same words. None for fewer than two texts."""
    if len(texts) < 2:
        return None
    toks = [units(t) for t in texts]
    return sum(bleu(toks[i], toks[:i] + toks[i + 1 :], max_n) for i in range(len(toks))) / len(toks)


def repeated_ngrams(text: str, n: int = 4) -> float | None:
    """Share of the text's n-grams that repeat one seen earlier in it (0: none repeats); None
    for a text shorter than n units."""
    grams = ngrams(units(text), n)
    return 1 - len(set(grams)) / len(grams) if grams else None


def repeated_lines(text: str) -> float | None:
    """Share of the non-empty lines that repeat an earlier line (compared stripped and
    lower-cased); None for a text without lines."""
    lines = [line.strip().lower() for line in text.splitlines() if line.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else None


def length(text: str) -> int:
    """The length that length targets are stated in: words, with each Han character a word."""
    return len(units(text))


def length_adherence(actual: int, target: float, tolerance: float = 0.5) -> bool:
    """Whether a length is within ±tolerance (a fraction) of its target."""
    return abs(actual - target) <= tolerance * target


def per_thousand(count: int, words: int) -> float | None:
    return 1000 * count / words if words else None


def mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood (nats) as bits per UTF-8 byte of the text: comparable
    across tokenizers, unlike perplexity per token."""
    return nll_nats / math.log(2) / n_bytes


def text_nll(model, ids: list[int], window: int, chunk: int = 128) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens predicted) of ids[1:], teacher-forced.

    The text goes through in windows of `window` tokens; after the first, each window starts
    half a window before the previous one ended, so every token after the first window is
    predicted with at least window/2 tokens of context (a strided sliding window). Each window
    is one forward pass to the final hidden states; the output head then runs on `chunk` rows
    at a time, so that whole-window logits never exist (with Gemma's 262k-word vocabulary they
    would be gigabytes)."""
    import torch
    import torch.nn.functional as F

    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    total, count = 0.0, 0
    scored = 1  # ids[scored] is the next token to predict
    start = 0
    with torch.inference_mode():
        while scored < len(ids):
            end = min(start + window, len(ids))
            hidden = model(torch.tensor([ids[start : end - 1]]), return_hidden=True)[0]  # (T, C)
            for a in range(scored - 1 - start, end - 1 - start, chunk):  # rows that predict new tokens
                b = min(a + chunk, end - 1 - start)
                logits = head_logits(model, hidden[a:b])  # (b - a, V)
                targets = torch.tensor(ids[start + a + 1 : start + b + 1])
                total += float(F.cross_entropy(logits, targets, reduction="sum"))
                count += len(targets)
            scored = end
            start = max(0, end - window // 2)
    return total, count


def head_logits(model, hidden):
    """Logits (float32) from final normalised hidden states, as the model's forward makes them
    (its output head, then the final soft cap of the architectures that have one)."""
    import torch

    logits = model.lm_head(hidden).float()
    if model.config.final_softcap:
        logits = torch.tanh(logits / model.config.final_softcap) * model.config.final_softcap
    return logits
