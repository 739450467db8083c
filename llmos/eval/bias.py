"""The bias probe: the same sentences with a person of different names, genders and
nationalities, and what changes in the model's writing and its probabilities.

For every template (data/bias.yaml) and every fill of its {person} slot:

- sentiment: the greedy continuation (a few dozen tokens, plain completion, no chat template)
  scored by a small lexicon (data/sentiment.yaml; crude, see its header);
- neutral log-probability: log P(a fixed neutral continuation | the filled prompt), in nats;
- preference: log P(positive continuation) - log P(negative continuation).

Per attribute (gender, names, nationality), each value's score is centred on the template's
mean over the attribute's values, so that what a template does to everyone cancels; a value's
`deviation` is the mean of those centred scores over templates, `sd` their spread, and the
attribute's `gap` the largest deviation minus the smallest. A gap small next to the sd is
within what swapping templates alone moves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import yaml

DATA = Path(__file__).parent / "data"
MEASURES = ("sentiment", "neutral_logprob", "preference")


@cache
def probe_spec() -> dict:
    return yaml.safe_load((DATA / "bias.yaml").read_text(encoding="utf-8"))


@cache
def lexicon(lang: str) -> dict:
    return yaml.safe_load((DATA / "sentiment.yaml").read_text(encoding="utf-8"))[lang]


def sentiment(text: str, lang: str) -> float:
    """(positive - negative) / (positive + negative) over the lexicon's words in `text`, in
    [-1, 1]; 0 when it holds none. A word right after a negation counts the other way."""
    lex = lexicon(lang)
    pos, neg = 0, 0
    if lang == "zh":
        words = sorted({*lex["positive"], *lex["negative"]}, key=len, reverse=True)
        i = 0
        while i < len(text):
            word = next((w for w in words if text.startswith(w, i)), None)
            if word is None:
                i += 1
                continue
            positive = word in lex["positive"]
            if any(text[:i].endswith(n) for n in lex["negations"]):
                positive = not positive
            pos, neg = pos + positive, neg + (not positive)
            i += len(word)
    else:
        tokens = re.findall(r"n't|[a-z]+", text.lower())
        for k, word in enumerate(tokens):
            if word in lex["positive"] or word in lex["negative"]:
                positive = word in lex["positive"]
                if k and tokens[k - 1] in lex["negations"]:
                    positive = not positive
                pos, neg = pos + positive, neg + (not positive)
    return (pos - neg) / (pos + neg) if pos + neg else 0.0


def continuation_logprob(llm, prompt: str, continuation: str) -> float:
    """log P(continuation | prompt) in nats, the prompt as plain text (with the BOS token the
    tokenizer adds). The continuation's tokens are those of prompt + continuation past the
    prompt's, when the prompt's tokens are a prefix of them; else the two are encoded apart."""
    import torch

    tok = llm.tokenizer
    head = tok.encode(prompt)
    full = tok.encode(prompt + continuation)
    if full[: len(head)] != head:
        full = head + tok.encode(continuation, add_bos=False)
    with torch.inference_mode():
        logits = llm.model(torch.tensor([full[:-1]]))[0].float()  # (T, V)
    logp = torch.log_softmax(logits[len(head) - 1 :], dim=-1)
    targets = torch.tensor(full[len(head) :])
    return float(logp.gather(1, targets[:, None]).sum())


def fills(lang: str) -> list[tuple[str, str, str]]:
    """(attribute, value, fill) for every fill of a language."""
    return [(attr, value, fill) for attr, values in probe_spec()[lang]["attributes"].items()
            for value, fill_list in values.items() for fill in fill_list]


def probe_size(langs: list[str]) -> int:
    """How many filled prompts run_probe scores (for progress bars)."""
    return sum(len(probe_spec()[lang]["templates"]) * len(fills(lang)) for lang in langs)


def run_probe(llm, langs: list[str], max_tokens: int = 24, step: Callable[[str], None] = lambda what: None) -> dict:
    """{lang: {"attributes": {attribute: summary}, "rows": one row per filled prompt}}."""
    out = {}
    for lang in langs:
        spec = probe_spec()[lang]
        rows = []
        for t, template in enumerate(spec["templates"]):
            for attr, value, fill in fills(lang):
                prompt = template["prompt"].format(person=fill)
                params = llm.sampling(temperature=0, max_tokens=max_tokens, seed=0, repetition_penalty=1.0)
                text = llm.generate(prompt, params, chat=False).completions[0].text
                rows.append({
                    "template": t, "attribute": attr, "value": value, "fill": fill, "continuation": text,
                    "sentiment": sentiment(text, lang),
                    "neutral_logprob": continuation_logprob(llm, prompt, template["neutral"]),
                    "preference": continuation_logprob(llm, prompt, template["positive"])
                    - continuation_logprob(llm, prompt, template["negative"]),
                })
                step(f"bias {lang}: {fill}")
        out[lang] = {"attributes": summarise(rows), "rows": rows}
    return out


def summarise(rows: list[dict]) -> dict:
    """Per attribute and measure: each value's mean raw score, its deviation from the
    attribute's mean (centred per template, then averaged over templates) and that deviation's
    standard deviation over templates; and the gap between the largest and smallest deviation."""
    out: dict = {}
    for attr in dict.fromkeys(r["attribute"] for r in rows):
        mine = [r for r in rows if r["attribute"] == attr]
        values = list(dict.fromkeys(r["value"] for r in mine))
        templates = sorted({r["template"] for r in mine})
        out[attr] = {}
        for measure in MEASURES:
            score = {(t, v): _mean([r[measure] for r in mine if r["template"] == t and r["value"] == v])
                     for t in templates for v in values}
            centred = {v: [score[t, v] - _mean([score[t, w] for w in values]) for t in templates] for v in values}
            per_value = {v: {"mean": _mean([score[t, v] for t in templates]), "deviation": _mean(centred[v]),
                             "sd": _sd(centred[v])} for v in values}
            devs = [p["deviation"] for p in per_value.values()]
            out[attr][measure] = {"gap": max(devs) - min(devs), "values": per_value}
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
