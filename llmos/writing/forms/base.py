"""What every form shares: the Form record, its error, and the plumbing of the token machines."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class FormError(ValueError):
    pass


def flag(value) -> bool | None:
    """A --var switch: True/False as given, "true"/"yes"/"on"/"1" as True, None when absent."""
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Form:
    """A form by name. Subclasses add the shape and implement the three operations:
    options (the --var values it reads, checked), check (problems with a finished text) and
    constraint (the token machine that keeps the form while the model writes)."""

    name: str
    kind: str  # "han" | "ci" | "verse" | "limit"
    description: str
    max_tokens: int = 256  # enough tokens for the machine to finish the form

    def options(self, variables: dict) -> dict:
        return {}

    def check(self, text: str, options: dict) -> list[Problem]:
        raise NotImplementedError

    def token_budget(self, options: dict) -> int:
        """Tokens enough for the machine to finish this instance of the form."""
        return self.max_tokens

    def constraint(self, table, vocab_size: int, options: dict):
        raise NotImplementedError


class FormConstraint:
    """Shared plumbing: masks cached per state, stop tokens once the form is complete.
    A machine implements start(), finished(state), allowed(state) -> token ids and
    advance(state, token) -> the next state (FormError if the token breaks the form)."""

    def __init__(self, table, vocab_size: int):
        self.table, self.vocab_size = table, vocab_size
        self.stop_ids = table.stop_ids
        self._masks: dict = {}

    def mask(self, state) -> torch.Tensor:
        m = self._masks.get(state)
        if m is None:
            m = torch.zeros(self.vocab_size, dtype=torch.bool)
            allowed = self.stop_ids if self.finished(state) else self.allowed(state)
            if not allowed:  # cannot happen for the forms here; end rather than emit garbage
                allowed = self.stop_ids
            m[list(allowed)] = True
            self._masks[state] = m
        return m


class Problem(str):
    """One broken rule, as a message; `line` (1-based, None for the whole text) and `rule` say
    where and which, for reports that point at lines (llmos check-poem, the API)."""

    line: int | None
    rule: str

    def __new__(cls, message: str, line: int | None = None, rule: str = ""):
        p = super().__new__(cls, message)
        p.line, p.rule = line, rule
        return p

    def as_dict(self) -> dict:
        return {"line": self.line, "rule": self.rule, "message": str(self)}
