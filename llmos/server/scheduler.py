"""Continuous batching: one thread owns the model and decodes every running sequence together.

The KV cache has `max_batch` slots of `max_len` positions. A request is prefilled into free
slots (one prefill shared by its n candidates) between decode steps, joins the running batch,
and leaves it when it ends (EOS, a stop string, max_tokens, its time limit, or its client
going away); the slot is then reused. Running rows are kept packed at the front of the cache,
so a decode step runs on exactly the live sequences, each at its own position.

Text is produced here too (streaming detokenization and stop strings per candidate) so that a
stop string frees its slot at once. Events go to each request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from llmos.engine.generate import Sequence, cache_dtype, pick_tokens
from llmos.engine.sampling import SamplingParams
from llmos.model import KVCache


class QueueFull(Exception):
    """The bounded waiting queue is full; the caller answers 429."""


@dataclass
class Event:
    index: int  # candidate
    text: str = ""
    token: int | None = None
    logprob: object = None
    finish_reason: str | None = None


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    n: int = 1
    stop: list[str] = field(default_factory=list)
    deadline: float | None = None  # time.monotonic() after which it is ended
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    # filled in by the scheduler
    sequences: list[Sequence] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None



def _deliver(items: list[tuple[Request, Event]]):
    for req, event in items:
        req.events.put_nowait(event)


@dataclass
class Slot:
    request: Request
    index: int  # candidate index within the request
    pos: int  # position of the next token to feed
    token: int  # the token to feed next
    decoder: object
    cutter: object


class Scheduler:
    def __init__(self, llm, max_batch: int = 16, max_len: int | None = None, max_queue: int = 64):
        self.llm, self.model = llm, llm.model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = min(max_len or 2048, self.model.config.max_seq_len)
        self.cache = KVCache(self.model.config, max_batch, self.max_len, cache_dtype(self.model))
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.slots: list[Slot] = []  # running rows, packed: slot i is cache row i
        self._outbox: list[tuple[Request, Event]] = []  # events of this step, sent together
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0, "rejected": 0}
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="llmos-scheduler", daemon=True)
        self.thread.start()

    # -- submission (any thread) --

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    @property
    def running(self) -> int:
        return len(self.slots)

    def submit(self, req: Request):
        if req.n > self.max_batch:
            raise ValueError(f"n={req.n} exceeds the server's batch size ({self.max_batch})")
        if len(req.prompt) + 1 >= self.max_len:
            raise ValueError(f"the prompt is {len(req.prompt)} tokens; this server's context is {self.max_len}")
        if self.waiting.qsize() >= self.max_queue:
            self.stats["rejected"] += 1
            raise QueueFull()
        self.waiting.put(req)
        with self._wake:
            self._wake.notify()

    def close(self):
        self._stop.set()
        with self._wake:
            self._wake.notify()
        self.thread.join(timeout=10)

    # -- the loop (scheduler thread) --

    def _run(self):
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            try:
                self._admit()
                if not self.slots:
                    with self._wake:
                        if self.waiting.empty() and not self._stop.is_set():
                            self._wake.wait(timeout=0.5)
                    continue
                self._step()
            except Exception as e:  # never let one bad request kill the server's only worker
                for slot in list(self.slots):
                    self._finish(slot, "error", detail=f"{type(e).__name__}: {e}")
                self.slots.clear()
            finally:
                self._flush()

    def _send(self, req: Request, event: Event):
        self._outbox.append((req, event))

    def _flush(self):
        """Hand the step's events to the event loops: one wake-up per loop per step, not one
        per token (at 16 streams that is most of the server's overhead)."""
        if not self._outbox:
            return
        by_loop: dict = {}
        for req, event in self._outbox:
            if req.loop is not None:
                by_loop.setdefault(req.loop, []).append((req, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop has closed: nobody is listening
                pass

    def _admit(self):
        while not self.waiting.empty():
            req = self.waiting.queue[0]
            if req.cancelled:
                self.waiting.get()
                continue
            if len(self.slots) + req.n > self.max_batch:
                return
            self.waiting.get()
            try:
                self._prefill(req)
            except Exception as e:
                self._send(req, Event(0, finish_reason="error", text=f"{type(e).__name__}: {e}"))

    def _prefill(self, req: Request):
        from llmos.llm import StopStrings

        P = len(req.prompt)
        max_new = min(req.params.max_tokens, self.max_len - P)
        params = req.params if max_new == req.params.max_tokens else _with_max(req.params, max_new)
        vocab = self.model.config.vocab_size
        req.sequences = [Sequence.start(req.prompt, params, vocab, i) for i in range(req.n)]
        req.texts = [""] * req.n
        first = len(self.slots)
        view = self._rows(first, first + 1)
        logits = self.model(torch.tensor([req.prompt]), cache=view, kv_len=P, last_only=True)[:, -1]
        for i in range(1, req.n):  # candidates share the prefill
            for layer in range(self.model.config.n_layer):
                self.cache.k[layer][first + i, :, :P] = self.cache.k[layer][first, :, :P]
                self.cache.v[layer][first + i, :, :P] = self.cache.v[layer][first, :, :P]
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += P
        new_slots = [Slot(req, i, P, 0, self.llm.tokenizer.stream(), StopStrings(req.stop)) for i in range(req.n)]
        self.slots.extend(new_slots)
        self._emit_tokens(new_slots, logits.expand(req.n, -1))

    def _rows(self, start: int, end: int) -> KVCache:
        view = KVCache.__new__(KVCache)
        view.k = [k[start:end] for k in self.cache.k]
        view.v = [v[start:end] for v in self.cache.v]
        view.batch_size, view.max_len = end - start, self.max_len
        return view

    def _step(self):
        n = len(self.slots)
        tokens = torch.tensor([[s.token] for s in self.slots])
        positions = [s.pos for s in self.slots]
        kv_len = max(positions) + 1
        # Rows at one position (a lone request, or the candidates of one) take the lockstep
        # path: no attention mask, and a plain slice write into the cache.
        pos = None if min(positions) == kv_len - 1 else torch.tensor(positions)[:, None]
        logits = self.model(tokens, input_pos=pos, cache=self._rows(0, n), kv_len=kv_len)[:, -1]
        for s in self.slots:
            s.pos += 1
        self.stats["steps"] += 1
        self._emit_tokens(list(self.slots), logits)

    def _emit_tokens(self, slots: list[Slot], logits: torch.Tensor):
        """Sample the next token of each slot, send text, and retire the slots that finished."""
        seqs = [s.request.sequences[s.index] for s in slots]
        picked = pick_tokens(logits, seqs)
        now = time.monotonic()
        stop_ids = None
        for slot, seq, token in zip(slots, seqs, picked.tolist()):
            req = slot.request
            req.first_token_at = req.first_token_at or now
            self.stats["generated_tokens"] += 1
            stop_ids = seq.params.stop_token_ids
            text = ""
            if token not in stop_ids:
                text = slot.cutter.feed(slot.decoder.push(token))
                if slot.cutter.hit:
                    seq.finish_reason = "stop"
            req.texts[slot.index] += text
            lp = seq.logprobs[-1] if seq.logprobs else None
            slot.token = token
            if req.cancelled:
                seq.finish_reason = "cancelled"
            elif req.deadline is not None and now > req.deadline and not seq.done:
                seq.finish_reason = "length"
            if text or lp is not None:
                self._send(req, Event(slot.index, text, token, lp))
            if seq.done:
                self._finish(slot, seq.finish_reason)

    def _finish(self, slot: Slot, reason: str, detail: str = ""):
        req = slot.request
        if not slot.cutter.hit and reason != "error":
            tail = slot.cutter.feed(slot.decoder.flush()) + slot.cutter.finish()
            if tail:
                req.texts[slot.index] += tail
                self._send(req, Event(slot.index, tail))
        self._send(req, Event(slot.index, detail, finish_reason=reason))
        if slot in self.slots:
            row = self.slots.index(slot)
            last = len(self.slots) - 1
            if row != last:  # keep running rows packed: move the last row into the freed one
                used = self.slots[last].pos + 1
                for layer in range(self.model.config.n_layer):
                    self.cache.k[layer][row, :, :used] = self.cache.k[layer][last, :, :used]
                    self.cache.v[layer][row, :, :used] = self.cache.v[layer][last, :, :used]
                self.slots[row] = self.slots[last]
            self.slots.pop()
        if all(s.done for s in req.sequences):
            req.finished_at = time.monotonic()


def _with_max(params: SamplingParams, max_tokens: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, max_tokens=max_tokens)
