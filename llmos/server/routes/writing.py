"""Writing over HTTP, with what `llmos write` does: tasks with every option (forms, ranking,
DRY, banned phrases, variables), novels stage by stage, story continuation with Memory, Author's
Note and Lorebook, and the lists of tasks and forms."""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import StreamingResponse

from llmos.server import protocol as P
from llmos.server.errors import APIError, param_of
from llmos.server.scheduler import QueueFull
from llmos.server.state import state
from llmos.server.streaming import BUSY, DONE, event_stream, finish, in_thread, sse, submit

router = APIRouter(tags=["Writing"])

SSE = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with `stream: true`."}}
BOOK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _write_request(body: P.WriteRequestBody, language: str):
    from llmos.writing.tasks import WriteRequest

    return WriteRequest(body.task, body.brief, body.variables, language, body.form, body.n,
                        dict(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                             dry_multiplier=body.dry, logprobs=0 if body.rank and body.logprobs is None else body.logprobs),
                        [] if body.allow_phrases else body.banned_phrases)


def _check_style(rank):
    """A style ranking's model must be here and trained with the multi-task objective."""
    from llmos.writing.rank import check_style_model, style_model

    name = style_model(rank)
    if name is not None:
        try:
            check_style_model(name)
        except ValueError as e:  # ModelError is one
            raise APIError(400, str(e), "rank") from None


@router.post("/api/write", response_model=P.WriteResponse | P.NovelResponse, response_model_exclude_none=True, responses=SSE)
async def write(body: P.WriteRequestBody, http: HTTPRequest):
    """A writing task (GET /api/tasks lists them). Non-streamed, the answer carries what `llmos
    write --json` adds: form checks, the ranking, a rewrite's revision, a brainstorm's ideas.
    Both carry `prompt`, what the candidates were written from (chat messages or a text), for
    POST /api/preferences. Streamed: {"index", "text", "finish_reason", "logprob"} events, then
    one {"result": ...} with those additions. The novel task writes its stages into a book folder."""
    from llmos.writing import forms
    from llmos.writing.results import after_generation
    from llmos.writing.tasks import TaskError, pick_language, prepare_write

    st = state(http)
    if st.remote(body.model):
        raise APIError(400, "writing tasks run on a local model here; use the OpenAI endpoints for remote ones", "model")
    try:
        language = pick_language(body.brief, body.lang, body.form)
    except TaskError as e:
        raise APIError(400, str(e), "lang") from None
    served = await st.local(http, body.model, language=language)
    if body.task == "novel":
        return await _novel(served, body, language, http)
    llm = served.llm
    _check_style(body.rank)
    st.check_max_tokens(body.max_tokens)

    copying = await asyncio.to_thread(st.copying_for, served) if body.check_copying else None

    def make():
        prompt, params, stops, form = prepare_write(llm, _write_request(body, language))
        return prompt, form, llm.request(prompt, params, body.n, stops, banned_strings=body.banned_strings,
                                         banned_regex=body.banned_regex)

    try:
        prompt, form, req = await asyncio.to_thread(make)  # a long brief takes a while to tokenize
    except (TaskError, forms.FormError) as e:
        raise APIError(400, str(e), "task" if "task" in str(e) else "form") from None
    except ValueError as e:
        raise APIError(400, str(e), param_of(str(e))) from None
    await submit(served, req, st.request_timeout)

    def extras() -> dict:
        result = llm.result(prompt, req)
        extra = after_generation(body.task, body.brief, body.variables, result.completions, form, body.rank, copying)
        safety = [c.safety for c in result.completions]
        if any(v and v.get("findings") for v in safety):
            extra["safety"] = safety
        return extra

    if body.stream:
        def chunk(e):
            if e.finish_reason is None and not e.text and e.logprob is None:
                return None
            return sse({"index": e.index, "text": e.text, "finish_reason": e.finish_reason and P.finish_reason(e.finish_reason),
                        "logprob": P.chat_logprobs(llm.tokenizer, [e.logprob])[0] if e.logprob else None})

        def tail():
            yield sse({"result": {"prompt": prompt, **extras()}})

        return event_stream(req, http, chunk, tail=tail, on_end=lambda: st.ended(req, llm))
    reasons = await finish(req, http)
    st.ended(req, llm)
    extra = extras()
    copied, safety = extra.pop("copying", None), extra.pop("safety", None)
    out = []
    for i, seq in enumerate(req.sequences):
        item = {"index": i, "text": req.hook.texts[i], "finish_reason": P.finish_reason(reasons.get(i))}
        if form is not None:
            item["form_problems"] = extra["form"]["problems"][i]
        if body.logprobs is not None:
            item["logprobs"] = P.chat_logprobs(llm.tokenizer, seq.logprobs)
        if safety and safety[i] and safety[i].get("findings"):
            item["safety"] = safety[i]
        if copied is not None:
            item["copying"] = copied[i]
        out.append(item)
    return {"task": body.task, "model": served.name, "prompt": prompt, "candidates": out, "usage": P.usage(req),
            **extra}


