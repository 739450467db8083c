"""The server's generation thread: one `Engine` (the one decode loop), driven continuously.

Requests arrive from any thread: the event loop's routes (`submit` with an asyncio loop) and
worker threads running chat turns or writing pipelines through `LLM` (`drive`, a blocking
iterator). The thread admits them into the engine, steps it, and hands each step's events to
their requests' inboxes: one wake-up per event loop per step, not one per token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from llmos.engine.generate import Engine, Event, Request


class QueueFull(Exception):
    """The bounded waiting queue is full; the caller answers 429."""


@dataclass(eq=False)
class AsyncInbox:
    """Where an event-loop caller reads its request's events (lists of them, per step)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass(eq=False)
class ThreadInbox:
    queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)


def _deliver(items: list[tuple[AsyncInbox, list[Event]]]):
    for inbox, events in items:
        inbox.queue.put_nowait(events)


class Scheduler:
    def __init__(self, model, max_batch: int = 16, max_len: int | None = None, max_queue: int = 64):
        self.engine = Engine(model, max_batch=max_batch, max_len=min(max_len or 2048, model.config.max_seq_len))
        self.max_batch, self.max_len, self.max_queue = max_batch, self.engine.max_len, max_queue
        self.rejected = 0
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="llmos-scheduler", daemon=True)
        self.thread.start()

    # -- any thread --

    @property
    def stats(self) -> dict:
        return {**self.engine.stats, "rejected": self.rejected}

    @property
    def queue_depth(self) -> int:
        return len(self.engine.waiting)

    @property
    def running(self) -> int:
        return len(self.engine.rows)

    def submit(self, req: Request, loop: asyncio.AbstractEventLoop | None = None):
        """Queue a request; its events go to req.owner (an AsyncInbox for `loop`, else a
        ThreadInbox). Raises ValueError / ContextError if it can never run here, QueueFull if
        too many are waiting."""
        self.engine.check(req)
        if self.queue_depth >= self.max_queue:
            self.rejected += 1
            raise QueueFull()
        req.owner = AsyncInbox(loop) if loop is not None else ThreadInbox()
        # Straight into the engine's waiting line (a deque: appending is atomic), so that a burst
        # of requests arriving while others are prefilled is admitted in the same step.
        self.engine.add(req)
        with self._wake:
            self._wake.notify()

    def drive(self, req: Request, timeout: float | None = None) -> Iterator[list[Event]]:
        """Run a request in the shared batch from a worker thread: its events, step by step.
        An `LLM` made with `llm.with_driver(scheduler.drive)` generates this way."""
        if timeout is not None:
            req.deadline = time.monotonic() + timeout
        self.submit(req)
        inbox: ThreadInbox = req.owner
        ended = 0
        try:
            while ended < req.n:
                events = inbox.queue.get()
                ended += sum(e.finish_reason is not None for e in events)
                yield events
        finally:
            if ended < req.n:
                req.cancel()

    def close(self):
        self._stop.set()
        with self._wake:
            self._wake.notify()
        self.thread.join(timeout=10)

    # -- the scheduler thread --

    def _run(self):
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            if not self.engine.has_work:
                with self._wake:
                    if not self.engine.has_work and not self._stop.is_set():
                        self._wake.wait(timeout=0.5)
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # never let one bad step kill the server's only worker
                events = self.engine.abort(f"{type(e).__name__}: {e}")
            self._deliver(events)

    def _deliver(self, events: list[Event]):
        by_request: dict[int, tuple[Request, list[Event]]] = {}
        for e in events:
            by_request.setdefault(id(e.request), (e.request, []))[1].append(e)
        by_loop: dict = {}
        for req, evs in by_request.values():
            inbox = req.owner
            if isinstance(inbox, ThreadInbox):
                inbox.queue.put(evs)
            elif isinstance(inbox, AsyncInbox):
                by_loop.setdefault(inbox.loop, []).append((inbox, evs))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop has closed: nobody is listening
                pass
