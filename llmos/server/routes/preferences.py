"""Preference pairs from the studio: the task candidate a writer inserted, the ones they marked
good and bad, the story branch they went on from. Stored in the same table as `llmos prefs`
reads (data/prefs.py), listed and counted as it does."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request as HTTPRequest

from llmos.server import protocol as P
from llmos.server.errors import APIError
from llmos.server.state import state

router = APIRouter(tags=["Preferences"])

RATINGS = (-1, 1, 2, 3, 4, 5)  # thumbs down/up, or 1-5 stars


def check_choice(body: P.PreferenceChoice):
    """A 400 naming what is wrong, for what the schema cannot say: counts, ranges, a choice that
    prefers nothing."""
    n = len(body.candidates)
    if n < 2:
        raise APIError(400, f"candidates: a choice needs two candidates or more, got {n}", "candidates")
    for i, text in enumerate(body.candidates):
        if not text.strip():
            raise APIError(400, f"candidates[{i}] is empty; every candidate needs its text", "candidates")
    if body.kept is not None and not 0 <= body.kept < n:
        raise APIError(400, f"kept: {body.kept} is not one of the {n} candidates (0 to {n - 1})", "kept")
    given = []
    if body.ratings is not None:
        if len(body.ratings) != n:
            raise APIError(400, f"ratings: {len(body.ratings)} ratings for {n} candidates; give one per candidate "
                                "(null: not rated)", "ratings")
        given = [r for r in body.ratings if r is not None]
        bad = [r for r in given if r not in RATINGS]
        if bad:
            raise APIError(400, f"ratings: {bad[0]} is not a rating; use -1 and 1 (thumbs down, up) or 1 to 5",
                           "ratings")
        if -1 in given and any(r > 1 for r in given):
            raise APIError(400, "ratings: thumbs (-1, 1) and 1-5 mixed in one choice; use one scale", "ratings")
    if body.kept is None and len(set(given)) < 2:
        raise APIError(400, "kept: nothing is preferred; give kept (the candidate the writer kept) or ratings "
                            "with two different values", "kept")


@router.post("/api/preferences", response_model=P.PreferencesAdded)
def add_choice(body: P.PreferenceChoice, http: HTTPRequest):
    """Store the pairs one choice gives: the kept candidate over each other, each rated candidate
    over each rated lower (never two identical texts); a pair already stored is skipped."""
    from llmos.data.prefs import Preferences, PrefsError, check_prompt, choice_pairs

    try:
        prompt = check_prompt(body.prompt, "prompt")
    except PrefsError as e:
        raise APIError(400, str(e), "prompt") from None
    check_choice(body)
    added = Preferences(state(http).store).record_choice(
        prompt, body.candidates, kept=body.kept, ratings=body.ratings, source=body.source, model=body.model or "",
        meta=body.meta)
    return {"added": added, "pairs": len(choice_pairs(body.candidates, body.kept, body.ratings))}


def _check_source(source: str | None):
    from llmos.data.prefs import SOURCES

    if source is not None and source not in SOURCES:
        raise APIError(400, f"source: unknown source {source!r}; sources: {', '.join(SOURCES)}", "source")


@router.get("/api/preferences", response_model=P.PreferencePairs)
def list_pairs(http: HTTPRequest, source: str | None = None, model: str | None = None,
               limit: int | None = Query(None, ge=1, le=2**63 - 1)):
    """The pairs stored, oldest first (`llmos prefs list --json`)."""
    from llmos.data.prefs import Preferences

    _check_source(source)
    return {"pairs": [p.as_dict() for p in Preferences(state(http).store).list(source, limit, model)]}


@router.get("/api/preferences/stats", response_model=P.PreferenceStats)
def pair_stats(http: HTTPRequest):
    """Per source: pairs, distinct prompts, mean lengths in characters, first and last (`llmos prefs stats`)."""
    from llmos.data.prefs import Preferences

    return {"sources": Preferences(state(http).store).stats()}