async def _novel(served, body: P.WriteRequestBody, language: str, http: HTTPRequest):
    """brief -> premise -> outline -> chapter plans -> chapters, each stage a file in
    $LLMOS_HOME/books/BOOK (an existing book continues from its first missing stage)."""
    from llmos.settings import books_dir
    from llmos.writing.novel import Novel, NovelError

    if not body.book or not BOOK_NAME.match(body.book):
        raise APIError(400, "the novel task needs book: a name for its folder (letters, digits, '-', '_', '.')", "book")
    folder = books_dir() / body.book
    try:
        book = Novel(served.llm, folder, body.brief, body.chapters, language, body.seed)
    except (NovelError, ValueError) as e:
        raise APIError(400, str(e), "brief") from None

    def stage_json(stage) -> dict:
        return {"name": stage.what, "path": str(stage.path.relative_to(folder)), "generated": stage.generated,
                "text": stage.path.read_text(encoding="utf-8")}

    if body.stream:
        async def events():
            try:
                async for stage in in_thread(book.stages, http):
                    yield sse({"stage": stage_json(stage)})
                yield DONE
            except QueueFull:
                yield sse(P.error_body(BUSY, kind="rate_limit_error"))
            except (NovelError, ValueError, RuntimeError) as e:
                yield sse(P.error_body(str(e)))

        return StreamingResponse(events(), media_type="text/event-stream")
    try:
        stages = [stage_json(s) async for s in in_thread(book.stages, http)]
    except QueueFull:
        raise APIError(429, BUSY, kind="rate_limit_error", headers={"Retry-After": "1"}) from None
    except (NovelError, ValueError) as e:
        raise APIError(400, str(e)) from None
    return {"book": body.book, "folder": str(folder), "stages": stages}


STORY_EVENTS = {200: {"content": {"text/event-stream": {"schema": {
    "type": "string", "description": 'data: {"context": [{"kind", "tokens", "reason", "text"}], "prompt", "model"}, '
                                     'then per token data: {"text", "token", "logprob", "top": [[text, logprob]], '
                                     '"finish_reason"}, then data: [DONE]'}}}}}


