"""Chinese classical forms: regulated verse (绝句 and 律诗), 藏头诗, and 词 to a named tune.

A poem is lines of Han characters, each ending in a punctuation mark, lines separated by
newlines. The machine counts characters inside multi-character tokens and follows characters
split across byte pieces, and keeps three things at once:

- 平仄: every line follows a tonal pattern. Regulated verse has four templates (平起 / 仄起, the
  first line rhymed or not), whose lines follow from the first by 对 and 粘; `tones=strict`
  grants the usual licence (一三五不论) only where it makes neither 孤平 nor 三平尾, and accepts
  the two standard 拗救 lines (仄平平仄平, 平平仄平仄); `loose` checks the 2nd, 4th, 6th and
  last characters only (二四六分明); `off` checks none. A 词 follows its tune's pattern
  (龙榆生《唐宋词格律》), where 中 marks a free position.
- rhyme: from a rhyme book (rhymebook.py): 平水韵 by default, 中华新韵 with `book=xinyun`;
  regulated verse rhymes on level-tone groups, a 词 by 词林正韵's sections, level or oblique
  as the tune says; no rhyme character twice in a poem (a tune's repeated line aside).
- the shape: characters per line, punctuation, the acrostic's first characters.

A character's tone is the rhyme book's: one with level and oblique readings (看, 思, 胜) fits
either; one the book lacks is not written where tones are kept.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch

from llmos.writing.forms import rhymebook
from llmos.writing.forms.base import Form, FormConstraint, FormError, Problem, flag
from llmos.writing.tokens import TokenTable, utf8_length

HAN_PUNCT = "，。！？；、"
LINE_END = "，。！？；"
TONE_MODES = ("strict", "loose", "off")
DATA = Path(__file__).parent / "data"


def is_han(ch: str) -> bool:
    o = ord(ch)
    return 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2FA1F


def split_lines(text: str) -> list[str]:
    """A poem's lines: each up to and including its punctuation mark, or up to a newline (a
    line someone left unpunctuated). A poem written on one line splits the same way."""
    return [s.strip() for s in re.findall(rf"[^{LINE_END}\n]*[{LINE_END}]|[^{LINE_END}\n]+", text) if s.strip()]


# --- tonal patterns --------------------------------------------------------------------------

# the four five-character lines; a seven-character line puts two characters of the opposite
# tone in front (平平 before 仄仄..., 仄仄 before 平平...)
FIVE = {"A": "仄仄平平仄", "B": "平平仄仄平", "C": "平平平仄仄", "D": "仄仄仄平平"}
FOLLOWS = {"A": "B", "B": "C", "C": "D", "D": "A"}  # 对 within a couplet, 粘 across couplets
STANDS_FOR = {"D": "A", "B": "C"}  # a rhymed first line replaces the unrhymed one of its template


def base_line(kind: str, chars: int) -> str:
    five = FIVE[kind]
    return five if chars == 5 else ("平平" if five[0] == "仄" else "仄仄") + five


def regulated_template(first: str, lines: int) -> list[str]:
    """Line kinds of a regulated poem whose first line is `first`: ABCD ABCD, DBCD ABCD, ..."""
    kinds, cur = [first], STANDS_FOR.get(first, first)
    for _ in range(lines - 1):
        cur = FOLLOWS[cur]
        kinds.append(cur)
    return kinds


def tone_faults(tones: str, base: str, mode: str, regulated: bool) -> list[tuple[int, str]]:
    """(0-based position, rule) for each way a line whose characters have `tones` (平/仄 each)
    breaks its pattern `base`; rule is "平", "仄" (the tone that position needs), "孤平" or "三平尾"."""
    if mode == "off":
        return []
    n = len(base)
    if not regulated:
        where = range(n) if mode == "strict" else sorted({*range(1, n, 2), n - 1})
        return [(i, base[i]) for i in where if base[i] != "中" and tones[i] != base[i]]
    # 平平仄平仄 (and its seven-character form): the standard exception to the 平平平仄仄 line
    exception = base[-5:] == "平平平仄仄" and tones[-4:] == "平仄平仄"
    # 仄仄平仄仄 (…平仄仄): an oblique 4th character in a 仄仄平平仄 line is a 拗 that the next
    # line may make up for (对句相救) with a level 3rd character: 平平平仄平
    ao = base[-5:] == "仄仄平平仄"
    faults = [(i, "拗" if ao and i == n - 2 else base[i]) for i in sorted({*range(1, n, 2), n - 1})
              if tones[i] != base[i] and not (exception and i in (n - 3, n - 2))]
    if mode == "strict":
        if base[-5:] == "平平仄仄平" and tones[-5] == "仄" and tones[-3] != "平":
            faults.append((n - 5, "孤平"))  # 仄平平仄平 makes up for it: the only cure allowed
        if base[-1] == "平" and tones[-3:] == "平平平":
            faults.append((n - 3, "三平尾"))
    return faults


@lru_cache(maxsize=None)
def line_patterns(base: str, mode: str, regulated: bool, rescue: bool = False) -> tuple[str, ...]:
    """Every tone string a line with pattern `base` may have under `mode`: what the machine
    keeps alive. `off` gives one pattern of "*" (any character). rescue: the strings with a 拗
    for the next line to make up for instead (see tone_faults)."""
    if mode == "off":
        return () if rescue else ("*" * len(base),)
    if not regulated and mode == "strict":
        return () if rescue else (base,)
    want = [(len(base) - 2, "拗")] if rescue else []
    return tuple("".join(s) for s in itertools.product("平仄", repeat=len(base))
                 if tone_faults("".join(s), base, mode, regulated) == want)


# --- 词 tunes --------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def tunes() -> dict:
    """The tunes in data/cipai.json: name -> {"source", "lines": [{"tones", "rhyme", "repeat"}]}."""
    return json.loads((DATA / "cipai.json").read_text(encoding="utf-8"))["tunes"]


# --- the forms -------------------------------------------------------------------------------


class Line(NamedTuple):
    chars: int
    base: str  # the pattern as printed: 平, 仄, 中 per character
    patterns: tuple  # the tone strings the line may take ("*" for any character)
    rhyme: tuple | None  # (rhyme sequence, "平" | "仄") when the line ends on a rhyme
    repeat: int = -1  # the line this one repeats word for word (a tune's 叠句)
    owing: int = 0  # the last `owing` patterns carry a 拗 the next line must make up for


@dataclass(frozen=True)
class ChineseForm(Form):
    """Regulated verse and 词 share the checker and the machine: their options differ."""

    def check(self, text: str, options: dict) -> list[Problem]:
        return check_han(text, options)

    def constraint(self, table, vocab_size: int, options: dict):
        return HanPoem(table, vocab_size, **options)


@dataclass(frozen=True)
class HanForm(ChineseForm):
    lines: int = 0  # 0: one line per character of the acrostic
    chars: int = 0
    acrostic: bool = False  # needs --var acrostic=...
    rhymed: bool = True
    tones: str = "strict"  # the default tone mode

    def options(self, variables: dict) -> dict:
        acrostic, chars = variables.get("acrostic"), variables.get("chars")
        lines = self.lines
        try:
            n_chars = int(chars) if chars else self.chars
        except ValueError:
            raise FormError(f"--var chars takes 5 or 7, not {chars!r}") from None
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
        tones, book = tone_options(variables, self.tones)
        rhymed = flag(variables.get("rhyme"))
        rhymed = self.rhymed if rhymed is None else rhymed
        templates = []
        for first in "ADCB":
            kinds = regulated_template(first, lines)
            rhyme_at = {i for i in range(1, lines, 2)} | ({0} if first in STANDS_FOR else set())
            shape = []
            for i, k in enumerate(kinds):
                base = base_line(k, n_chars)
                owing = line_patterns(base, tones, True, True) if i + 1 < lines else ()
                shape.append(Line(n_chars, base, line_patterns(base, tones, True) + owing,
                                  (0, "平") if rhymed and i in rhyme_at else None, owing=len(owing)))
            templates.append(tuple(shape))
        o = dict(templates=tuple(templates), acrostic=acrostic or "", tones=tones, book=book,
                 regulated=True, rhymes=1)
        _check_acrostic(self.name, o)
        return o

@dataclass(frozen=True)
class CiForm(ChineseForm):
    tune: str = ""

    def options(self, variables: dict) -> dict:
        tones, book = tone_options(variables, "strict")
        rhymed = flag(variables.get("rhyme")) is not False
        spec = tunes()[self.tune]
        ids: dict[str, int] = {}
        lines = []
        for line in spec["lines"]:
            base = line["tones"]
            rhyme = None
            if rhymed and line.get("rhyme"):
                rhyme = (ids.setdefault(line["rhyme"], len(ids)), "平" if base[-1] == "平" else "仄")
            lines.append(Line(len(base), base, line_patterns(base, tones, False), rhyme, line.get("repeat", -1)))
        acrostic = "".join(c for c in variables.get("acrostic") or "" if not c.isspace())
        if len(acrostic) > len(lines) or not all(is_han(c) for c in acrostic):
            raise FormError(f"an acrostic for {self.name} takes at most {len(lines)} Han characters")
        o = dict(templates=(tuple(lines),), acrostic=acrostic, tones=tones, book=book,
                 regulated=False, rhymes=max(len(ids), 1))
        _check_acrostic(self.name, o)
        return o

def tone_options(variables: dict, default: str) -> tuple[str, str]:
    tones = str(variables.get("tones") or default).lower()
    if tones not in TONE_MODES:
        raise FormError(f"--var tones takes {', '.join(TONE_MODES)}, not {tones!r}")
    book = str(variables.get("book") or "pingshui").lower()
    if book not in rhymebook.BOOKS:
        raise FormError(f"--var book takes {', '.join(f'{b} ({rhymebook.BOOK_NAMES[b]})' for b in rhymebook.BOOKS)}, "
                        f"not {book!r}")
    return tones, book


def _check_acrostic(name: str, o: dict):
    """An acrostic character must be able to open its line in some template."""
    if o["tones"] == "off":
        return
    for i, ch in enumerate(o["acrostic"]):
        tones = rhymebook.tones(ch, o["book"])
        if not tones:
            raise FormError(f"{name}: line {i + 1} must begin with {ch}, which {rhymebook.BOOK_NAMES[o['book']]} "
                            f"lacks, so its tone is unknown; choose another character or --var tones=off")
        bits = ("平" in tones) | ("仄" in tones) << 1
        if not any(NEED[p[0]] & bits for t in o["templates"] for p in t[i].patterns):
            raise FormError(f"{name}: line {i + 1} must begin with {ch} ({'/'.join(sorted(tones))}), but no tonal "
                            f"template opens that line with it under tones={o['tones']}; "
                            f"choose another character or --var tones=loose/off")


# --- the checker -----------------------------------------------------------------------------


def _tone_text(ch: str, book: str) -> str:
    t = rhymebook.tones(ch, book)
    return "/".join(sorted(t, key="平仄".index)) if t else "?"


def check_han(text: str, o: dict) -> list[Problem]:
    """Problems with a poem: against each template, the one it keeps best is reported."""
    lines = split_lines(text)
    first = o["templates"][0]
    if not o["regulated"]:
        lines = _by_tune(lines, first)
    problems = [] if len(lines) == len(first) else [
        Problem(f"{len(lines)} lines, expected {len(first)}", None, "lines")]
    shape, bodies = [], []
    for i, line in enumerate(lines[: len(first)]):
        body, end = (line[:-1], line[-1]) if line[-1] in LINE_END else (line, "")
        bodies.append(body)
        if not end:
            shape.append(Problem(f"line {i + 1} does not end with punctuation", i + 1, "punctuation"))
        if len(body) != first[i].chars or not all(is_han(c) for c in body):
            shape.append(Problem(f"line {i + 1} is not {first[i].chars} Han characters: {line!r}", i + 1, "length"))
        if o["acrostic"] and i < len(o["acrostic"]) and body[:1] != o["acrostic"][i]:
            shape.append(Problem(f"line {i + 1} does not start with {o['acrostic'][i]}", i + 1, "acrostic"))
        if first[i].repeat >= 0 and first[i].repeat < len(bodies) and body != bodies[first[i].repeat]:
            shape.append(Problem(f"line {i + 1} must repeat line {first[i].repeat + 1} (叠句)", i + 1, "repeat"))
    best = None
    for template in o["templates"]:
        found = _tone_problems(bodies, template, o) + _rhyme_problems(bodies, template, o)
        if best is None or len(found) < len(best):
            best = found
    return problems + shape + best


def _by_tune(lines: list[str], tune: tuple) -> list[str]:
    """A 词's lines cut where the tune cuts them, when the characters add up: editions punctuate
    the same words differently (知君为我新作 as 知君为我，新作...)."""
    chars = "".join(c for line in lines for c in line if is_han(c))
    if [len(line.rstrip(LINE_END)) for line in lines] == [x.chars for x in tune] or len(chars) != sum(x.chars for x in tune):
        return lines
    out, at = [], 0
    for x in tune:
        out.append(chars[at: at + x.chars] + "，")
        at += x.chars
    return out


def _tone_problems(bodies: list[str], template: tuple, o: dict) -> list[Problem]:
    if o["tones"] == "off":
        return []
    book, name = o["book"], rhymebook.BOOK_NAMES[o["book"]]
    out = []
    for i, (body, line) in enumerate(zip(bodies, template)):
        if len(body) != line.chars or not all(is_han(c) for c in body):
            continue  # reported as the line's length
        choices = []
        for j, ch in enumerate(body):
            t = rhymebook.tones(ch, book)
            if not t:
                out.append(Problem(f"line {i + 1}: {ch} is not in {name}, so its tone is unknown", i + 1, "unknown"))
            choices.append(sorted(t) or ["平", "仄"])
        faults = min((tone_faults("".join(s), line.base, o["tones"], o["regulated"])
                      for s in itertools.product(*choices)), key=len)
        for pos, rule in faults:
            if rule == "孤平":
                msg = f"line {i + 1}: 孤平 — {body} leaves one level tone before the rhyme; character {pos + 1} " \
                      f"({body[pos]}) should be 平 (or character {pos + 3} 平 to make up for it)"
            elif rule == "三平尾":
                msg = f"line {i + 1}: 三平尾 — {body} ends on three level tones"
            elif rule == "拗":
                after = bodies[i + 1] if i + 1 < len(bodies) else ""
                at = len(after) - 3
                if len(after) == line.chars and at >= 0 and "平" in (rhymebook.tones(after[at], book) or "平"):
                    continue  # 对句相救: the next line's level character makes up for it
                msg = f"line {i + 1}: character {pos + 1} ({body[pos]}) is 仄, a 拗 in the pattern {line.base} " \
                      f"that line {i + 2} does not make up for (its character {at + 1} should be 平)"
            else:
                msg = f"line {i + 1}: character {pos + 1} ({body[pos]}) is {_tone_text(body[pos], book)}, " \
                      f"the pattern {line.base} needs {rule}"
            out.append(Problem(msg, i + 1, rule if rule in ("孤平", "三平尾") else "tone"))
    return out


def rhyme_classes(ch: str, o: dict, tone: str) -> frozenset:
    """The rhyme classes `ch` may rhyme in, at a line end that needs `tone` (平 or 仄)."""
    if o["regulated"]:
        return rhymebook.rhymes(ch, o["book"]) if tone == "平" else frozenset()
    if o["book"] != "pingshui":  # a 词 in 中华新韵: its groups hold both tones
        return rhymebook.rhymes(ch, o["book"]) if tone == "平" else rhymebook.oblique_rhymes(ch, o["book"])
    # a 词 rhymes by 词林正韵's sections, or within one 平水韵 family (a level group with its
    # rising and departing counterparts), which 词林正韵 splits where the poets did not (晏殊
    # rhymes 杯 with 台, 回 with 来)
    found = {f"{part}{t}" for part, t in rhymebook.ci_rhymes(ch) if (t == "平") == (tone == "平")}
    return frozenset(found | {f for f, t in _families().get(ch, ()) if t == tone})


# the level group of each rising (上声) and departing (去声) group of 平水韵, by rhyme character;
# 泰 has no level counterpart
COUNTERPART = dict(zip("董肿讲纸尾语麌荠蟹贿轸吻阮旱潸铣筱巧皓哿马养梗迥有寝感琰豏"
                       "送宋绛寘未御遇霁卦队震问愿翰谏霰啸效号个祃漾敬径宥沁勘艳陷",
                       "东冬江支微鱼虞齐佳灰真文元寒删先萧肴豪歌麻阳庚青尤侵覃盐咸"
                       "东冬江支微鱼虞齐佳灰真文元寒删先萧肴豪歌麻阳庚青尤侵覃盐咸"))


@lru_cache(maxsize=1)
def _families() -> dict[str, frozenset]:
    """character -> {(平水韵 level group, "平" or "仄")}: the families its readings belong to."""
    level = {group[-1]: group for group, tone, _, _ in rhymebook.pingshui_rows() if tone == "平"}
    rows = []
    for group, tone, _, chars in rhymebook.pingshui_rows():
        if tone == "平":
            rows.append(((group, "平"), chars))
        elif tone in "上去" and group[-1] in COUNTERPART:
            rows.append(((level[COUNTERPART[group[-1]]], "仄"), chars))
    return rhymebook.invert(rows)


def _rhyme_problems(bodies: list[str], template: tuple, o: dict) -> list[Problem]:
    out, seen = [], {}
    for rid in range(o["rhymes"]):
        at = [i for i, line in enumerate(template) if line.rhyme and line.rhyme[0] == rid and i < len(bodies)
              and bodies[i]]
        if not at:
            continue
        classes = {i: {c.rstrip("平仄") if not o["regulated"] else c for c in
                       rhyme_classes(bodies[i][-1], o, template[i].rhyme[1])} for i in at}
        counts: dict = {}
        for i in at:
            for c in classes[i]:
                counts[c] = counts.get(c, 0) + 1
        best = max(counts, key=lambda c: (counts[c], -min(i for i in at if c in classes[i]))) if counts else None
        for i in at:
            if best not in classes[i]:
                tone = template[i].rhyme[1]
                what = f"a {tone} rhyme in {best}" if best else f"a {tone} rhyme"
                out.append(Problem(f"line {i + 1} ends on {bodies[i][-1]}, not {what} "
                                   f"({rhymebook.BOOK_NAMES[o['book']] if o['regulated'] or o['book'] != 'pingshui' else '词林正韵'})",
                                   i + 1, "rhyme"))
    rhyme_at = [i for i, line in enumerate(template) if line.rhyme and i < len(bodies) and bodies[i]]
    for i in rhyme_at:
        ch = bodies[i][-1]
        if ch in seen and template[i].repeat < 0:
            out.append(Problem(f"line {i + 1} rhymes on {ch} again (line {seen[ch] + 1}); a rhyme character is used once",
                               i + 1, "repeated rhyme"))
        seen.setdefault(ch, i)
    return out


FORMS = [
    HanForm("五言绝句", "han", "4 lines of 5 characters, 平仄 and 平水韵 rhyme kept", lines=4, chars=5, max_tokens=96),
    HanForm("七言绝句", "han", "4 lines of 7 characters, 平仄 and 平水韵 rhyme kept", lines=4, chars=7, max_tokens=128),
    HanForm("五言律诗", "han", "8 lines of 5 characters, 平仄 and 平水韵 rhyme kept", lines=8, chars=5, max_tokens=192),
    HanForm("七言律诗", "han", "8 lines of 7 characters, 平仄 and 平水韵 rhyme kept", lines=8, chars=7, max_tokens=256),
    HanForm("藏头诗", "han", "acrostic: each line starts with the next character of --var acrostic "
            "(7 per line; --var chars=5; tones and rhyme off unless asked for)",
            chars=7, acrostic=True, rhymed=False, tones="off", max_tokens=256),
] + [CiForm(f"词:{name}", "ci", f"词 to the tune {name}: {len(spec['lines'])} lines, "
            f"{sum(len(x['tones']) for x in spec['lines'])} characters, its 平仄 and rhymes kept",
            max_tokens=max(96, 3 * sum(len(x["tones"]) for x in spec["lines"])), tune=name)
     for name, spec in tunes().items()]


# --- the constraint machine ------------------------------------------------------------------

NEED = {"平": 1, "仄": 2, "中": 3, "*": 4}  # a pattern position -> the tone bits it accepts; 4: any Han character
LUT_SIZE = 0x10000


@lru_cache(maxsize=8)
def _book_tables(book: str, regulated: bool):
    """Per code point (BMP): tone bits (1 平, 2 仄, 4 a Han character at all; 7 for code 0,
    the padding), and the rhyme classes of level and oblique line ends as bit masks."""
    tone = torch.zeros(LUT_SIZE, dtype=torch.int16)
    ping = torch.zeros(LUT_SIZE, dtype=torch.int64)
    ze = torch.zeros(LUT_SIZE, dtype=torch.int64)
    for o in list(range(0x4E00, 0xA000)) + list(range(0x3400, 0x4DC0)) + list(range(0xF900, 0xFB00)):
        tone[o] = 4
    classes: dict[str, int] = {}
    opts = {"book": book, "regulated": regulated}
    for ch in rhymebook.known(book):
        o = ord(ch)
        if o >= LUT_SIZE or not is_han(ch):
            continue
        t = rhymebook.tones(ch, book)
        tone[o] = 4 | (1 if "平" in t else 0) | (2 if "仄" in t else 0)
        for table, which in ((ping, "平"), (ze, "仄")):
            m = 0
            for c in rhyme_classes(ch, opts, which):
                c = c.rstrip("平仄") if not regulated else c
                m |= 1 << classes.setdefault(c, len(classes))
            table[o] = m
    if len(classes) > 62:
        raise FormError(f"{len(classes)} rhyme classes do not fit the machine's masks")
    tone[0] = 7
    return tone, ping, ze


def _han_index(table: TokenTable) -> dict:
    """Per vocabulary, once: tokens of whole Han characters as tensors (count, code points,
    padded with 0), and the few other tokens a poem can use (punctuation, newlines, mixtures,
    byte pieces of characters), which are checked one by one."""
    # kept on the table itself: a cache keyed by id(table) would hand a new table the index
    # of a dead one that happened to have the same id
    index = getattr(table, "_han_index", None)
    if index is None:
        pure, codes, other = [], [], []
        for i, p in enumerate(table.pieces):
            if p is None or not (p.text or p.head or p.tail):
                continue
            if not all(is_han(c) or c in LINE_END or c == "\n" for c in p.text):
                continue
            if not p.head and not p.tail and p.text and all(is_han(c) for c in p.text):
                pure.append(i)
                codes.append([ord(c) if ord(c) < LUT_SIZE else 0xFFFF for c in p.text])
            else:
                other.append((i, p))
        width = max((len(c) for c in codes), default=1)
        padded = torch.zeros((len(codes), width), dtype=torch.long)
        for r, c in enumerate(codes):
            padded[r, : len(c)] = torch.tensor(c)
        count = torch.tensor([len(c) for c in codes], dtype=torch.long)
        last = padded.gather(1, (count - 1).clamp(min=0).unsqueeze(1)).squeeze(1) if len(codes) else count
        index = {"pure_ids": torch.tensor(pure, dtype=torch.long), "count": count, "codes": padded,
                 "last": last, "other": other}
        table._han_index = index
    return index


class State(NamedTuple):
    line: int
    pos: int  # characters written in the line
    phase: int  # 0 writing the line, 1 punctuation written (a newline must follow), 2 done
    pending: bytes  # the first bytes of a character still being spelled
    alive: frozenset  # (template, pattern) pairs the line so far keeps
    rhymes: tuple  # per template: (rhyme masks per sequence, -1 while unset; rhyme characters used)
    keep: str  # the line a later one repeats


class HanPoem(FormConstraint):
    """The machine for regulated verse, acrostics and 词: every template is followed at once
    until the text rules it out; masks are cached per state."""

    def __init__(self, table: TokenTable, vocab_size: int, templates: tuple, acrostic: str = "", book: str = "pingshui",
                 regulated: bool = True, rhymes: int = 1, **_):
        super().__init__(table, vocab_size)
        self.templates, self.acrostic, self.n_rhymes = templates, acrostic, rhymes
        self.lines = len(templates[0])
        self.tone_lut, self.ping_lut, self.ze_lut = _book_tables(book, regulated)
        self.index = idx = _han_index(table)
        # tokens' tone strings, each distinct one once (a few thousand among tens of thousands)
        self.tones_u, self.tones_of = torch.unique(self.tone_lut[idx["codes"]], dim=0, return_inverse=True)
        self.tone_l, self.ping_l, self.ze_l = self.tone_lut.tolist(), self.ping_lut.tolist(), self.ze_lut.tolist()
        self.last_ping, self.last_ze = self.ping_lut[idx["last"]], self.ze_lut[idx["last"]]
        self._prefixes: dict = {}
        self._choice_sets: dict = {}

    def start(self):
        alive = frozenset((t, k) for t, tpl in enumerate(self.templates) for k in range(len(tpl[0].patterns)))
        empty = ((-1,) * self.n_rhymes, frozenset())
        return State(0, 0, 0, b"", alive, (empty,) * len(self.templates), "")

    def finished(self, state) -> bool:
        return state.phase == 2

    def _line(self, t: int, line: int) -> Line:
        return self.templates[t][line]

    def _fits(self, state: State, ch: str):
        """The (template, pattern) pairs and rhyme state that survive writing `ch` next, or None."""
        line, pos = state.line, state.pos
        spec = self._line(0, line)
        if pos >= spec.chars or not is_han(ch):
            return None
        if pos == 0 and line < len(self.acrostic) and ch != self.acrostic[line]:
            return None
        if spec.repeat >= 0 and ch != state.keep[pos: pos + 1]:
            return None
        code = ord(ch) if ord(ch) < LUT_SIZE else 0xFFFF
        bits = self.tone_l[code]
        last = pos == spec.chars - 1
        alive, rhymes = set(), list(state.rhymes)
        for t, k in state.alive:
            line_t = self._line(t, line)
            if not NEED[line_t.patterns[k][pos]] & bits:
                continue
            if last and line_t.rhyme is not None:
                rid, tone = line_t.rhyme
                masks, used = state.rhymes[t]
                m = masks[rid] & (self.ping_l if tone == "平" else self.ze_l)[code]
                if not m or (ch in used and line_t.repeat < 0):
                    continue
                rhymes[t] = (masks[:rid] + (m,) + masks[rid + 1:], used | {ch})
            alive.add((t, k))
        if not alive:
            return None
        keep = state.keep + ch if self._is_kept(line) else state.keep
        return frozenset(alive), tuple(rhymes), keep

    def _is_kept(self, line: int) -> bool:
        return line + 1 < self.lines and self._line(0, line + 1).repeat == line

    def _step(self, state: State, ch: str):
        line, pos, phase = state.line, state.pos, state.phase
        if phase == 0:
            if ch in LINE_END:
                if pos != self._line(0, line).chars:
                    return None
                return state._replace(phase=2 if line == self.lines - 1 else 1, pending=b"")
            fit = self._fits(state, ch)
            if fit is None:
                return None
            alive, rhymes, keep = fit
            return State(line, pos + 1, 0, b"", alive, rhymes, keep)
        if phase == 1 and ch == "\n":
            nxt = line + 1
            alive = set()
            for t in {t for t, _ in state.alive}:
                done, following = self._line(t, line), self._line(t, nxt)
                owed = done.owing and all(k >= len(done.patterns) - done.owing for u, k in state.alive if u == t)
                at = following.chars - 3  # the character that makes up for the 拗
                alive |= {(t, k) for k, p in enumerate(following.patterns) if not owed or p[at] == "平"}
            alive = frozenset(alive)
            keep = state.keep if self._line(0, nxt).repeat == line else ""
            return State(nxt, 0, 0, b"", alive, state.rhymes, keep)
        return None

    def _choices(self, state: State) -> frozenset | None:
        """The characters allowed at the current position (None: any Han character)."""
        line, pos = state.line, state.pos
        spec = self._line(0, line)
        key = []
        for t, k in state.alive:
            line_t = self._line(t, line)
            rhyme = None
            if pos == spec.chars - 1 and line_t.rhyme is not None:
                masks, used = state.rhymes[t]
                rhyme = (line_t.rhyme[1], masks[line_t.rhyme[0]], used if line_t.repeat < 0 else frozenset())
            key.append((line_t.patterns[k][pos], rhyme))
        fixed = None
        if pos == 0 and line < len(self.acrostic):
            fixed = self.acrostic[line]
        elif spec.repeat >= 0:
            fixed = state.keep[pos: pos + 1]
        key = (frozenset(key), fixed)
        if key not in self._choice_sets:
            if fixed is not None:
                chars = frozenset(c for c in fixed if self._fits(state, c) is not None)
            elif all(need == "*" and rhyme is None for need, rhyme in key[0]):
                chars = None
            else:
                chars = set()
                for need, rhyme in key[0]:
                    ok = (self.tone_lut & NEED[need]) != 0
                    if rhyme is not None:
                        lut = self.ping_lut if rhyme[0] == "平" else self.ze_lut
                        ok &= (lut & rhyme[1]) != 0
                    found = {chr(o) for o in ok.nonzero().flatten().tolist() if o}
                    chars |= found - (rhyme[2] if rhyme is not None else set())
                chars = frozenset(chars)
            self._choice_sets[key] = chars
        return self._choice_sets[key]

    def _prefix_ok(self, state: State, tail: bytes) -> bool:
        """Can the unfinished character `tail` still become an acceptable character here (a Han
        character inside a line, a punctuation mark at its end)?"""
        if state.phase != 0:
            return False
        if state.pos == self._line(0, state.line).chars:
            key, chars = "punct", LINE_END
        else:
            choices = self._choices(state)
            key = choices if choices is not None else "any"
            chars = choices if choices is not None else (chr(o) for o in range(0x3400, 0xA000) if is_han(chr(o)))
        if key not in self._prefixes:
            self._prefixes[key] = {c.encode()[:k] for c in chars for k in range(1, len(c.encode()))}
        return tail in self._prefixes[key]

    def step_piece(self, state: State, piece):
        """The state after a token's bytes, or None if they break the form."""
        pending = state.pending
        if pending:
            got = pending + piece.head
            if len(got) < utf8_length(pending[0]):  # one more byte of the same character
                if piece.text or piece.tail or not self._prefix_ok(state, got):
                    return None
                return state._replace(pending=got)
            if len(got) > utf8_length(pending[0]):
                return None
            try:
                ch = got.decode("utf-8")
            except UnicodeDecodeError:
                return None
            state = self._step(state._replace(pending=b""), ch)
        elif piece.head:
            return None
        for ch in piece.text:
            if state is None:
                return None
            state = self._step(state, ch)
        if state is not None and piece.tail:
            state = state._replace(pending=piece.tail) if self._prefix_ok(state, piece.tail) else None
        return state

    def allowed(self, state: State):
        idx = self.index
        out = []
        if state.phase == 0 and not state.pending and len(idx["pure_ids"]):
            out = self._pure_allowed(state)
        return out + [i for i, p in idx["other"] if self.step_piece(state, p) is not None]

    def _pure_allowed(self, state: State) -> list[int]:
        """Tokens of whole Han characters, vectorised: they fit the rest of the line, keep some
        live pattern at every character, begin with the acrostic's character, end on a rhyme
        where one is due."""
        idx, line, pos = self.index, state.line, state.pos
        spec = self._line(0, line)
        rest = spec.chars - pos
        count, codes, width = idx["count"], idx["codes"], idx["codes"].shape[1]
        ok = count <= rest
        if pos == 0 and line < len(self.acrostic):
            ok &= codes[:, 0] == ord(self.acrostic[line])
        if spec.repeat >= 0:
            for j, ch in enumerate(state.keep[pos:][:width]):
                ok &= (codes[:, j] == ord(ch)) | (count <= j)
        ends = count == rest
        fits = torch.zeros_like(ok)
        done = set()
        for t, k in state.alive:
            line_t = self._line(t, line)
            pattern = line_t.patterns[k]
            rhyme = None
            if line_t.rhyme is not None:
                masks, used = state.rhymes[t]
                rhyme = (line_t.rhyme[1], masks[line_t.rhyme[0]], used if line_t.repeat < 0 else frozenset())
            key = (pattern, rhyme)
            if key in done:
                continue
            done.add(key)
            need = [NEED[c] for c in pattern[pos: pos + width]] + [7] * max(0, width - rest)
            fit = ((self.tones_u & torch.tensor(need[:width], dtype=torch.int16)) != 0).all(1)[self.tones_of]
            if rhyme is not None:
                lut_last = self.last_ping if rhyme[0] == "平" else self.last_ze
                good = (lut_last & rhyme[1]) != 0
                if rhyme[2]:
                    good &= ~torch.isin(idx["last"], torch.tensor([ord(c) for c in rhyme[2]]))
                fit &= ~ends | good
            fits |= fit
        return idx["pure_ids"][ok & fits].tolist()

    def advance(self, state, token: int):
        piece = self.table.pieces[token] if token < len(self.table.pieces) else None
        new = self.step_piece(state, piece) if piece is not None else None
        if new is None:
            raise FormError(f"token {token} breaks the form at state {state}")
        return new
