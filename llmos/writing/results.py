"""What some tasks add to their candidates once generation ends: form checks, a ranking, a
rewrite's revision and word diff, a brainstorm's distinct ideas.

`after_generation` returns plain JSON-ready data; `llmos write --json` prints it beside the
completions, and the CLI's human view is drawn from it.
"""

from __future__ import annotations

from functools import partial

from llmos.writing import forms
from llmos.writing.edit import distinct_ideas, parse_revision, word_diff
from llmos.writing.rank import rank as rank_candidates, style_model, style_scores


def idea_limit(variables: dict) -> int:
    """How many ideas a brainstorm asks for (its `n` variable)."""
    return int(variables.get("n", 5))


def after_generation(task: str, brief: str, variables: dict, completions: list, form: forms.Form | None = None,
                     rank: bool | str = False, copying=None) -> dict:
    """completions: objects with .index, .text and .logprobs (llm.Completion); form: the form the
    text was kept to, if any. Returns only the keys that apply:
      form: {"name", "problems": one list of problems per candidate, empty when it keeps the form}
      ranking: [{"index", "score", and the score's parts}], best first (rank=True, or "style:MODEL"
               to add each candidate's closeness to the style MODEL learned)
      revision: {"revised", "suggestions", "diff": [(op, words)] with op "-", "+" or " "} (task rewrite)
      ideas: distinct ideas, at most idea_limit(variables) (task brainstorm)
      copying: one llmos.data.copying report per candidate (copying: the CopyIndex to check against)"""
    extra: dict = {}
    check = None  # text -> problems, when a form was asked for
    if form is not None:
        check = partial(forms.check, form, variables=variables)
        extra["form"] = {"name": form.name, "problems": [check(c.text) for c in completions]}
    if rank:
        style_of = style_model(rank)
        style = style_scores(style_of, [c.text for c in completions]) if style_of else None
        extra["ranking"] = [{"index": r.index, "score": round(r.score, 4), **{k: round(v, 4) for k, v in r.parts.items()}}
                            for r in rank_candidates(completions, check, style)]
    if task == "rewrite":
        revised, suggestions = parse_revision(completions[0].text)
        extra["revision"] = {"revised": revised, "suggestions": suggestions, "diff": word_diff(brief.strip(), revised)}
    if task == "brainstorm":
        extra["ideas"] = distinct_ideas([c.text for c in completions], idea_limit(variables))
    if copying is not None:
        from llmos.data.copying import check_copying

        extra["copying"] = [check_copying(c.text, copying).as_dict() for c in completions]
    return extra