@router.post("/api/story/continue", responses=STORY_EVENTS, response_class=StreamingResponse)
async def story_continue(body: P.StoryContinueBody, http: HTTPRequest):
    """Server-sent events: first {"context": [...], "prompt", "model"} (what is sent, why, and to
    which model), then one event per token {"text", "token", "logprob", "top": [[text, logprob],
    ...]}, then [DONE]."""
    from llmos.writing.lorebook import LorebookError, entry_from_dict
    from llmos.writing.story import Story, StoryError, assemble_context

    st = state(http)
    try:
        lore = [entry_from_dict(e, f"lorebook[{i}]") for i, e in enumerate(body.lorebook)]
    except LorebookError as e:
        raise APIError(400, str(e), "lorebook") from None
    story = Story(text=body.text, memory=body.memory, authors_note=body.authors_note,
                  authors_note_depth=body.authors_note_depth, lore_budget=body.lore_budget, lorebook=lore)
    served = await st.local(http, None, body.text, body.memory)
    llm = served.llm
    st.check_max_tokens(body.max_tokens)
    try:
        prompt, parts = await asyncio.to_thread(assemble_context, story, llm.tokenizer, served.scheduler.max_len,
                                                body.max_tokens)
        params = llm.sampling(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                              xtc_threshold=body.xtc_threshold, xtc_probability=body.xtc_probability,
                              seed=body.seed, logprobs=body.logprobs)
    except (StoryError, ValueError) as e:
        raise APIError(400, str(e), param_of(str(e))) from None
    try:
        req = llm.request(prompt, params, empty_ok=True, banned_strings=body.banned_strings)
    except ValueError as e:  # a block rule of the safety policy
        raise APIError(400, str(e), "text") from None
    await submit(served, req, st.request_timeout)
    tok = llm.tokenizer
    head = [sse({"context": [{"kind": p.kind, "tokens": p.tokens, "reason": p.reason, "text": p.text} for p in parts],
                 "prompt": prompt, "model": served.name})]

    def chunk(e):
        if e.finish_reason is None and e.token in req.params.stop_token_ids:
            return None
        if e.finish_reason is None and not e.text and e.logprob is None:
            return None
        item = {"text": e.text, "finish_reason": e.finish_reason and P.finish_reason(e.finish_reason)}
        if e.logprob is not None and e.finish_reason is None:
            item.update(token=e.logprob.token, logprob=e.logprob.logprob,
                        top=[[tok.token_text(t), v] for t, v in e.logprob.top])
        return sse(item)

    return event_stream(req, http, chunk, head=head, on_end=lambda: st.ended(req, llm))


@router.post("/api/explain", response_model=P.ExplainResponse)
async def explain(body: P.ExplainBody, http: HTTPRequest):
    """For each completion token (or those in `indices`): its probability and the prompt parts it
    leaned on most, by gradient x input on a float copy of the model — an approximation of
    influence, not a cause (docs/writing.md, Explanations). One explanation runs at a time."""
    from llmos.explain import explain_tokens

    st = state(http)
    if st.remote(body.model):
        raise APIError(400, "explanations need the model's weights on this machine, not a remote model", "model")
    served = await st.local(http, body.model, body.prompt)
    try:
        atts = await asyncio.to_thread(explain_tokens, served.llm, body.prompt, body.completion, unit=body.unit,
                                       top=body.top, indices=body.indices)
    except ValueError as e:  # ExplainError is one
        raise APIError(400, str(e), param_of(str(e)) or "completion") from None
    return {"model": served.name, "method": "grad_x_input", "attributions": [a.as_dict() for a in atts]}


@router.post("/api/check-poem", response_model=P.CheckPoemResponse)
def check_poem(body: P.CheckPoemBody):
    """Which lines of a poem break which rule of its form (`llmos check-poem`): tones, rhyme,
    line lengths, refrains. The form is told from the poem's shape unless named."""
    from llmos.writing import forms

    variables = {**body.variables, **{k: v for k, v in {"tones": body.tones, "book": body.book}.items() if v}}
    try:
        return forms.check_poem(body.text, body.form, variables)
    except forms.FormError as e:
        raise APIError(400, str(e), "form" if "form" in str(e) else "variables") from None


@router.get("/api/tasks", response_model=P.TasksResponse)
def tasks():
    """The writing tasks (`llmos tasks`) and the forms kept by constrained decoding (`llmos forms`)."""
    from llmos.writing import list_tasks
    from llmos.writing.forms import FORMS

    return {"tasks": {k: {"description": t.description, "variables": t.variables, "languages": list(t.prompts)}
                      for k, t in list_tasks().items()},
            "forms": {k: {"kind": f.kind, "description": f.description} for k, f in FORMS.items()}}
