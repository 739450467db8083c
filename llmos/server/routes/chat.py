"""Chat over HTTP: personas, and sessions driven by the same turn pipeline as `llmos chat`
(chat/conversation.py): memory under a token budget, pinned facts, strategies, knowledge-base
answers, retry / undo / edit / rate, and swipes between a message's alternative replies. Sessions live in the SQLite store, so a chat started here
continues in `llmos chat --session N` and the other way round."""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi import APIRouter, Query, Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from llmos.server import protocol as P
from llmos.server.errors import APIError, not_found
from llmos.server.scheduler import QueueFull
from llmos.server.state import state
from llmos.server.streaming import BUSY, DONE, in_thread, sse

router = APIRouter(tags=["Chat"])

SSE = {200: {"content": {"text/event-stream": {}},
             "description": "JSON, or with `stream: true` server-sent events: {\"context\"} (what was sent to the "
                            "model), {\"text\"} pieces, then {\"turn\"} (the stored reply)."}}


def _chat_errors():
    from llmos.chat.kb import KBError
    from llmos.chat.personas import PersonaError
    from llmos.chat.sessions import SessionError

    return SessionError, PersonaError, KBError


def _sessions(http: HTTPRequest):
    from llmos.chat.sessions import Sessions

    return Sessions(state(http).store)


def _get(http: HTTPRequest, session_id: int) -> dict:
    from llmos.chat.sessions import SessionError

    try:
        return _sessions(http).get(session_id)
    except SessionError as e:
        raise not_found(str(e), "session_id") from None


def _detail(http: HTTPRequest, session_id: int) -> dict:
    sessions = _sessions(http)
    row = _get(http, session_id)
    return {**row, "persona_data": json.loads(row["persona_data"]), "facts": sessions.facts(session_id),
            "turns": sessions.turns(session_id)}


# -- personas --


@router.get("/api/personas", response_model=P.Personas)
def personas():
    """Built-in personas and the user's ($LLMOS_HOME/personas), as `llmos personas` lists them."""
    from llmos.chat.personas import PersonaError, list_personas, read_persona_file

    found = []
    for row in list_personas():
        try:
            p = read_persona_file(row["path"])
        except PersonaError:
            continue  # an invalid file of the user's: `llmos personas` says why
        found.append({"name": p.name, "description": p.description, "greeting": p.greeting,
                      "system": p.system_prompt(), "language": p.language, "builtin": row["builtin"]})
    return {"personas": found}


@router.get("/api/personas/{name}")
def persona(name: str) -> dict:
    """One persona, every field (`llmos personas show`)."""
    from llmos.chat.personas import PersonaError, load_persona

    try:
        return load_persona(name).to_dict()
    except PersonaError as e:
        raise not_found(str(e), "name") from None


# -- sessions --


@router.get("/api/chat/sessions", response_model=P.Sessions)
def list_sessions(http: HTTPRequest):
    """Chat sessions, newest first (`llmos sessions`)."""
    return {"sessions": _sessions(http).list()}


@router.post("/api/chat/sessions", response_model=P.SessionDetail, status_code=201)
async def create_session(body: P.SessionCreate, http: HTTPRequest):
    """Start a chat with a persona (and a knowledge base). A persona in Chinese (its
    `language: zh`) runs on the multilingual model unless a model is named."""
    from llmos.chat.conversation import Conversation
    from llmos.chat.kb import KnowledgeBase
    from llmos.chat.personas import load_persona

    st = state(http)
    try:
        chosen = load_persona(body.persona)
        base = KnowledgeBase(st.store, body.kb) if body.kb else None
    except _chat_errors() as e:
        raise APIError(400, str(e), "kb" if body.kb and "knowledge" in str(e) else "persona") from None
    served = await st.local(http, body.model, chosen.greeting, language=chosen.language)
    conv = Conversation(served.llm, _sessions(http), None, chosen, base)
    if body.title:
        conv.sessions.update(conv.id, title=body.title)
    return _detail(http, conv.id)


@router.get("/api/chat/sessions/{session_id}", response_model=P.SessionDetail)
def show_session(session_id: P.RowId, http: HTTPRequest):
    """A session: its persona, pinned facts, summary and active turns."""
    return _detail(http, session_id)


