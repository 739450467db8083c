"""Length limits: at most so many words and/or characters (slogans, titles, posts)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llmos.writing.forms.base import Form, FormConstraint, FormError, Problem
from llmos.writing.tokens import TokenTable


@dataclass(frozen=True)
class LimitForm(Form):
    max_words: int = 0
    max_chars: int = 0

    def check(self, text: str, options: dict) -> list[Problem]:
        text = text.strip("\n")
        problems = []
        if self.max_words and not 1 <= len(text.split()) <= self.max_words:
            problems.append(Problem(f"{len(text.split())} words (1-{self.max_words} allowed)", None, "words"))
        if self.max_chars and not 1 <= len(text) <= self.max_chars:
            problems.append(Problem(f"{len(text)} characters (1-{self.max_chars} allowed)", None, "characters"))
        if self.max_words and "\n" in text:
            problems.append(Problem("more than one line", None, "lines"))
        return problems

    def constraint(self, table, vocab_size: int, options: dict):
        return Limit(table, vocab_size, self.max_words, self.max_chars)


FORMS = [
    LimitForm("slogan", "limit", "one line, at most 12 words (100 characters)", max_words=12, max_chars=100, max_tokens=48),
    LimitForm("title", "limit", "one line, at most 10 words (80 characters)", max_words=10, max_chars=80, max_tokens=40),
    LimitForm("tweet", "limit", "at most 280 characters", max_chars=280, max_tokens=160),
]


class Limit(FormConstraint):
    """At most max_words words and/or max_chars characters; one line when words are limited.
    State: (words, characters, inside a word)."""

    def __init__(self, table: TokenTable, vocab_size: int, max_words: int = 0, max_chars: int = 0):
        super().__init__(table, vocab_size)
        self.max_words, self.max_chars = max_words, max_chars
        ids, length, starts, lead, trail_inside, blank = [], [], [], [], [], []
        for i, p in enumerate(table.pieces):
            if p is None or not p.text or p.head or p.tail or (max_words and "\n" in p.text):
                continue
            t = p.text
            ids.append(i)
            length.append(len(t))
            starts.append(len(re.findall(r"(?:^|\s)\S", t)))  # words beginning in the token
            lead.append(not t[0].isspace())  # continues a word in progress
            trail_inside.append(not t[-1].isspace())
            blank.append(not t.strip())
        self.ids = torch.tensor(ids)
        self.length, self.starts = torch.tensor(length), torch.tensor(starts)
        self.lead, self.trail, self.blank = torch.tensor(lead), torch.tensor(trail_inside), torch.tensor(blank)
        self.index = {t: j for j, t in enumerate(ids)}

    def start(self):
        return (0, 0, False)

    def finished(self, state) -> bool:
        return False

    def allowed(self, state):
        words, chars, inside = state
        new_words = words + self.starts - (self.lead & inside).long()
        ok = torch.ones(len(self.ids), dtype=torch.bool)
        if self.max_words:
            ok &= new_words <= self.max_words
        if self.max_chars:
            ok &= chars + self.length <= self.max_chars
        if words == 0:
            ok &= ~self.blank  # begin with a word
        return self.ids[ok].tolist() + (self.stop_ids if words > 0 else [])

    def advance(self, state, token: int):
        j = self.index.get(token)
        if j is None:
            raise FormError(f"token {token} breaks the limit")
        words, chars, inside = state
        words = words + int(self.starts[j]) - int(bool(self.lead[j]) and inside)
        return (words, chars + int(self.length[j]), bool(self.trail[j]))


