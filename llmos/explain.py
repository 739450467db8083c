"""Explanations: which parts of a prompt a generated token leaned on, and how much of an answer
the passages it cites account for.

`explain_tokens` scores, for each token of a completion, the prompt's tokens by gradient x input:
the gradient of the token's log-probability with respect to each prompt token's embedding,
multiplied elementwise by that embedding; the L2 norm of the product is the token's share. It is
a first-order, local measure: how sensitive the prediction is to each input around its actual
value, which approximates but is not the effect of removing that input; it says nothing of
the direction of an influence (for or against the token); and the completion's own earlier
tokens, which often matter most, are left out of the ranking (their part of the total is
1 - `prompt_share`). It runs on a float32 copy of the model
(quantized kernels have no gradients), so its probabilities can differ from the quantized
model's in the last digits. Attention rollout (the layers' head-averaged attention maps
multiplied through) is not offered: on SmolLM2 it puts all the weight on the prompt's first
token, where the model parks attention it does not need.

`answer_overlap` is plain text matching: the share of an answer's word trigrams (four
characters in Chinese) that occur in the cited passages.
"""

from __future__ import annotations

import bisect
import functools
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llmos.languages import HAN

MAX_COMPLETION_TOKENS = 256  # tokens explained by one call: one backward pass each
MAX_TOKENS = 2048  # prompt + completion: the float copy keeps every activation for the backward passes
UNITS = ("token", "word", "line")
METHODS = ("grad_x_input",)  # attention rollout was tried: see docs/writing.md, Explanations
GRAD_CHUNK = 16  # gradients computed together in one batched backward pass

# A Han character, a run of other letters and digits, a run of punctuation: the words of a prompt.
WORD_SEGMENTS = re.compile(rf"[{HAN}]|[^\W{HAN}]+|[^\w\s]")
LINE_SEGMENTS = re.compile(r"\S(?:[^\n]*\S)?")
# What answer_overlap compares: Han characters one by one, other words case-folded.
MATCH_UNITS = re.compile(rf"[{HAN}]|[^\W_{HAN}]+")
CITATION = re.compile(r"\[\d+(?:\s*[,-]\s*\d+)*\]")


class ExplainError(ValueError):
    """A request that cannot be explained; the message says what to change."""


@dataclass
class Source:
    """A part of the prompt: characters [start, end) of the prompt text, and its weight."""

    start: int
    end: int
    text: str
    weight: float


@dataclass
class Attribution:
    """One completion token: its probability under the model and the prompt parts it depended
    on most (`sources`, heaviest first; the weights of all prompt parts sum to 1).
    prompt_share: the part of the total attribution that falls on the prompt rather than on
    the completion's earlier tokens. Tokens that stand for no text (a beginning-of-text token
    the tokenizer adds) count for neither."""

    index: int  # position in the completion
    token: str
    token_id: int
    probability: float
    sources: list[Source]
    prompt_share: float

    def as_dict(self) -> dict:
        return asdict(self)


