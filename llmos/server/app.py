"""`llmos serve`: the OpenAI-compatible API, the KoboldCpp, Ollama and llama.cpp APIs front ends
speak, LLMOS's own endpoints and the studio page.

`create_app` wires the shared state (server/state.py), the gate (API key, body limit), error
handlers and the routers, one per concern (server/routes/). Routes are thin: a request becomes
an engine request on a scheduler, or a call into the writing and chat libraries, and the
result becomes JSON or server-sent events.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from llmos.server import errors
from llmos.server.gate import LOOPBACK_HOSTS, Gate, Policy
from llmos.server.routes import (cards, chat, jobs, knowledge, kobold, llamacpp, models, ollama, openai, preferences,
                                 projects, studio, writing)
from llmos.server.state import Limits, ServerState


def create_app(llm, *, api_key: str | None = None, max_body: int = 1_000_000, remotes: dict | None = None,
               store=None, multilingual: str | None = None, allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS,
               safety=None, copy_index=None, **limits) -> FastAPI:
    """The app serving `llm` (a loaded llmos.llm.LLM). multilingual: the model that Chinese
    requests naming no model run on when `llm` is English-only (loaded on first use; None: they
    run on `llm`, with a note saying why). allowed_hosts: the Host names answered (None: any).
    safety: the llmos.safety.Policy every local prompt and output is checked against (None: off).
    copy_index: the llmos.data.copying.CopyIndex `check_copying` uses when the model has no training data of ours.
    limits: the fields of server.state.Limits (max_batch, max_len, max_tokens, ...)."""
    if store is None:
        from llmos.db import Store

        store = Store()
    state = ServerState(llm, limits=Limits(**limits), remotes=remotes or {}, store=store, multilingual=multilingual,
                        safety=safety, copy_index=copy_index)

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.close()

    app = FastAPI(title="LLMOS", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API, writing tasks, chat sessions, knowledge bases and the "
                              "writing studio of LLMOS.")
    app.state.llmos = state
    app.state.scheduler, app.state.llm, app.state.store = state.primary.scheduler, llm, store
    app.state.metrics = state.metrics
    app.add_middleware(Gate, policy=Policy(max_body, api_key, allowed_hosts), routes=lambda: app.routes,
                       count=state.metrics.count_request)
    errors.install(app)
    for router in (openai.router, writing.router, chat.router, cards.router, knowledge.router, projects.router, preferences.router,
                   jobs.router, models.router, kobold.router, ollama.router, llamacpp.router, studio.router):
        app.include_router(router)
    return app
