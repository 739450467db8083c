"""The one decode loop, on token ids: admit requests, prefill, decode every running row together.

An `Engine` owns a preallocated KV cache of `max_batch` rows. A `Request` (one prompt and its n
candidates) is prefilled into free rows (the candidates share one prefill), joins the running
batch, and leaves it when each candidate ends: a stop token, max_tokens, its hook (a stop
string), its deadline, or cancellation. Running rows stay packed at the front of the cache, so a
decode step runs on exactly the live sequences, each at its own position.

The engine is plain synchronous code and knows nothing about text: a request's `hook`, supplied
by the text layer (llm.py), turns each sampled token into text and may end the candidate, or
`Rewind` it: the candidate goes back to an earlier position of its output and samples there
again without the token it had taken (banned strings).
Single-request generation runs it with `run`; a server drives one engine from its scheduler
thread. Beam search (beam.py) is a separate algorithm on the same `prefill` / `decode_step`.
"""

from __future__ import annotations

import os
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

import llmos.heap as heap
from llmos.engine.sampling import SamplingParams, apply_bans, logprobs_of, sample
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
    """One candidate being generated: the unit a decode step works on."""

    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS, stop token or hook), "length", "cancelled", "error",
    # or a reason of the hook's own ("content_filter": a safety rule ended it)
    seen: torch.Tensor | None = None  # (V,) bool: prompt and output tokens, for repetition penalty
    counts: torch.Tensor | None = None  # (V,) output token counts, for presence/frequency
    constraint_state: object = None  # where params.constraint's state machine stands
    excluded: dict[int, set[int]] = field(default_factory=dict)  # output position -> tokens rewound from it

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

    def rewind(self, keep: int):
        """Back to the first `keep` output tokens; the token that followed them is excluded at
        that position from now on, so sampling there again takes another."""
        removed = self.output[keep:]
        self.excluded.setdefault(keep, set()).add(removed[0])
        del self.output[keep:]
        del self.logprobs[keep:]
        self.finish_reason = None
        if self.seen is not None:
            self.seen.zero_()
            self.seen[torch.tensor(self.history, dtype=torch.long)] = True
        if self.counts is not None:
            for t in removed:
                self.counts[t] -= 1
        if self.params.constraint is not None:
            self.constraint_state = self.params.constraint.start()
            for t in self.output:
                self.constraint_state = self.params.constraint.advance(self.constraint_state, t)


SAMPLE_FLOATS = 1 << 19  # logits sampled at once (rows of them): 2 MiB


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
        histories = [s.history for s in group]
        processed = apply_bans(sub, params, histories)
        if params.constraint is not None:
            allowed = torch.stack([params.constraint.mask(s.constraint_state) for s in group])
            processed = processed.masked_fill(~allowed[:, : processed.shape[-1]], float("-inf"))
        excluded = [(i, s.excluded.get(len(s.output))) for i, s in enumerate(group) if s.excluded]
        if any(ex for _, ex in excluded):
            processed = processed.clone()  # never write into the model's logits (logprobs read them)
            for i, ex in excluded:
                if ex:
                    processed[i, list(ex)] = float("-inf")
        # a few rows at a time: each sampler's temporaries are the size of the rows it is given
        # (8 rows of Gemma's 262,144 logits would be 8 MiB each); every sampler works row by row
        step = max(1, SAMPLE_FLOATS // processed.shape[-1])
        for a in range(0, len(rows), step):
            b = a + step
            tokens[rows[a:b]] = sample(processed[a:b], params, [s.generator for s in group[a:b]], histories[a:b],
                                       seen[a:b] if seen is not None else None,
                                       counts[a:b] if counts is not None else None)
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
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    prefill_s: float = 0.0
    first_token_s: float = 0.0  # from the start of the prefill to the first sampled token
    decode_s: float = 0.0
    decode_steps: int = 0
    generated_tokens: int = 0
    decode_tokens: int = 0  # tokens sampled after the first step, i.e. those decode_s paid for
    drafted_tokens: int = 0  # prompt-lookup draft tokens checked (lookahead)
    accepted_tokens: int = 0  # of those, the ones the model agreed with
    # time.monotonic() stamps: when the request was made, got its first token, ended
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "time_to_first_token_s": round(self.first_token_s, 4),
            "decode_s": round(self.decode_s, 4),
            "prefill_tok_s": round(self.prompt_tokens / self.prefill_s, 2) if self.prefill_s else None,
            "decode_tok_s": round(self.decode_tokens / self.decode_s, 2) if self.decode_s else None,
            **({"drafted_tokens": self.drafted_tokens, "accepted_tokens": self.accepted_tokens}
               if self.drafted_tokens else {}),
        }


