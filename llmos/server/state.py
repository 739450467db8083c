"""What every route shares: the served models (each an `LLM` generating through its own
scheduler, the one decode loop), remote models, the SQLite store, metrics and limits.

Which model a request runs on follows the one rule in `weights.store.model_for`: the model it
names; else Chinese goes to the multilingual model, loaded on first use when the server's own
model is English-only; else the server's model.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial

from fastapi import Request as HTTPRequest

from llmos.server.errors import APIError, not_found
from llmos.server.jobs import Jobs
from llmos.server.metrics import Metrics
from llmos.server.scheduler import Scheduler

NOTE = "llmos_note"  # request-scope key of a note sent back as the X-LLMOS-Note header


@dataclass
class Served:
    llm: object  # llmos.llm.LLM, generating through scheduler.drive
    scheduler: Scheduler

    @property
    def name(self) -> str:
        return self.llm.name


class ServerState:
    def __init__(self, llm, *, max_batch: int, max_len: int, max_queue: int, request_timeout: float,
                 remotes: dict, store, multilingual: str | None):
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.request_timeout = request_timeout
        self.remotes, self.store, self.multilingual = remotes, store, multilingual
        self.primary = self._serve(llm)
        self.served: dict[str, Served] = {llm.name: self.primary}
        self.metrics = Metrics(self.schedulers)
        self.jobs = Jobs()
        self._loading: asyncio.Lock | None = None

    def _serve(self, llm) -> Served:
        scheduler = Scheduler(llm.model, max_batch=self.max_batch, max_len=self.max_len, max_queue=self.max_queue)
        return Served(llm.with_driver(partial(scheduler.drive, timeout=self.request_timeout)), scheduler)

    def schedulers(self) -> list[Scheduler]:
        return list({id(s.scheduler): s.scheduler for s in self.served.values()}.values())

    def close(self):
        for scheduler in self.schedulers():
            scheduler.close()
        self.jobs.close()

    def remote(self, model: str | None):
        return self.remotes.get(model) if model else None

    async def local(self, http: HTTPRequest, model: str | None, *texts: str, language: str | None = None) -> Served:
        """The local model a request runs on (404 for a name that is neither served nor remote)."""
        from llmos.weights.store import model_for

        if model:
            if model in self.served:
                return self.served[model]
            raise not_found(f"model {model!r} is not served here; GET /v1/models lists the models", "model")
        wanted = model_for(None, *texts, language=language)
        if wanted is None or self.primary.llm.loaded.multilingual:
            return self.primary
        if self.multilingual is None:
            setattr(http.state, NOTE, f"Chinese text on {self.primary.name}, an English model: this server was "
                                         f"started without a multilingual model (llmos serve --multilingual NAME)")
            return self.primary
        return await self._load_multilingual()

    async def _load_multilingual(self) -> Served:
        from llmos.llm import LLM
        from llmos.weights.store import ModelError

        name = self.multilingual
        if name in self.served:
            return self.served[name]
        if self._loading is None:
            self._loading = asyncio.Lock()
        async with self._loading:
            if name not in self.served:
                try:
                    llm = await asyncio.to_thread(LLM.load, name, self.primary.llm.loaded.precision)
                except ModelError as e:
                    raise APIError(503, f"Chinese requests run on {name}, which cannot be loaded here ({e}); "
                                        f"name a model to use another", "model", "server_error") from None
                served = self._serve(llm)
                self.served[name] = self.served[llm.name] = served
        return self.served[name]


def state(http: HTTPRequest) -> ServerState:
    return http.app.state.llmos
