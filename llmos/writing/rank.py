"""Ranking candidates (`-n N --rank`).

Each candidate gets

    score = mean log-probability per token          (how likely the model finds it)
          + 2 * form                                (1 if it keeps the requested form, else 0)
          - 2 * repetition                          (share of its word 3-grams that repeat)
          + 1 * distinctness                        (1 - its highest word-trigram Jaccard
                                                     similarity to another candidate)

and candidates are shown best first. Mean log-probability is in nats (typically -1 to -3), so
a broken form or heavy repetition outweighs small likelihood differences, while distinctness
breaks ties in favour of the candidate that adds something new.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WEIGHTS = {"likelihood": 1.0, "form": 2.0, "repetition": -2.0, "distinctness": 1.0}


@dataclass
class Ranked:
    index: int
    text: str
    score: float
    parts: dict


def _trigrams(text: str) -> list[tuple]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < 3 and re.search(r"[\u3400-\u9fff]", text):
        words = [c for c in text if not c.isspace()]  # Chinese: characters stand in for words
    return [tuple(words[i : i + 3]) for i in range(len(words) - 2)]


def repetition(text: str) -> float:
    grams = _trigrams(text)
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


def rank(completions, form_check=None) -> list[Ranked]:
    """completions: objects with .index, .text and .logprobs (token log-probabilities, or None);
    form_check: text -> list of problems, when a form was asked for."""
    grams = [set(_trigrams(c.text)) for c in completions]
    out = []
    for i, c in enumerate(completions):
        lps = [lp.logprob for lp in (c.logprobs or [])]
        sims = [len(grams[i] & grams[j]) / max(1, len(grams[i] | grams[j])) for j in range(len(completions)) if j != i]
        parts = {
            "likelihood": sum(lps) / len(lps) if lps else 0.0,
            "form": (0.0 if form_check(c.text) else 1.0) if form_check else 0.0,
            "repetition": repetition(c.text),
            "distinctness": 1 - max(sims) if sims else 1.0,
        }
        score = sum(WEIGHTS[k] * v for k, v in parts.items())
        out.append(Ranked(c.index, c.text, score, parts))
    return sorted(out, key=lambda r: r.score, reverse=True)
