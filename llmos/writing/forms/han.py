"""Chinese classical forms: 绝句 and 律诗 of 5 or 7 characters a line, and 藏头诗.

A poem is lines of exactly 5 or 7 Han characters, each ending in a punctuation mark, lines
separated by newlines. The machine counts characters inside multi-character tokens and follows
characters split across byte pieces. Rhyme uses pinyin finals.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from llmos.writing.forms.base import Form, FormConstraint, FormError, flag
from llmos.writing.tokens import TokenTable, utf8_length

HAN_PUNCT = "，。！？；、"
LINE_END = "，。！？；"


def is_han(ch: str) -> bool:
    o = ord(ch)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F


def han_final(ch: str) -> str:
    """The pinyin final of a character (its rhyme), e.g. 霜 -> 'uang'."""
    from pypinyin import Style, lazy_pinyin

    final = lazy_pinyin(ch, style=Style.FINALS, strict=False)[0]
    # finals that rhyme in modern usage share a group
    groups = {"ie": "e", "ve": "e", "ue": "e", "uo": "o", "ian": "an", "uan": "an", "van": "an",
              "iang": "ang", "uang": "ang", "ia": "a", "ua": "a", "iao": "ao", "iong": "ong",
              "ing": "eng", "in": "en", "un": "en", "vn": "en", "ui": "ei", "iu": "ou"}
    return groups.get(final, final)



@dataclass(frozen=True)
class HanForm(Form):
    lines: int = 0  # 0: one line per character of the acrostic
    chars: int = 0
    rhyme: tuple = ()  # line groups that rhyme, e.g. ((1, 3),)
    acrostic: bool = False  # needs --var acrostic=...

    def options(self, variables: dict) -> dict:
        acrostic, chars = variables.get("acrostic"), variables.get("chars")
        lines, n_chars = self.lines, int(chars) if chars else self.chars
        if self.acrostic:
            if not acrostic:
                raise FormError(f"form {self.name} needs --var acrostic=... (the characters that begin the lines)")
            acrostic = "".join(c for c in acrostic if not c.isspace())
            if not all(is_han(c) for c in acrostic):
                raise FormError(f"{self.name} takes Han characters, e.g. --var acrostic=春夏秋冬")
            lines = len(acrostic)
        elif acrostic:
            if len(acrostic) > self.lines:
                raise FormError(f"the acrostic has {len(acrostic)} characters but {self.name} has {self.lines} lines")
            if not all(is_han(c) for c in acrostic):
                raise FormError("an acrostic for a Chinese form takes Han characters")
        if n_chars not in (5, 7):
            raise FormError(f"Chinese lines have 5 or 7 characters, not {n_chars}")
        use_rhyme = flag(variables.get("rhyme"))
        groups = tuple(g for g in self.rhyme if max(g) < lines) if use_rhyme is not False else ()
        return dict(lines=lines, chars=n_chars, acrostic=acrostic or "", rhyme=groups)

    def check(self, text: str, options: dict) -> list[str]:
        lines = text.strip("\n").split("\n")
        o = options
        problems = [] if len(lines) == o["lines"] else [f"{len(lines)} lines, expected {o['lines']}"]
        finals = []
        for i, line in enumerate(lines[: o["lines"]]):
            body, end = line[:-1], line[-1:]
            if end not in LINE_END:
                problems.append(f"line {i + 1} does not end with punctuation")
            if len(body) != o["chars"] or not all(is_han(c) for c in body):
                problems.append(f"line {i + 1} is not {o['chars']} Han characters: {line!r}")
            if o["acrostic"] and i < len(o["acrostic"]) and body[:1] != o["acrostic"][i]:
                problems.append(f"line {i + 1} does not start with {o['acrostic'][i]}")
            finals.append(han_final(body[-1]) if body else None)
        for group in o["rhyme"]:
            keys = {finals[i] for i in group if i < len(finals)}
            if len(keys) != 1 or None in keys:
                problems.append(f"lines {', '.join(str(i + 1) for i in group)} do not rhyme")
        return problems

    def constraint(self, table, vocab_size: int, options: dict):
        return HanPoem(table, vocab_size, **options)


FORMS = [
    HanForm("五言绝句", "han", "4 lines of 5 characters", lines=4, chars=5, rhyme=((1, 3),), max_tokens=96),
    HanForm("七言绝句", "han", "4 lines of 7 characters", lines=4, chars=7, rhyme=((1, 3),), max_tokens=128),
    HanForm("五言律诗", "han", "8 lines of 5 characters", lines=8, chars=5, rhyme=((1, 3, 5, 7),), max_tokens=192),
    HanForm("七言律诗", "han", "8 lines of 7 characters", lines=8, chars=7, rhyme=((1, 3, 5, 7),), max_tokens=256),
    HanForm("藏头诗", "han", "acrostic: each line starts with the next character of --var acrostic (7 per line; --var chars=5)",
            chars=7, acrostic=True, max_tokens=256),
]


@lru_cache(maxsize=1)
def _han_by_final() -> dict[str, frozenset]:
    """Every BMP Han character grouped by its (rhyme-group) pinyin final."""
    groups: dict[str, set] = {}
    for o in list(range(0x4E00, 0xA000)) + list(range(0x3400, 0x4DC0)):
        groups.setdefault(han_final(chr(o)), set()).add(chr(o))
    return {k: frozenset(v) for k, v in groups.items()}


def _han_index(table: TokenTable) -> dict:
    """Per vocabulary, once: tokens of whole Han characters as tensors (count, first character,
    final of the last character), and the few other tokens a poem can use (punctuation,
    newlines, mixtures, byte pieces of characters), which are checked one by one."""
    # kept on the table itself: a cache keyed by id(table) would hand a new table the index
    # of a dead one that happened to have the same id
    index = getattr(table, "_han_index", None)
    if index is None:
        pure, count, first, last, other = [], [], [], [], []
        finals: dict[str, int] = {}
        for i, p in enumerate(table.pieces):
            if p is None or not (p.text or p.head or p.tail):
                continue
            if not all(is_han(c) or c in LINE_END or c == "\n" for c in p.text):
                continue
            if not p.head and not p.tail and p.text and all(is_han(c) for c in p.text):
                pure.append(i)
                count.append(len(p.text))
                first.append(ord(p.text[0]))
                last.append(finals.setdefault(han_final(p.text[-1]), len(finals)))
            else:
                other.append((i, p))
        index = {"pure_ids": torch.tensor(pure, dtype=torch.long), "count": torch.tensor(count),
                 "first": torch.tensor(first), "last_final": torch.tensor(last), "finals": finals, "other": other}
        table._han_index = index
    return index


class HanPoem(FormConstraint):
    """State: (line, characters in the line, phase, pending bytes, rhyme final).
    phase: 0 writing the line, 1 punctuation written (a newline must follow), 2 done."""

    def __init__(self, table: TokenTable, vocab_size: int, lines: int, chars: int, acrostic: str = "",
                 rhyme: tuple = (), **_):
        super().__init__(table, vocab_size)
        self.lines, self.chars, self.acrostic = lines, chars, acrostic
        self.rhyme_lines = {i for g in rhyme for i in g[1:]}  # lines that rhyme with the group's first
        self.rhyme_first = {g[0] for g in rhyme}
        self.index = _han_index(table)
        self._prefixes: dict = {}

    def start(self):
        return (0, 0, 0, b"", None)

    def finished(self, state) -> bool:
        return state[2] == 2

    def _choices(self, line: int, pos: int, final) -> frozenset | None:
        """The characters allowed at (line, pos): None means any Han character."""
        if pos == 0 and line < len(self.acrostic):
            return frozenset(self.acrostic[line])
        if pos == self.chars - 1 and line in self.rhyme_lines and final is not None:
            return _han_by_final().get(final, frozenset())
        return None

    def _step(self, state, ch: str):
        line, pos, phase, _, final = state
        if phase == 0:
            if ch in LINE_END:
                return (line, pos, 2 if line == self.lines - 1 else 1, b"", final) if pos == self.chars else None
            choices = self._choices(line, pos, final)
            if pos >= self.chars or not is_han(ch) or (choices is not None and ch not in choices):
                return None
            if pos == self.chars - 1 and line in self.rhyme_first and final is None:
                final = han_final(ch)
            return (line, pos + 1, 0, b"", final)
        if phase == 1 and ch == "\n":
            return (line + 1, 0, 0, b"", final)
        return None

    def _prefix_ok(self, state, tail: bytes) -> bool:
        """Can the unfinished character `tail` still become an acceptable character here (a Han
        character inside a line, a punctuation mark at its end)?"""
        line, pos, phase, _, final = state
        if phase != 0:
            return False
        if pos == self.chars:
            key, chars = "punct", LINE_END
        else:
            choices = self._choices(line, pos, final)
            key = choices if choices is not None else "any"
            chars = choices if choices is not None else (chr(o) for o in range(0x3400, 0xA000) if is_han(chr(o)))
        if key not in self._prefixes:
            self._prefixes[key] = {c.encode()[:k] for c in chars for k in range(1, len(c.encode()))}
        return tail in self._prefixes[key]

    def step_piece(self, state, piece):
        """The state after a token's bytes, or None if they break the form."""
        pending = state[3]
        if pending:
            got = pending + piece.head
            if len(got) < utf8_length(pending[0]):  # one more byte of the same character
                if piece.text or piece.tail or not self._prefix_ok(state, got):
                    return None
                return (*state[:3], got, state[4])
            if len(got) > utf8_length(pending[0]):
                return None
            try:
                ch = got.decode("utf-8")
            except UnicodeDecodeError:
                return None
            state = self._step(state, ch)
        elif piece.head:
            return None
        for ch in piece.text:
            if state is None:
                return None
            state = self._step(state, ch)
        if state is not None and piece.tail:
            state = (*state[:3], piece.tail, state[4]) if self._prefix_ok(state, piece.tail) else None
        return state

    def allowed(self, state):
        line, pos, phase, pending, final = state
        idx = self.index
        out = []
        if phase == 0 and not pending and len(idx["pure_ids"]):
            # tokens of whole Han characters, vectorised: they fit the rest of the line, begin
            # with the acrostic character, and end on a rhyming character where one is due
            ok = idx["count"] <= self.chars - pos
            if pos == 0 and line < len(self.acrostic):
                ok &= idx["first"] == ord(self.acrostic[line])
            if line in self.rhyme_lines and final is not None:
                ok &= (idx["count"] + pos < self.chars) | (idx["last_final"] == idx["finals"].get(final, -2))
            out = idx["pure_ids"][ok].tolist()
        return out + [i for i, p in idx["other"] if self.step_piece(state, p) is not None]

    def advance(self, state, token: int):
        piece = self.table.pieces[token] if token < len(self.table.pieces) else None
        new = self.step_piece(state, piece) if piece is not None else None
        if new is None:
            raise FormError(f"token {token} breaks the form at state {state}")
        return new