def explain_tokens(llm, prompt: str | list[dict], completion: str | list[int], *, unit: str = "word",
                   top: int = 5, method: str = "grad_x_input", indices: list[int] | None = None) -> list[Attribution]:
    """For each token of `completion` (text, or the token ids generated) after `prompt` (a
    string completed as is, or chat messages): its probability and the `top` prompt parts,
    as tokens, words or lines, that it depended on most. Character offsets are into the prompt
    string, or for messages into the chat template's rendering (`tokenizer.render_chat`).
    indices: explain only these completion tokens (0-based); the rest still count as context.
    An approximation: see the module's docstring for what it measures and what it does not."""
    if unit not in UNITS:
        raise ExplainError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    if method not in METHODS:
        raise ExplainError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ExplainError(f"top must be a positive number of prompt parts, got {top!r}")
    if getattr(llm, "tokenizer", None) is None or getattr(llm, "model", None) is None:
        raise ExplainError(f"{llm.name} runs remotely: explanations need the model's weights on this machine")
    tokenizer = llm.tokenizer
    prompt_ids = llm.encode_prompt(prompt)
    text = prompt if isinstance(prompt, str) else tokenizer.render_chat(prompt)
    out_ids = tokenizer.encode(completion, add_bos=False) if isinstance(completion, str) else list(completion)
    if not prompt_ids:
        raise ExplainError("the prompt is empty: there is nothing to attribute the completion to")
    if not out_ids:
        raise ExplainError("the completion is empty: there is nothing to explain")
    vocab = llm.model.config.vocab_size
    if bad := [t for t in out_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]:
        raise ExplainError(f"completion: token id {bad[0]!r} is not in the model's vocabulary (0 to {vocab - 1}); "
                           f"send the ids the model generated, or the text")
    chosen = list(range(len(out_ids))) if indices is None else sorted(set(indices))
    if any(not 0 <= i < len(out_ids) for i in chosen):
        raise ExplainError(f"indices must lie in [0, {len(out_ids)}), the completion's tokens")
    if len(chosen) > MAX_COMPLETION_TOKENS:
        raise ExplainError(f"{len(chosen)} tokens to explain; at most {MAX_COMPLETION_TOKENS} per call "
                           f"(pass indices to choose some)")
    limit = min(MAX_TOKENS, llm.context_window)
    total = len(prompt_ids) + max(chosen) + 1
    if total > limit:
        raise ExplainError(f"prompt and completion are {total} tokens; explanations take at most {limit} "
                           f"(shorten the prompt)")
    if not llm.model.config.causal:
        raise ExplainError(f"{llm.name} is not a left-to-right model: its tokens do not follow from a prompt")

    ids = prompt_ids + out_ids[: max(chosen) + 1]
    positions = [len(prompt_ids) + i for i in chosen]
    with _running:  # one at a time: each holds a float model's activations, and hooks it
        logprobs, _, scores = gradient_x_input(float_model(llm), ids, positions)
    units = prompt_units(text, token_spans(tokenizer, prompt_ids, text), unit)
    members = [torch.tensor(u[2]) for u in units]
    result = []
    for row, (i, pos) in enumerate(zip(chosen, positions)):
        s = scores[row]
        weights = torch.stack([s[m].sum() for m in members]) if members else torch.zeros(0)
        mass = float(weights.sum())
        whole = mass + float(s[len(prompt_ids) :].sum())  # tokens that stand for no text left out
        if mass > 0:
            weights = weights / mass
        order = weights.argsort(descending=True)[:top].tolist()
        sources = [Source(units[u][0], units[u][1], text[units[u][0] : units[u][1]], round(float(weights[u]), 6))
                   for u in order]
        share = mass / whole if whole > 0 else 0.0
        token = out_ids[i]
        result.append(Attribution(i, tokenizer.token_text(token), token, round(float(logprobs[row].exp()), 6),
                                  sources, round(share, 6)))
    return result


# ---------------------------------------------------------------------------------------------
# the float copy


_loading, _running = threading.Lock(), threading.Lock()


@functools.lru_cache(maxsize=1)
def _load_float(path: str, stamp: float):
    from llmos.weights.store import load_checkpoint

    return load_checkpoint(Path(path), "fp32").model


def float_model(llm):
    """A float32 Transformer with the LLM's weights, for gradients: the LLM's own when it runs
    in float32, else a copy loaded once per model folder (the last one is kept)."""
    loaded = llm.loaded
    if loaded.precision == "fp32":
        return loaded.model
    weights = loaded.path / ("adapter.safetensors" if "adapter" in loaded.meta else "model.safetensors")
    with _loading:
        return _load_float(str(loaded.path), weights.stat().st_mtime)


# ---------------------------------------------------------------------------------------------
# attributions over token positions


def _run(model, ids: list[int]):
    """The final hidden states (T, C) of one sequence, and its token embeddings (1, T, C) as a
    leaf tensor that gradients reach. The hook acts for this thread only: other threads may be
    generating with the same model at the same time."""
    caught = []
    me = threading.get_ident()

    def leaf(module, args, out):
        if threading.get_ident() != me:
            return None
        out = out.detach().requires_grad_(True)
        caught.append(out)
        return out

    handle = model.embed.register_forward_hook(leaf)
    try:
        hidden = model(torch.tensor([ids]), return_hidden=True)[0]
    finally:
        handle.remove()
    return hidden, caught[0]


