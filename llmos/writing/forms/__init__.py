"""Poetic forms and length limits, guaranteed by constrained decoding.

Each form has two independent halves:

- a checker, `check(form, text, **variables) -> list of problems`, which reads finished text:
  what benchmarks, tests and `llmos check-poem` use to decide whether a form was kept;
- a token-level state machine (a constraint for the engine, `make_constraint`) which, at every
  step, masks the tokens that would break the form, so that whatever the model samples keeps it.

The forms live by family: `han` (Chinese regulated verse), `verse` (English), `limit` (length
caps). Variables are the `--var` values of `llmos write`; each form reads the ones it knows
(acrostic, rhyme, chars, ...) and ignores the rest.
"""

from __future__ import annotations

from llmos.writing.forms import han, limit, verse
from llmos.writing.forms.base import Form, FormConstraint, FormError, Problem
from llmos.writing.forms.han import HAN_PUNCT, LINE_END, HanPoem, is_han
from llmos.writing.forms.limit import Limit
from llmos.writing.forms.verse import Verse, count_syllables, is_word, rhyme_key

FORMS: dict[str, Form] = {f.name: f for f in han.FORMS + verse.FORMS + limit.FORMS}

__all__ = ["FORMS", "Form", "FormConstraint", "FormError", "Problem", "HAN_PUNCT", "LINE_END", "HanPoem", "Limit", "Verse",
           "check", "count_syllables", "form_options", "get_form", "is_han", "is_word",
           "make_constraint", "rhyme_key"]


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise FormError(f"unknown form {name!r}; forms: {', '.join(FORMS)}")
    return FORMS[name]


def form_options(form: Form, variables: dict | None = None, **more) -> dict:
    """The concrete shape the variables give (number of lines, rhyme groups, ...), checked:
    a FormError says which variable is wrong and how to put it right."""
    given = {k: v for k, v in {**(variables or {}), **more}.items() if v is not None}
    return form.options(given)


def check(form: Form, text: str, variables: dict | None = None, **more) -> list[Problem]:
    """Problems with `text` as an instance of `form`; an empty list means it keeps the form."""
    return form.check(text, form_options(form, variables, **more))


def make_constraint(form: Form, table, vocab_size: int, variables: dict | None = None, **more):
    """The token-level machine for `form` over a vocabulary (a writing.tokens.TokenTable)."""
    return form.constraint(table, vocab_size, form_options(form, variables, **more))


# --- a user's own poem -----------------------------------------------------------------------

REGULATED = {(4, 5): "五言绝句", (4, 7): "七言绝句", (8, 5): "五言律诗", (8, 7): "七言律诗"}
ENGLISH_BY_LINES = {3: "haiku", 5: "limerick", 14: "sonnet", 19: "villanelle", 39: "sestina"}


def detect_form(text: str) -> Form:
    """The form a poem is most likely meant to be, from its shape: regulated verse by lines and
    characters, a 词 by its tune's character count, English forms by line count."""
    han_chars = sum(is_han(c) for c in text)
    if han_chars and han_chars >= len(text.strip()) / 2:
        lines = han.split_lines(text)
        widths = {len([c for c in line if is_han(c)]) for line in lines}
        if len(widths) == 1 and (len(lines), widths.pop()) in REGULATED:
            return FORMS[REGULATED[len(lines), len([c for c in lines[0] if is_han(c)])]]
        for name, spec in han.tunes().items():
            if han_chars == sum(len(x["tones"]) for x in spec["lines"]):
                return FORMS[f"词:{name}"]
        raise FormError(f"cannot tell the form of a poem of {len(lines)} lines and {han_chars} characters; "
                        f"name it with --form (see `llmos forms`)")
    lines = [line for line in text.strip().split("\n") if line.strip()]
    name = ENGLISH_BY_LINES.get(len(lines))
    if name is None or name not in FORMS:
        raise FormError(f"cannot tell the form of a poem of {len(lines)} lines; name it with --form (see `llmos forms`)")
    return FORMS[name]


def check_poem(text: str, form: str | None = None, variables: dict | None = None) -> dict:
    """What `llmos check-poem` and POST /api/check-poem report: the form (named or detected)
    and every broken rule, each with its line."""
    if not text.strip():
        raise FormError("the poem is empty")
    f = get_form(form) if form else detect_form(text)
    problems = check(f, text, variables)
    return {"form": f.name, "ok": not problems,
            "problems": [p.as_dict() for p in problems]}
