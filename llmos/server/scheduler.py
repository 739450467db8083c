"""The server's generation thread: one `Engine` (the one decode loop), driven continuously.

Requests arrive from any thread: the event loop's routes (`submit` with an asyncio loop) and
worker threads running chat turns or writing pipelines through `LLM` (`drive`, a blocking
iterator). The thread admits them into the engine, steps it, and hands each step's events to
their requests' inboxes: one wake-up per event loop per step, not one per token.

Other work on the model (embeddings) is queued here too (`run`), in pieces run between decode
steps, so it neither races the decode loop for the CPU nor stalls the streams for long.

Two bounds answer 429 rather than letting work pile up: requests waiting (`max_queue`) and
tokens in flight (`max_tokens_in_flight`: each admitted request reserves its prompt plus n times
its max_tokens until it ends).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from llmos.engine.generate import Engine, Event, Request


class QueueFull(Exception):
    """Too many requests wait, or too many tokens are in flight; the caller answers 429."""


@dataclass(eq=False)
class Job:
    """Work other than decoding, run on the scheduler thread one piece at a time."""

    pieces: deque
    future: Future
    results: list = field(default_factory=list)


@dataclass(eq=False)
class AsyncInbox:
    """Where an event-loop caller reads its request's events (lists of them, per step)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


@dataclass(eq=False)
class ThreadInbox:
    queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)


class Abandoned(Exception):
    """The client of a pipeline went away: its next generation is not started."""


class Pipeline:
    """The requests that a worker thread's pipeline (a chat turn, a novel) has in the
    scheduler, so that a client going away ends them at once rather than at the pipeline's next
    item, and stops it starting new ones. A worker thread sets `Pipeline.current.value`."""

    current = threading.local()

    def __init__(self):
        self.requests: set[Request] = set()
        self.abandoned = False

    def abandon(self):
        self.abandoned = True
        for req in list(self.requests):
            req.cancel()


def _settle(future: Future, result=None, exception: BaseException | None = None):
    """Set a job's outcome unless its caller cancelled it meanwhile."""
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def _deliver(items: list[tuple[AsyncInbox, list[Event]]]):
    for inbox, events in items:
        inbox.queue.put_nowait(events)


class Scheduler:
    def __init__(self, model, max_batch: int = 16, max_len: int | None = None, max_queue: int = 64,
                 max_tokens_in_flight: int | None = None):
        self.engine = Engine(model, max_batch=max_batch, max_len=min(max_len or 2048, model.config.max_seq_len))
        self.max_batch, self.max_len, self.max_queue = max_batch, self.engine.max_len, max_queue
        # default: every row full, plus as many again waiting
        self.max_tokens_in_flight = max_tokens_in_flight or 2 * max_batch * self.max_len
        self.rejected = 0
        self.jobs: deque[Job] = deque()
        self._reserved: dict[int, int] = {}  # id(request) -> tokens it holds
        self._lock = threading.Lock()
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
        return len(self.engine.waiting) + len(self.jobs)

    @property
    def tokens_in_flight(self) -> int:
        return sum(self._reserved.values())

    @property
    def running(self) -> int:
        return len(self.engine.rows)

    def submit(self, req: Request, loop: asyncio.AbstractEventLoop | None = None):
        """Queue a request; its events go to req.owner (an AsyncInbox for `loop`, else a
        ThreadInbox). Raises ValueError / ContextError if it can never run here, QueueFull if
        too many are waiting."""
        self.engine.check(req)
        cost = len(req.prompt) + req.n * min(req.params.max_tokens, self.max_len - len(req.prompt))
        with self._lock:
            held = sum(self._reserved.values())
            if self.queue_depth >= self.max_queue or (held and held + cost > self.max_tokens_in_flight):
                self.rejected += 1
                raise QueueFull()
            self._reserved[id(req)] = cost
        req.owner = AsyncInbox(loop) if loop is not None else ThreadInbox()
        # Straight into the engine's waiting line (a deque: appending is atomic), so that a burst
        # of requests arriving while others are prefilled is admitted in the same step.
        self.engine.add(req)
        with self._wake:
            self._wake.notify()

    def drive(self, req: Request, timeout: float | None = None) -> Iterator[list[Event]]:
        """Run a request in the shared batch from a worker thread: its events, step by step.
        An `LLM` made with `llm.with_driver(scheduler.drive)` generates this way."""
        pipeline: Pipeline | None = getattr(Pipeline.current, "value", None)
        if pipeline is not None:
            if pipeline.abandoned:
                raise Abandoned()
            pipeline.requests.add(req)
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
            if pipeline is not None:
                pipeline.requests.discard(req)

    def run(self, pieces: list[Callable[[], object]]) -> Future:
        """Queue work on the model as pieces run on this thread between decode steps; the
        future's result is the list of their results. Raises QueueFull like `submit`."""
        job = Job(deque(pieces), Future())
        with self._lock:
            if self.queue_depth >= self.max_queue:
                self.rejected += 1
                raise QueueFull()
            self.jobs.append(job)
        with self._wake:
            self._wake.notify()
        return job.future

    def close(self):
        self._stop.set()
        with self._wake:
            self._wake.notify()
        self.thread.join(timeout=10)

    # -- the scheduler thread --

    def _run(self):
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            if not self.engine.has_work and not self.jobs:
                with self._wake:
                    if not self.engine.has_work and not self.jobs and not self._stop.is_set():
                        self._wake.wait(timeout=0.5)
                continue
            if self.jobs:
                self._run_piece()
            if not self.engine.has_work:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # never let one bad step kill the server's only worker
                events = self.engine.abort(f"{type(e).__name__}: {e}")
            self._deliver(events)
        for job in self.jobs:
            job.future.cancel()

    def _run_piece(self):
        job = self.jobs[0]
        if job.future.cancelled():  # its caller went away
            self.jobs.popleft()
            return
        try:
            job.results.append(job.pieces.popleft()())
        except Exception as e:
            self.jobs.popleft()
            _settle(job.future, exception=e)
            return
        if not job.pieces:
            self.jobs.popleft()
            _settle(job.future, result=job.results)

    def _deliver(self, events: list[Event]):
        by_request: dict[int, tuple[Request, list[Event]]] = {}
        for e in events:
            by_request.setdefault(id(e.request), (e.request, []))[1].append(e)
        ended = [key for key, (req, _) in by_request.items() if req.done]
        if ended:
            with self._lock:
                for key in ended:
                    self._reserved.pop(key, None)
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
