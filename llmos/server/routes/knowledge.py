"""Knowledge bases over HTTP, as `llmos kb` has them: list, add documents (uploaded as text),
show, search by meaning, delete a document or the whole base."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Query, Request as HTTPRequest

from llmos.server import protocol as P
from llmos.server.errors import APIError, not_found
from llmos.server.state import state

router = APIRouter(tags=["Knowledge bases"])


def _open(http: HTTPRequest, name: str, create: bool = False):
    from llmos.chat.kb import KBError, KnowledgeBase

    try:
        return KnowledgeBase(state(http).store, name, create=create)
    except KBError as e:
        if "no knowledge base" in str(e):
            raise not_found(str(e), "name") from None
        raise APIError(400, str(e), "name") from None


@router.get("/api/kb", response_model=P.KBList)
def list_kbs(http: HTTPRequest):
    from llmos.chat.kb import list_kbs as rows

    return {"knowledge_bases": rows(state(http).store)}


@router.get("/api/kb/{name}", response_model=P.KBDocuments)
def show(name: str, http: HTTPRequest):
    return {"name": name, "documents": _open(http, name).documents()}


@router.post("/api/kb/{name}/documents", response_model=P.KBAddReport)
async def add(name: str, body: P.KBUpload, http: HTTPRequest):
    """Add or refresh documents (created if the base is new). Markdown headings and Q:/A: pairs
    are split into passages as for files; an unchanged document is skipped."""
    from llmos.chat.kb import KBError
    from llmos.embedder import EmbedderError
    from llmos.weights.store import ModelError

    names = [d.name for d in body.documents]
    if len(set(names)) != len(names):
        raise APIError(400, "each document needs its own name", "documents")
    base = _open(http, name, create=True)
    try:
        report = await asyncio.to_thread(base.add_texts, [(f"upload/{d.name}", d.text) for d in body.documents])
    except (KBError, EmbedderError, ModelError) as e:
        raise APIError(400, str(e), "documents") from None
    return {"name": name, "added": report.added, "updated": report.updated, "unchanged": report.unchanged,
            "skipped": [list(s) for s in report.skipped], "passages": report.passages, "seconds": report.seconds}


@router.get("/api/kb/{name}/search", response_model=P.KBSearch)
async def search(name: str, http: HTTPRequest, q: str = Query(min_length=1, description="What to look for."),
                 k: int = Query(5, ge=1, le=50)):
    """The passages closest in meaning to q, with their scores and sources."""
    base = _open(http, name)
    hits = await asyncio.to_thread(base.search, q, k)
    return {"name": name, "query": q, "hits": [h.__dict__ for h in hits]}


@router.delete("/api/kb/{name}/documents", response_model=P.Deleted)
def delete_document(name: str, http: HTTPRequest, path: str = Query(description="The document's path, as listed.")):
    from llmos.chat.kb import KBError

    try:
        _open(http, name).remove(path)
    except KBError as e:
        raise not_found(str(e), "path") from None
    return {"deleted": path}


@router.delete("/api/kb/{name}", response_model=P.Deleted)
def delete(name: str, http: HTTPRequest):
    """Delete a knowledge base (documents added from files are not touched)."""
    from llmos.chat.kb import KBError, delete_kb

    try:
        delete_kb(state(http).store, name)
    except KBError as e:
        raise not_found(str(e), "name") from None
    return {"deleted": name}