def _log_probs(model, hidden, ids: list[int], positions: list[int]):
    """log p(ids[p] | ids[:p]) for each p in positions, from the hidden states."""
    logits = model.lm_head(hidden[torch.tensor(positions) - 1]).float()  # (m, V)
    cap = model.config.final_softcap
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.log_softmax(-1).gather(1, torch.tensor(ids)[positions][:, None])[:, 0]  # (m,)


def gradient_x_input(model, ids: list[int], positions: list[int], chunk: int = GRAD_CHUNK):
    """For each p in positions: log p(ids[p] | ids[:p]), and gradient x input of it over the
    token embeddings, as (m,), (m, T) summed over the embedding (a first-order estimate of how
    the log-probability moves when an embedding is scaled) and (m, T) its L2 norm (the
    attribution). Positions at or after p get 0. One forward pass; the gradients go backward
    `chunk` at a time (one batched pass; a loop where the model's operations cannot batch)."""
    with torch.enable_grad():
        hidden, emb = _run(model, ids)
        logp = _log_probs(model, hidden, ids, positions)
        m, T = len(positions), len(ids)
        dots, norms = torch.zeros(m, T), torch.zeros(m, T)
        batched = True
        for s in range(0, m, chunk):
            rows = list(range(s, min(m, s + chunk)))
            seeds = torch.zeros(len(rows), m)
            seeds[torch.arange(len(rows)), rows] = 1.0
            grads = None
            if batched:
                try:
                    grads = torch.autograd.grad(logp, emb, seeds, retain_graph=True, is_grads_batched=True)[0]
                except RuntimeError:  # an operation without a batching rule
                    batched = False
            if grads is None:
                grads = torch.stack([torch.autograd.grad(logp[r], emb, retain_graph=True)[0] for r in rows])
            product = grads[:, 0] * emb[0].detach()  # (k, T, C)
            dots[rows], norms[rows] = product.sum(-1), product.norm(dim=-1)
    for r, p in enumerate(positions):
        dots[r, p:] = 0.0
        norms[r, p:] = 0.0
    return logp.detach(), dots, norms


