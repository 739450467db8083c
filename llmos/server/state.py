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


@dataclass
class Limits:
    """What one request may ask for, and how much may be in flight (`llmos serve --help`)."""

    max_batch: int = 16
    max_len: int = 2048
    max_queue: int = 64
    request_timeout: float = 300.0
    max_tokens: int = 4096  # per request; a larger max_tokens is a 400
    max_tokens_in_flight: int | None = None  # prompts + n * max_tokens of admitted requests (None: 2 * batch * context)
    max_embedding_inputs: int = 256
    max_embedding_tokens: int = 32_768  # over all inputs of one request


class ServerState:
    def __init__(self, llm, *, limits: Limits, remotes: dict, store, multilingual: str | None,
                 safety=None, copy_index=None):
        self.limits = limits
        self.safety = safety  # llmos.safety.Policy checked on every local prompt and output (None: off)
        self.copy_index = copy_index  # llmos.data.copying.CopyIndex that check_copying uses when a model has no training data of ours
        self.max_batch, self.max_len, self.max_queue = limits.max_batch, limits.max_len, limits.max_queue
        self.request_timeout = limits.request_timeout
        self.remotes, self.store, self.multilingual = remotes, store, multilingual
        self.primary = self._serve(llm)
        self.served: dict[str, Served] = {llm.name: self.primary}
        self.metrics = Metrics(self.schedulers)
        self.jobs = Jobs()
        self._copying: dict[str, object] = {}  # model name -> the CopyIndex its check_copying uses
        self._default_policy = None  # loaded on the first /v1/moderations of a server with safety off
        self._loading: asyncio.Lock | None = None

    def _serve(self, llm) -> Served:
        scheduler = Scheduler(llm.model, max_batch=self.max_batch, max_len=self.max_len, max_queue=self.max_queue,
                              max_tokens_in_flight=self.limits.max_tokens_in_flight)
        served = llm.with_driver(partial(scheduler.drive, timeout=self.request_timeout))
        served.safety = self.safety
        served.audit = partial(self.audit, served.name) if self.safety is not None else None
        return Served(served, scheduler)

    @property
    def moderation_policy(self):
        """The policy /v1/moderations answers with: the server's, or the default one when safety is off."""
        if self.safety is not None:
            return self.safety
        if self._default_policy is None:
            from llmos.safety import load_policy

            self._default_policy = load_policy(None)
        return self._default_policy

    def ended(self, req, llm=None):
        """A request is over: count it, and record what the safety policy found in its outputs."""
        self.metrics.observe(req)
        if llm is not None:
            llm.audit_outputs(req)

    def copying_for(self, served: Served):
        """The copy index check_copying uses for a model: its own training data when it was
        trained here, else the server's --copy-index; 400 when there is neither."""
        from llmos.data.copying import CopyError, resolve_index

        if served.name not in self._copying:
            try:
                self._copying[served.name] = resolve_index(served.llm.loaded.path)
            except CopyError:
                self._copying[served.name] = self.copy_index
        index = self._copying[served.name]
        if index is None:
            raise APIError(400, f"{served.name} was not trained here, so it has no training data to check against: "
                                f"start the server with --copy-index (a folder of texts, a dataset or a run)",
                           "check_copying")
        return index

    def audit(self, model: str, kind: str, verdict):
        """Record a safety finding in the store's audit log (`llmos safety audit` lists it)."""
        from llmos.safety import record_audit

        record_audit(self.store, f"server:{kind}", verdict, policy=self.safety, model=model)

    def schedulers(self) -> list[Scheduler]:
        return list({id(s.scheduler): s.scheduler for s in self.served.values()}.values())

    def close(self):
        for scheduler in self.schedulers():
            scheduler.close()
        self.jobs.close()

    def check_max_tokens(self, value: int | None, param: str = "max_tokens"):
        """400 for a max_tokens over this server's cap."""
        if value is not None and value > self.limits.max_tokens:
            raise APIError(400, f"{param} is {value}; this server allows at most {self.limits.max_tokens} "
                                f"(llmos serve --max-tokens)", param)

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
