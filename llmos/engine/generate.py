"""Generation on token ids: prefill once, then decode step by step with a preallocated KV cache.

`generate` runs n candidates of one prompt in lockstep: they share a single prefill (its cache
rows are copied), then decode as one batch. It is an iterator of steps, so callers stream
tokens, and it can be told to stop any sequence (stop strings are the text layer's business).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from llmos.engine.sampling import SamplingParams, logprobs_of, process_logits, sample
from llmos.model import KVCache, Transformer


class ContextError(ValueError):
    """The prompt does not fit the model's context window."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob) of the most likely alternatives


@dataclass
class Sequence:
    """One sequence being generated; the unit the engine (and a server's scheduler) works on."""

    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, stop token or caller), "length"
    seen: torch.Tensor | None = None  # (V,) bool: prompt and output tokens, for repetition penalty
    counts: torch.Tensor | None = None  # (V,) output token counts, for presence/frequency
    constraint_state: object = None  # where params.constraint's state machine stands

    @classmethod
    def start(cls, prompt: list[int], params: SamplingParams, vocab_size: int, index: int = 0):
        gen = None
        if not params.greedy:
            gen = torch.Generator()
            # A seeded request draws candidate i from seed + i: reproducible, and candidate 0
            # equals the single-candidate result.
            seed = params.seed + index if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            gen.manual_seed(seed)
        seq = cls(list(prompt), params, gen)
        if params.repetition_penalty != 1.0:
            seq.seen = torch.zeros(vocab_size, dtype=torch.bool)
            seq.seen[torch.tensor(prompt, dtype=torch.long)] = True
        if params.presence_penalty or params.frequency_penalty:
            seq.counts = torch.zeros(vocab_size)
        if params.constraint is not None:
            seq.constraint_state = params.constraint.start()
        return seq

    @property
    def history(self) -> list[int]:
        return self.prompt + self.output

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: TokenLogprob | None):
        self.output.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None:
            self.counts[token] += 1
        if self.params.constraint is not None and token not in self.params.stop_token_ids:
            self.constraint_state = self.params.constraint.advance(self.constraint_state, token)
        if token in self.params.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output) >= self.params.max_tokens:
            self.finish_reason = "length"


