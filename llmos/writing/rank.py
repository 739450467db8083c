"""Ranking candidates (`-n N --rank`).

Each candidate gets

    score = mean log-probability per token          (how likely the model finds it)
          + 2 * form                                (1 if it keeps the requested form, else 0)
          - 2 * repetition                          (share of its word 3-grams that repeat)
          + 1 * distinctness                        (1 - its highest word-trigram Jaccard
                                                     similarity to another candidate)
          + 2 * style                               (with --rank style:RUN: cosine similarity of
                                                     its style embedding to the centroid of the
                                                     corpus RUN was trained on, -1..1)

and candidates are shown best first. Mean log-probability is in nats (typically -1 to -3), so
a broken form or heavy repetition outweighs small likelihood differences, while distinctness
breaks ties in favour of the candidate that adds something new.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WEIGHTS = {"likelihood": 1.0, "form": 2.0, "repetition": -2.0, "distinctness": 1.0, "style": 2.0}


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


def rank(completions, form_check=None, style: list[float] | None = None) -> list[Ranked]:
    """completions: objects with .index, .text and .logprobs (token log-probabilities, or None);
    form_check: text -> list of problems, when a form was asked for; style: each candidate's
    closeness to a writer's style (LLM.style_similarity), when asked for."""
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
        if style is not None:
            parts["style"] = style[i]
        score = sum(WEIGHTS[k] * v for k, v in parts.items())
        out.append(Ranked(c.index, c.text, score, parts))
    return sorted(out, key=lambda r: r.score, reverse=True)


def style_model(rank) -> str | None:
    """The model named by a rank setting "style:RUN", None for a plain ranking (True/False)."""
    if isinstance(rank, str):
        if not rank.startswith("style:") or not rank[6:].strip():
            raise ValueError(f"rank takes true, false or style:MODEL (a model trained with --objective multitask), "
                             f"got {rank!r}")
        return rank[6:].strip()
    return None


def check_style_model(name: str) -> None:
    """A style ranking's model must be here and trained with the multi-task objective; raises
    ValueError (ModelError for a model that cannot be found) saying why."""
    import json

    from llmos.weights.store import resolve

    if not json.loads((resolve(name, quiet=True) / "config.json").read_text()).get("heads"):
        raise ValueError(f"{name} has no style embedding: train it with `llmos finetune --objective multitask`")


_STYLE_MODELS: dict = {}


def style_scores(model: str, texts: list[str]) -> list[float]:
    """Each text's closeness to the style `model` learned (its corpus centroid); the model
    stays loaded for the next call."""
    from llmos.llm import LLM

    if model not in _STYLE_MODELS:
        if len(_STYLE_MODELS) >= 2:
            _STYLE_MODELS.pop(next(iter(_STYLE_MODELS)))
        _STYLE_MODELS[model] = LLM.load(model, precision="fp32")
    return _STYLE_MODELS[model].style_similarity(texts)