@dataclass
class Rewind:
    """A hook's answer that takes a candidate back: keep its first `keep` output tokens and
    sample the next one again, never the token it had there. The row's cache position goes
    back with it (the entries past it are simply overwritten)."""

    keep: int


class TokenHook(Protocol):
    """What the text layer plugs into a request: text for each token, and the end of a candidate."""

    def token(self, index: int, token: int) -> tuple[str, bool | str | Rewind]:
        """The text candidate `index` releases with this (non-stop) token, and whether it ends
        there: True ends it as "stop", a string ends it with that finish reason, a Rewind takes
        it back to an earlier position."""

    def at_end(self, index: int) -> Rewind | None:
        """Optional: asked when candidate `index` is about to end by a stop token or max_tokens;
        a Rewind takes it back instead (what it held only the end could decide)."""

    def finish(self, index: int) -> str:
        """Text still held back when candidate `index` ends ("" after the hook ended it)."""


@dataclass(eq=False)
class Request:
    """One prompt and its n candidates: token ids in, token ids (and events) out."""

    prompt: list[int]
    params: SamplingParams
    n: int = 1
    hook: TokenHook | None = None
    deadline: float | None = None  # time.monotonic() after which its candidates end ("length")
    owner: object = None  # the front end's handle (where a server delivers the events)
    cancelled: bool = False
    sequences: list[Sequence] = field(default_factory=list)  # filled in at admission
    timings: Timings = field(default_factory=Timings)

    def cancel(self):
        """End every candidate at the next step, wherever it is (a client went away)."""
        self.cancelled = True

    def stop(self, index: int, reason: str = "stop"):
        """End candidate `index`; its row is freed at the next step."""
        if self.sequences and not self.sequences[index].done:
            self.sequences[index].finish_reason = reason

    @property
    def done(self) -> bool:
        return bool(self.sequences) and all(s.done for s in self.sequences)


@dataclass
class Event:
    """Something that happened to candidate `index` of `request` in one step."""

    request: Request
    index: int
    token: int | None = None  # the sampled token (None for held-back text and finish events)
    text: str = ""
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


@dataclass
class Row:
    """A running candidate in its cache row."""

    request: Request
    index: int
    pos: int  # position of the token to feed next
    token: int = 0  # the token to feed next
    misses: int = 0  # lookahead: drafts in a row the model rejected outright
    pause: int = 0  # lookahead: plain steps to take before drafting again (2 ** misses)
    rewound: bool = False  # its hook took it back in the step just sampled

    @property
    def sequence(self) -> Sequence:
        return self.request.sequences[self.index]


def check_context(model: Transformer, prompt_len: int):
    """Raise ContextError unless a prompt of this length leaves room for a new token."""
    ctx = model.config.max_seq_len
    if prompt_len == 0:
        raise ContextError("the prompt is empty: give at least one token")
    if prompt_len >= ctx:
        raise ContextError(f"the prompt is {prompt_len} tokens but the model's context window is {ctx}; "
                           f"shorten it (or let the caller truncate it from the left)")


def cache_dtype(model: Transformer) -> torch.dtype:
    """What the KV cache holds: the model's own choice (float16 for quantized weights), else the
    float dtype it runs in (its embedding may be quantized)."""
    return model.kv_cache_dtype or model.norm.weight.dtype