def pick_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Choose the next token of each row (B, V) -> (B,), then record it in its sequence.
    Rows whose samplers are the same (seeds and lengths may differ: a server's requests) are
    processed as one batch; each row still draws from its own generator."""
    tokens = torch.empty(len(seqs), dtype=torch.long)
    groups: list[tuple[SamplingParams, list[int]]] = []
    keys: dict[int, SamplingParams] = {}
    for row, seq in enumerate(seqs):
        key = keys.get(id(seq.params))
        if key is None:
            key = keys[id(seq.params)] = replace(seq.params, seed=None, max_tokens=1, stop_token_ids=[], logprobs=None)
        for group_key, rows in groups:
            if group_key == key:
                rows.append(row)
                break
        else:
            groups.append((key, [row]))
    for _, rows in groups:
        params = seqs[rows[0]].params
        group = [seqs[r] for r in rows]
        sub = logits[rows] if len(rows) < len(seqs) else logits
        seen = torch.stack([s.seen for s in group]) if group[0].seen is not None else None
        counts = torch.stack([s.counts for s in group]) if group[0].counts is not None else None
        processed = process_logits(sub, params, [s.history for s in group], seen, counts)
        if params.constraint is not None:
            allowed = torch.stack([params.constraint.mask(s.constraint_state) for s in group])
            processed = processed.masked_fill(~allowed[:, : processed.shape[-1]], float("-inf"))
        tokens[rows] = sample(processed, params, [s.generator for s in group])
    for row, seq in enumerate(seqs):
        lp = None
        if seq.params.logprobs is not None:
            chosen, top_ids, top_lp = logprobs_of(logits[row : row + 1], tokens[row : row + 1], seq.params.logprobs)
            top = list(zip(top_ids[0].tolist(), top_lp[0].tolist())) if top_ids is not None else []
            lp = TokenLogprob(int(tokens[row]), float(chosen[0]), top)
        seq.append(int(tokens[row]), lp)
    return tokens


@dataclass
class Timings:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    first_token_s: float = 0.0  # from the call to the first sampled token
    decode_s: float = 0.0
    decode_steps: int = 0
    generated_tokens: int = 0
    decode_tokens: int = 0  # tokens sampled after the first step, i.e. those decode_s paid for

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "time_to_first_token_s": round(self.first_token_s, 4),
            "decode_s": round(self.decode_s, 4),
            "prefill_tok_s": round(self.prompt_tokens / self.prefill_s, 2) if self.prefill_s else None,
            "decode_tok_s": round(self.decode_tokens / self.decode_s, 2) if self.decode_s else None,
        }


def fit_to_context(model: Transformer, prompt_len: int, max_tokens: int) -> int:
    """The number of new tokens that fits; raise if the prompt alone fills the context."""
    ctx = model.config.max_seq_len
    if prompt_len == 0:
        raise ContextError("the prompt is empty: give at least one token")
    if prompt_len >= ctx:
        raise ContextError(
            f"the prompt is {prompt_len} tokens but the model's context window is {ctx}; "
            f"shorten it (or let the caller truncate it from the left)"
        )
    return min(max_tokens, ctx - prompt_len)


def cache_dtype(model: Transformer) -> torch.dtype:
    return model.embed.weight.dtype


class Generation:
    """Iterate to get, at every step, the (sequence index, token id) pairs produced."""

    def __init__(self, model: Transformer, prompt: list[int], params: SamplingParams, n: int = 1):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.model, self.prompt, self.params, self.n = model, list(prompt), params, n
        self.max_new = fit_to_context(model, len(prompt), params.max_tokens)
        vocab = model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab})")
        limited = params if self.max_new == params.max_tokens else _with_max(params, self.max_new)
        self.sequences = [Sequence.start(prompt, limited, vocab, i) for i in range(n)]
        self.timings = Timings(prompt_tokens=len(prompt))

    def stop(self, index: int, reason: str = "stop"):
        if not self.sequences[index].done:
            self.sequences[index].finish_reason = reason

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        model, P = self.model, len(self.prompt)
        t0 = time.perf_counter()
        cache = KVCache(model.config, 1, P + self.max_new, cache_dtype(model))
        logits = model(torch.tensor([self.prompt]), cache=cache, kv_len=P, last_only=True)[:, -1]
        self.timings.prefill_s = time.perf_counter() - t0
        rows = list(range(self.n))  # sequence index of each cache row
        if self.n > 1:
            cache.select(torch.zeros(self.n, dtype=torch.long))
            logits = logits.expand(self.n, -1)
        t_decode = None
        for step in range(self.max_new):
            live = [r for r, i in enumerate(rows) if not self.sequences[i].done]
            if not live:
                break
            if len(live) <= len(rows) // 2:  # compact the batch once half of it has finished
                cache.select(torch.tensor(live))
                rows, logits = [rows[r] for r in live], logits[live]
                live = list(range(len(rows)))
            picked = pick_tokens(logits[live] if len(live) < len(rows) else logits,
                                 [self.sequences[rows[r]] for r in live])
            tokens = torch.zeros(len(rows), dtype=torch.long)  # finished rows decode a dummy
            tokens[live] = picked
            if step == 0:
                self.timings.first_token_s = time.perf_counter() - t0
                t_decode = time.perf_counter()
            self.timings.generated_tokens += len(live)
            if step > 0:
                self.timings.decode_tokens += len(live)
            yield [(rows[r], int(t)) for r, t in zip(live, picked)]  # callers may stop() here
            if all(self.sequences[i].done for i in rows):
                break
            logits = model(tokens[:, None], cache=cache, kv_len=P + step + 1)[:, -1]
            self.timings.decode_steps += 1
        if t_decode is not None:
            self.timings.decode_s = time.perf_counter() - t_decode
        for seq in self.sequences:
            if not seq.done:
                seq.finish_reason = "length"


def _with_max(params: SamplingParams, max_tokens: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_tokens=max_tokens)


def generate(model: Transformer, prompt: list[int], params: SamplingParams, n: int = 1) -> list[Sequence]:
    """Run to completion; return the n sequences (output ids, logprobs, finish reasons)."""
    gen = Generation(model, prompt, params, n)
    for _ in gen:
        pass
    return gen.sequences