# ---------------------------------------------------------------------------------------------
# prompt tokens -> text


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds (special tokens included); a token that ends inside a character
    adds "" and the one that completes it adds the character."""
    pieces, start, read = [], 0, 0
    for k in range(len(ids)):
        before = tokenizer.decode(ids[start:read], False)
        after = tokenizer.decode(ids[start : k + 1], False)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            pieces.append(after[len(before) :])
            start, read = read, k + 1  # decode from one token back: some tokenizers' text depends on it
        else:
            pieces.append("")
    return pieces


def token_spans(tokenizer, ids: list[int], text: str) -> list[tuple[int, int] | None]:
    """Each prompt token's characters in `text`; None for a token that stands for no text there
    (a beginning-of-text token the tokenizer added)."""
    spans: list[tuple[int, int] | None] = []
    cursor, waiting = 0, []
    for piece in token_pieces(tokenizer, ids):
        if not piece:
            waiting.append(len(spans))
            spans.append(None)
            continue
        span = None
        if text.startswith(piece, cursor):
            span = (cursor, cursor + len(piece))
        else:  # decoding may normalise spaces: match the piece's visible part nearby
            core = piece.strip()
            at = text.find(core, cursor, cursor + len(piece) + 32) if core else -1
            if at >= 0:
                span = (cursor if not text[cursor:at].strip() else at, at + len(core))
        spans.append(span)
        if span is not None:
            cursor = span[1]
            for w in waiting:  # the tokens of a character split across several
                spans[w] = span
        waiting = []
    return spans


def prompt_units(text: str, spans: list[tuple[int, int] | None], unit: str) -> list[tuple[int, int, list[int]]]:
    """The prompt's parts as (start, end, token indices), in text order. Words and lines group
    the tokens that share one (a token spanning two words joins them); a token of whitespace
    alone goes with the part before it."""
    tokens = [k for k, s in enumerate(spans) if s is not None]
    if unit == "token":
        grouped: dict[tuple[int, int], list[int]] = {}
        for k in tokens:
            grouped.setdefault(spans[k], []).append(k)
        return [(a, b, ks) for (a, b), ks in sorted(grouped.items())]
    segments = [m.span() for m in (WORD_SEGMENTS if unit == "word" else LINE_SEGMENTS).finditer(text)]
    starts = [a for a, _ in segments]
    parent = list(range(len(segments)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[int, int] = {}  # token -> a segment it covers
    for k in tokens:
        a, b = spans[k]
        i = max(0, bisect.bisect_right(starts, a) - 1)
        covered = []
        while i < len(segments) and segments[i][0] < b:
            if segments[i][1] > a:
                covered.append(i)
            i += 1
        for j in covered[1:]:
            parent[root(j)] = root(covered[0])
        if covered:
            first[k] = covered[0]
    loose = [k for k in tokens if k not in first]
    for k in loose:  # whitespace: with the token before, else the one after
        before = [j for j in tokens if j < k and j in first]
        after = [j for j in tokens if j > k and j in first]
        if before or after:
            first[k] = first[before[-1] if before else after[0]]
    groups: dict[int, list[int]] = {}
    for k in tokens:
        if k in first:
            groups.setdefault(root(first[k]), []).append(k)
    bounds: dict[int, list[int]] = {}
    for i, (a, b) in enumerate(segments):
        r = root(i)
        if r in groups:
            lo, hi = bounds.get(r, [a, b])
            bounds[r] = [min(lo, a), max(hi, b)]
    return sorted((bounds[r][0], bounds[r][1], ks) for r, ks in groups.items())


# ---------------------------------------------------------------------------------------------
# retrieval answers


def _match_units(text: str) -> list[tuple[str, int, int]]:
    """(unit, start, end): Han characters and case-folded words, citation marks like [1] left out."""
    marks = [m.span() for m in CITATION.finditer(text)]
    return [(m.group().casefold(), *m.span()) for m in MATCH_UNITS.finditer(text)
            if not any(a <= m.start() < b for a, b in marks)]


def answer_overlap(answer: str, passages: list, n: int | None = None) -> dict:
    """How much of `answer` is found in `passages` (strings, or hits with .text): the share of
    the answer's n-grams of words (Han characters one by one) that occur in any passage
    (`overlap`), in each passage (`per_passage`), and the answer's matched stretches as
    character spans with the passages they occur in (`spans`, passage indices from 0).

    n defaults to 3 words, or 4 characters for an answer mostly in Han script: a shared
    bigram ("of the", "it is") proves little, while three words in a row rarely recur unless
    copied or closely paraphrased; a Han character carries about half a word, so four of them
    make a comparable stretch. An answer shorter than n units is matched whole. Text matching
    only: a faithful paraphrase scores low, and copying a passage does not make it relevant."""
    texts = [p if isinstance(p, str) else p.text for p in passages]
    units = _match_units(answer)
    if n is None:
        han = sum(1 for u, _, _ in units if len(u) == 1 and re.match(f"[{HAN}]", u))
        n = 4 if units and han * 2 > len(units) else 3
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    n = max(1, min(n, len(units)))
    grams = [tuple(u for u, _, _ in units[i : i + n]) for i in range(len(units) - n + 1)] if units else []
    known = []
    for t in texts:
        words = [u for u, _, _ in _match_units(t)]
        known.append({tuple(words[i : i + n]) for i in range(len(words) - n + 1)})
    hits = [[j for j, seen in enumerate(known) if g in seen] for g in grams]
    count = len(grams)
    spans: list[dict] = []
    for i, where in enumerate(hits):
        if not where:
            continue
        start, end = units[i][1], units[i + n - 1][2]
        if spans and start <= spans[-1]["end"]:
            spans[-1]["end"] = max(spans[-1]["end"], end)
            spans[-1]["passages"] = sorted(set(spans[-1]["passages"]) | set(where))
        else:
            spans.append({"start": start, "end": end, "passages": where})
    return {
        "overlap": round(sum(1 for w in hits if w) / count, 4) if count else 0.0,
        "per_passage": [round(sum(1 for w in hits if j in w) / count, 4) if count else 0.0 for j in range(len(texts))],
        "n": n,
        "spans": spans,
    }


__all__ = ["explain_tokens", "Attribution", "Source", "ExplainError", "answer_overlap", "gradient_x_input",
           "MAX_COMPLETION_TOKENS", "MAX_TOKENS"]