@router.patch("/api/chat/sessions/{session_id}", response_model=P.SessionDetail)
async def update_session(session_id: P.RowId, body: P.SessionUpdate, http: HTTPRequest):
    """Rename a session (/title), talk to another persona from here on (/persona), or change its
    knowledge base."""
    from llmos.chat.conversation import Conversation

    st = state(http)
    row = _get(http, session_id)
    sessions = _sessions(http)
    try:
        if body.title is not None:
            sessions.update(session_id, title=body.title)
        if body.kb is not None:
            if body.kb:
                from llmos.chat.kb import KnowledgeBase

                KnowledgeBase(st.store, body.kb)  # it must exist
            sessions.update(session_id, kb=body.kb or None)
        if body.persona is not None:
            served = await _served_for(http, row)
            Conversation(served.llm, sessions, session_id).switch_persona(body.persona)
    except _chat_errors() as e:
        raise APIError(400, str(e), "persona" if body.persona else "kb") from None
    return _detail(http, session_id)


@router.delete("/api/chat/sessions/{session_id}", response_model=P.Deleted)
def delete_session(session_id: P.RowId, http: HTTPRequest):
    _get(http, session_id)
    _sessions(http).delete(session_id)
    return {"deleted": session_id}


@router.get("/api/chat/sessions/{session_id}/export", responses={200: {"content": {"text/markdown": {}}}})
def export_session(session_id: P.RowId, http: HTTPRequest, format: str = Query("md", description="md or json")):
    """Every turn (replaced ones marked), ratings, facts and the summary, as Markdown or JSON."""
    _get(http, session_id)
    if format not in ("md", "json"):
        raise APIError(400, "format must be md or json", "format")
    text = _sessions(http).export(session_id, format)
    return Response(text, media_type="application/json" if format == "json" else "text/markdown",
                    headers={"Content-Disposition": f'attachment; filename="chat-{session_id}.{format}"'})


async def _served_for(http: HTTPRequest, row: dict):
    """The model a session runs on: the one it was started with when it is served here, else by
    the one rule (its persona's language)."""
    st = state(http)
    if row["model"] in st.served:
        return st.served[row["model"]]
    persona = json.loads(row["persona_data"])
    return await st.local(http, None, language=persona.get("language"))


async def _conversation(http: HTTPRequest, session_id: int, opts: P.TurnOptions):
    from llmos.chat.conversation import ChatSettings, Conversation
    from llmos.chat.kb import KnowledgeBase

    state(http).check_max_tokens(opts.max_tokens)
    row = _get(http, session_id)
    served = await _served_for(http, row)
    try:
        base = KnowledgeBase(state(http).store, row["kb"]) if row["kb"] else None
    except _chat_errors() as e:
        raise APIError(400, str(e), "kb") from None
    settings = ChatSettings(max_tokens=opts.max_tokens, temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed,
                            budget=opts.budget, extract_facts=opts.extract_facts)
    return Conversation(served.llm, _sessions(http), session_id, None, base, settings)


async def _turn(http: HTTPRequest, session_id: int, opts: P.TurnOptions, start, conv=None):
    """Run one turn (start(conv) -> iterator of text pieces) in a worker thread; its generation
    joins the server's batch. Streamed or collected into the stored reply."""
    conv = conv or await _conversation(http, session_id, opts)
    contexts: list = []
    conv.on_context = contexts.append

    def pieces() -> Iterator:
        for piece in start(conv):
            if contexts:
                yield ("context", contexts.pop())
            yield ("text", piece)

    def turn_json() -> dict:
        turns = conv.turns()
        last = turns[-1] if turns and turns[-1]["role"] == "assistant" else None
        action = conv.last_action
        row = conv.row
        return {"session": session_id, "reply": last["content"] if last else "", "turn": last,
                "strategy": (last or {}).get("meta", {}).get("strategy"),
                "handover": bool(action and action.handover), "closed": row["status"] == "closed"}

    errors = _chat_errors()
    if opts.stream:
        async def events():
            try:
                async for kind, item in in_thread(pieces, http):
                    if kind == "context":
                        yield sse({"context": item.render()})
                    else:
                        yield sse({"text": item})
                yield sse({"turn": turn_json()})
                yield DONE
            except QueueFull:
                yield sse(P.error_body(BUSY, kind="rate_limit_error"))
            except (*errors, ValueError, RuntimeError) as e:
                yield sse(P.error_body(str(e)))

        return StreamingResponse(events(), media_type="text/event-stream")
    try:
        async for _ in in_thread(pieces, http):
            pass
    except QueueFull:
        raise APIError(429, BUSY, kind="rate_limit_error", headers={"Retry-After": "1"}) from None
    except (*errors, ValueError) as e:
        raise APIError(400, str(e)) from None
    return turn_json()