def prefill(model: Transformer, cache: KVCache, prompt: list[int]) -> torch.Tensor:
    """Write the prompt into a one-row cache; the next token's logits (1, V)."""
    return model(torch.tensor([prompt]), cache=cache, kv_len=len(prompt), last_only=True)[:, -1]


def decode_step(model: Transformer, cache: KVCache, tokens: list[int], positions: list[int],
                shared_prefix: int = 0) -> torch.Tensor:
    """Feed one token per row, each at its own position; the next logits (B, V). Rows at one
    position (a lone request, the candidates of one, beams) take the lockstep path: no
    attention mask, and a plain slice write into the cache. shared_prefix: the first positions
    that every row's cache holds alike (the prompt of candidates), read once for all rows."""
    kv_len = max(positions) + 1
    pos = None if min(positions) == kv_len - 1 else torch.tensor(positions)[:, None]
    return model(torch.tensor(tokens)[:, None], input_pos=pos, cache=cache, kv_len=kv_len,
                 shared_prefix=shared_prefix)[:, -1]


def draft_tokens(history: list[int], k: int, max_ngram: int = 3, min_ngram: int = 2) -> list[int]:
    """Prompt lookup: the (up to k) tokens that followed the latest earlier occurrence of the
    history's last n tokens, for n from max_ngram down to min_ngram; [] when none recurs."""
    end = len(history)
    for n in range(max_ngram, min_ngram - 1, -1):
        if end <= n:
            continue
        tail, last = history[end - n :], history[-1]
        for start in range(end - 2, n - 2, -1):  # start: where an earlier copy of the tail ends
            if history[start] == last and history[start - n + 1 : start + 1] == tail:
                return history[start + 1 : start + 1 + k]
    return []