@router.post("/api/chat/sessions/{session_id}/messages", response_model=P.TurnResponse, responses=SSE)
async def send(session_id: P.RowId, body: P.TurnRequest, http: HTTPRequest):
    """Send a message and get the reply (stored as it is written; a client that goes away keeps
    what was written so far, marked interrupted)."""
    return await _turn(http, session_id, body, lambda conv: conv.send(body.content))


@router.post("/api/chat/sessions/{session_id}/retry", response_model=P.TurnResponse, responses=SSE)
async def retry(session_id: P.RowId, http: HTTPRequest, body: P.TurnOptions | None = None):
    """A new reply to the last message (the old one is kept, inactive)."""
    return await _turn(http, session_id, body or P.TurnOptions(), lambda conv: conv.retry())


@router.get("/api/chat/sessions/{session_id}/alternatives", response_model=P.Alternatives)
async def alternatives(session_id: P.RowId, http: HTTPRequest,
                       turn: int | None = Query(None, description="A message or one of its replies; default: the last message.")):
    """Every reply one message got (the last message by default), oldest first, and which is
    active; before the first message, the persona's greetings."""
    conv = await _conversation(http, session_id, P.TurnOptions())
    try:
        alts = conv.alternatives(turn)
    except _chat_errors() as e:
        raise APIError(400, str(e), "turn") from None
    return {"session": session_id, "reply_to": alts.reply_to, "index": alts.index, "latest": alts.latest,
            "alternatives": alts.turns}


@router.post("/api/chat/sessions/{session_id}/swipe", response_model=P.TurnResponse, responses=SSE)
async def swipe(session_id: P.RowId, body: P.SwipeRequest, http: HTTPRequest):
    """Make another alternative the active reply to the last message, by `index` or `turn`;
    `index` one past the last writes a new reply (as retry). An older message's replies cannot
    be swiped (the turns after it answer the reply it has)."""
    conv = await _conversation(http, session_id, body)
    try:
        pieces = conv.swipe(body.index, turn=body.turn)
    except (*_chat_errors(), ValueError) as e:
        raise APIError(400, str(e), "turn" if body.turn is not None else "index") from None
    return await _turn(http, session_id, body, lambda _: pieces, conv)


@router.post("/api/chat/sessions/{session_id}/edit", response_model=P.TurnResponse, responses=SSE)
async def edit(session_id: P.RowId, body: P.TurnRequest, http: HTTPRequest):
    """Replace the last message with `content` and reply again."""
    return await _turn(http, session_id, body, lambda conv: conv.edit(body.content))


@router.post("/api/chat/sessions/{session_id}/undo", response_model=P.Undone)
async def undo(session_id: P.RowId, http: HTTPRequest):
    """Take back the last message and its reply."""
    conv = await _conversation(http, session_id, P.TurnOptions())
    try:
        return {"session": session_id, "taken": conv.undo()}
    except _chat_errors() as e:
        raise APIError(400, str(e)) from None


@router.post("/api/chat/sessions/{session_id}/rate", response_model=P.SessionDetail)
async def rate(session_id: P.RowId, body: P.Rating, http: HTTPRequest):
    """Rate the last reply: 1-5, or up / down."""
    value = {"up": 5, "down": 1}.get(body.rating, body.rating) if isinstance(body.rating, str) else body.rating
    conv = await _conversation(http, session_id, P.TurnOptions())
    try:
        conv.rate(value)
    except (*_chat_errors(), ValueError) as e:
        raise APIError(400, str(e), "rating") from None
    return _detail(http, session_id)


@router.post("/api/chat/sessions/{session_id}/facts", response_model=P.Pinned)
async def pin(session_id: P.RowId, body: P.FactBody, http: HTTPRequest):
    """Pin a fact for the rest of the session (/pin)."""
    _get(http, session_id)
    sessions = _sessions(http)
    pinned = sessions.add_fact(session_id, body.fact, source="user")
    return {"session": session_id, "pinned": pinned, "facts": sessions.facts(session_id)}