class PrefixCache:
    """Keys and values of recently finished sequences, kept after their rows are reused, so a
    prompt that begins with one of them (a chat's history, a story's Memory and Lorebook) is
    prefilled only from where it diverges. One per model, shared by every engine on it; least
    recently used entries go first beyond `max_tokens` positions in all.
    LLMOS_PREFIX_CACHE_TOKENS sets that budget (0 turns the cache off)."""

    def __init__(self, max_tokens: int | None = None, min_tokens: int = 16):
        if max_tokens is None:
            max_tokens = int(os.environ.get("LLMOS_PREFIX_CACHE_TOKENS", "8192"))
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self.entries: OrderedDict[tuple[int, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = OrderedDict()
        self.stored = 0
        self.hits = 0

    def match(self, prompt: list[int]) -> tuple[int, tuple[int, ...] | None]:
        """(positions reusable, entry key): at most len(prompt) - 1, so the last prompt token
        still runs and gives the next token's logits."""
        best, key = 0, None
        for tokens in self.entries:
            n = min(len(tokens), len(prompt) - 1)
            same = next((i for i in range(n) if tokens[i] != prompt[i]), n)
            if same > best:
                best, key = same, tokens
        return (best, key) if best >= self.min_tokens else (0, None)

    def load(self, key: tuple[int, ...], length: int, cache: KVCache, row: int):
        ks, vs = self.entries[key]
        self.entries.move_to_end(key)
        for layer, (k, v) in enumerate(zip(ks, vs)):
            cache.k[layer][row, :, :length] = k[:, :length]
            cache.v[layer][row, :, :length] = v[:, :length]
        self.hits += 1

    def store(self, tokens: list[int], cache: KVCache, row: int):
        """Keep cache row `row`'s first len(tokens) positions, the keys and values of `tokens`."""
        n = len(tokens)
        if n < self.min_tokens or n > self.max_tokens:
            return
        key = tuple(tokens)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        # An entry that is a prefix of this one says nothing more: it goes.
        for old in [t for t in self.entries if len(t) <= n and key[: len(t)] == t]:
            self.stored -= len(old)
            del self.entries[old]
        self.entries[key] = ([k[row, :, :n].clone() for k in cache.k], [v[row, :, :n].clone() for v in cache.v])
        self.stored += n
        while self.stored > self.max_tokens:
            old, _ = self.entries.popitem(last=False)
            self.stored -= len(old)


_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prefix_cache(model: Transformer) -> PrefixCache:
    """The model's prefix cache (made on first use)."""
    if model not in _PREFIXES:
        _PREFIXES[model] = PrefixCache()
    return _PREFIXES[model]


class Engine:
    """Continuous batching over one model and one KV cache. Call `add`, then `step` while
    `has_work`; each step returns the events it produced. `add` may be called from another
    thread than `step` (a server's routes; the waiting line is a deque, whose appends are
    atomic); everything else belongs to the thread that steps."""

    def __init__(self, model: Transformer, max_batch: int = 16, max_len: int | None = None):
        self.model = model
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        heap.trim()  # what earlier work left free goes back before the cache takes its room
        self.cache = KVCache.allocate(model.config, max_batch, self.max_len, cache_dtype(model))
        self.prefixes = prefix_cache(model)
        self.waiting: deque[Request] = deque()
        self.rows: list[Row] = []  # running, packed: row i is cache row i
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0}
        self._admitted_last = False

    def check(self, req: Request):
        """Raise (ContextError, ValueError) if the request can never run here."""
        P, vocab = len(req.prompt), self.model.config.vocab_size
        if req.n < 1:
            raise ValueError(f"n must be at least 1, got {req.n}")
        if req.n > self.max_batch:
            raise ValueError(f"n={req.n} exceeds the batch size ({self.max_batch})")
        check_context(self.model, P)
        if P >= self.max_len:
            raise ContextError(f"the prompt is {P} tokens; this server's context is {self.max_len}")
        bad = next((t for t in req.prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary (size {vocab})")

    def add(self, req: Request):
        self.check(req)
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.rows)

    def step(self) -> list[Event]:
        """Admit the waiting requests that fit (prefill, first tokens), or else decode one token
        for every running row. Admission never runs twice in a row, so new arrivals cannot
        starve the rows already running."""
        events: list[Event] = []
        if self.waiting and not (self._admitted_last and self.rows) and self._admit(events):
            self._admitted_last = True
            return events
        self._admitted_last = False
        if self.rows:
            self._decode(events)
        return events

    def abort(self, detail: str) -> list[Event]:
        """End every running candidate with an error (the step that failed left them unusable)."""
        events: list[Event] = []
        for row in self.rows:
            row.sequence.finish_reason = "error"
            events.append(Event(row.request, row.index, text=detail, finish_reason="error"))
            self._finished(row.request)
        self.rows.clear()
        return events

    # -- admission --

    def _admit(self, events: list[Event]) -> bool:
        admitted = False
        while self.waiting:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                self._start(req)
                for i, seq in enumerate(req.sequences):
                    seq.finish_reason = "cancelled"
                    events.append(Event(req, i, finish_reason="cancelled"))
                self._finished(req)
                continue
            if len(self.rows) + req.n > self.max_batch:
                break
            self.waiting.popleft()
            try:
                self._prefill(req, events)
            except Exception as e:  # one bad request must not take the others down
                for row in [r for r in self.rows if r.request is req]:
                    self.rows.remove(row)
                for i in range(req.n):
                    events.append(Event(req, i, text=f"{type(e).__name__}: {e}", finish_reason="error"))
                self._finished(req)
            admitted = True
        return admitted

    def _start(self, req: Request):
        P = len(req.prompt)
        max_new = min(req.params.max_tokens, self.max_len - P)
        params = req.params if max_new == req.params.max_tokens else replace(req.params, max_tokens=max_new)
        vocab = self.model.config.vocab_size
        req.sequences = [Sequence.start(req.prompt, params, vocab, i) for i in range(req.n)]
        req.timings.prompt_tokens = P

    def _prefill(self, req: Request, events: list[Event]):
        self._start(req)
        P, first, t0 = len(req.prompt), len(self.rows), time.perf_counter()
        reused, key = self.prefixes.match(req.prompt)
        if reused:  # the keys and values of the prompt's first `reused` tokens are known
            self.prefixes.load(key, reused, self.cache, first)
            req.timings.cached_tokens = reused
            logits = self.model(torch.tensor([req.prompt[reused:]]), cache=self.cache.rows(first, first + 1),
                                kv_len=P, last_only=True)[:, -1]
        else:
            logits = prefill(self.model, self.cache.rows(first, first + 1), req.prompt)
        if req.n > 1:  # the candidates share the prefill
            self.cache.copy_rows(first, slice(first + 1, first + req.n), P)
        req.timings.prefill_s = time.perf_counter() - t0
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += P
        rows = [Row(req, i, P) for i in range(req.n)]
        self.rows.extend(rows)
        self._sample(rows, logits.expand(req.n, -1), events, t0)

    # -- decoding --

    def _decode(self, events: list[Event]):
        ended = [r for r in self.rows if r.request.cancelled or r.sequence.done]
        for row in ended:
            if not row.sequence.done:
                row.sequence.finish_reason = "cancelled"
        self._end(ended, events)
        if not self.rows:
            return
        n = len(self.rows)
        row = self.rows[0]
        if n == 1 and row.sequence.params.lookahead and row.sequence.params.greedy:
            k = min(row.sequence.params.lookahead, self.max_len - row.pos - 1)
            if row.pause:  # recent drafts were wrong: a checked draft costs more than a plain step
                row.pause -= 1
            elif k > 0 and (draft := draft_tokens(row.sequence.history, k)):
                return self._decode_draft(row, draft, events)
        # candidates of one request alone in the batch share their prompt's keys and values (the
        # prefill copied them into every row); the prompt's last position is left out, as a
        # rewound row writes it again
        one = n > 1 and all(r.request is row.request for r in self.rows)
        logits = decode_step(self.model, self.cache.rows(0, n), [r.token for r in self.rows],
                             [r.pos for r in self.rows], len(row.request.prompt) - 1 if one else 0)
        self.stats["steps"] += 1
        requests = {}
        for r in self.rows:
            r.pos += 1
            requests[id(r.request)] = r.request
        for req in requests.values():
            req.timings.decode_steps += 1
        self._sample(list(self.rows), logits, events)

    def _decode_draft(self, row: Row, draft: list[int], events: list[Event]):
        """One forward pass over the row's next token and a draft of those after it; tokens
        are then sampled one by one from its logits, as plain decoding would, for as long as
        each sampled token is the draft's (the logits after a wrong draft token mean nothing)."""
        tokens = [row.token] + draft
        logits = self.model(torch.tensor([tokens]), cache=self.cache.rows(0, 1), kv_len=row.pos + len(tokens))[0]
        self.stats["steps"] += 1
        t = row.request.timings
        t.decode_steps += 1
        t.drafted_tokens += len(draft)
        accepted = 0
        for j in range(len(tokens)):
            if j:
                if row.sequence.done or row.rewound or row.token != tokens[j]:
                    break
                accepted += 1
            row.pos += 1
            self._sample([row], logits[j : j + 1], events)
        t.accepted_tokens += accepted
        row.misses = 0 if accepted else min(row.misses + 1, 5)
        row.pause = 2**row.misses if row.misses else 0

    def _sample(self, rows: list[Row], logits: torch.Tensor, events: list[Event], prefill_start: float | None = None):
        """Sample each row's next token, turn it into events, and end the rows that finished."""
        picked = pick_tokens(logits, [r.sequence for r in rows]).tolist()
        now = time.monotonic()
        for row, token in zip(rows, picked):
            req, seq = row.request, row.sequence
            t = req.timings
            if t.first_token_at is None:
                t.first_token_at = now
                t.first_token_s = time.perf_counter() - prefill_start if prefill_start else 0.0
            t.generated_tokens += 1
            if prefill_start is None:
                t.decode_tokens += 1
            self.stats["generated_tokens"] += 1
            row.token, row.rewound = token, False
            text, ended = "", False
            if req.hook is not None and token not in seq.params.stop_token_ids:
                text, ended = req.hook.token(row.index, token)
            if req.hook is not None and seq.finish_reason in ("stop", "length") and not ended:
                at_end = getattr(req.hook, "at_end", None)
                ended = at_end(row.index) if at_end is not None else False
            if isinstance(ended, Rewind):
                self._rewind(row, ended.keep)
                token = None  # taken back: no token to report
            elif ended:
                seq.finish_reason = ended if isinstance(ended, str) else "stop"
            if req.cancelled:
                seq.finish_reason = "cancelled"
            elif req.deadline is not None and now > req.deadline and not seq.done:
                seq.finish_reason = "length"
            logprob = seq.logprobs[-1] if seq.logprobs and token is not None else None
            events.append(Event(req, row.index, token, text, logprob))
        self._end([row for row in rows if row.sequence.done], events)

    def _rewind(self, row: Row, keep: int):
        """Take the row back to its first `keep` output tokens: the next step feeds the token
        before that position again (rewriting its cache entry with the same keys and values)
        and samples the position anew, its rewound token excluded."""
        seq = row.sequence
        seq.rewind(keep)
        history_len = len(seq.prompt) + keep
        row.pos, row.token, row.rewound = history_len - 1, seq.history[history_len - 1], True
        row.misses = row.pause = 0

    def _end(self, ended: list[Row], events: list[Event]):
        """Close the ended rows and keep the running ones packed at the front of the cache:
        each hole below the new end is filled by a running row from above it (rows that ended
        together are never copied)."""
        if not ended:
            return
        for row in ended:
            req = row.request
            if req.hook is not None:
                tail = req.hook.finish(row.index)
                if tail:
                    events.append(Event(req, row.index, text=tail))
            events.append(Event(req, row.index, finish_reason=row.sequence.finish_reason))
        for row in ended:  # before other rows move into theirs: a later prompt may begin with it
            seq, at = row.sequence, next((i for i, r in enumerate(self.rows) if r is row), None)
            if row.index == 0 and seq.finish_reason not in ("error", "cancelled") and at is not None:
                self.prefixes.store((seq.prompt + seq.output)[: row.pos], self.cache, at)
        gone = {id(r) for r in ended}
        keep = len(self.rows) - len(ended)
        holes = [i for i in range(keep) if id(self.rows[i]) in gone]
        movers = [i for i in range(keep, len(self.rows)) if id(self.rows[i]) not in gone]
        for hole, mover in zip(holes, movers):
            self.cache.copy_rows(mover, hole, self.rows[mover].pos + 1)
            self.rows[hole] = self.rows[mover]
        del self.rows[keep:]
        for req in {id(r.request): r.request for r in ended}.values():
            if req.done:
                self._finished(req)

    def _finished(self, req: Request):
        t = req.timings
        t.finished_at = time.monotonic()
        if t.first_token_at is not None:
            t.decode_s = t.finished_at - t.first_token_at


def run(model: Transformer, req: Request) -> Iterator[list[Event]]:
    """Drive one request to its end on an engine of its own, sized to it; yields each step's
    events (the caller may `req.stop(i)` between steps)."""
    ctx = model.config.max_seq_len
    P = len(req.prompt)
    engine = Engine(model, max_batch=max(req.n, 1), max_len=min(ctx, P + req.params.max_tokens) if P < ctx else ctx)
    engine.add(req)
    with torch.inference_mode():
        while engine.has_work:
            yield engine.step()


def generate(model: Transformer, prompt: list[int], params: SamplingParams, n: int = 1) -> list[Sequence]:
    """Run to completion; return the n sequences (output ids, logprobs, finish reasons)."""
    req = Request(list(prompt), params, n)
    for _ in run(model, req):
        pass
    return req.sequences
