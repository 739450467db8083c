"""Rhyme books for Chinese verse: 平水韵 (106 groups), 中华新韵 (14 groups), and 词林正韵 (19 部) for 词.

The tables are plain text in data/ (one line per group, the source named in each file's header), written by
tools/build_rhymebook.py. Each book is read once, on its first lookup, into per-character sets; a lookup after
that is one dict access, cheap enough for a constrained decoder to walk a whole vocabulary.

Characters may be traditional or simplified: the 平水韵 table lists both forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Iterable

BOOKS = ("pingshui", "xinyun")  # 平水韵, 中华新韵
BOOK_NAMES = {"pingshui": "平水韵", "xinyun": "中华新韵"}
DATA = Path(__file__).parent / "data"
NOTHING: frozenset = frozenset()


@dataclass(frozen=True)
class Book:
    tones: dict[str, frozenset[str]]  # character -> subset of {"平", "仄"}
    rhymes: dict[str, frozenset[str]]  # character -> its level-tone (平声) groups
    groups: tuple[str, ...]  # every group, in the book's order
    oblique: dict[str, frozenset[str]]  # character -> the groups of its oblique (仄) readings


def read_table(name: str) -> list[list[str]]:
    text = (DATA / name).read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]


def invert(rows: Iterable[tuple[object, str]]) -> dict[str, frozenset]:
    """(value, characters) rows -> {character: frozenset of the values of the rows that list it}."""
    shared: dict[frozenset, frozenset] = {}  # most characters share a handful of sets: keep one of each
    table: dict[str, frozenset] = {}
    for value, chars in rows:
        single = shared.setdefault(frozenset([value]), frozenset([value]))
        fresh = dict.fromkeys(chars, single)  # whole rows at C speed; only the repeats are merged one by one
        repeats = {ch: table[ch] for ch in fresh.keys() & table.keys()}
        table.update(fresh)
        for ch, before in repeats.items():
            merged = before | single
            table[ch] = shared.setdefault(merged, merged)
    return table


def index(rows: list[tuple[str, str, str]]) -> Book:
    """(group, "平" or "仄", characters) rows -> a Book."""
    return Book(tones=invert((tone, chars) for _, tone, chars in rows),
                rhymes=invert((group, chars) for group, tone, chars in rows if tone == "平"),
                groups=tuple(dict.fromkeys(group for group, _, _ in rows)),
                oblique=invert((group, chars) for group, tone, chars in rows if tone == "仄"))


@cache
def pingshui_rows() -> list[list[str]]:
    return read_table("pingshui.txt")  # group, tone (平 上 去 入), 词林正韵 部, characters


@cache
def load(book: str) -> Book:
    if book == "pingshui":
        return index([(group, "平" if tone == "平" else "仄", chars) for group, tone, _, chars in pingshui_rows()])
    if book == "xinyun":
        return index([(group, tone, chars) for group, _, tone, chars in read_table("xinyun.txt")])
    books = ", ".join(f"{b} ({BOOK_NAMES[b]})" for b in BOOKS)
    raise ValueError(f"unknown rhyme book {book!r}: use one of {books}")


def tones(ch: str, book: str = "pingshui") -> frozenset[str]:
    """The tone classes of a character, a subset of {"平", "仄"}: both for a polyphonic character such as 看,
    empty when the book lacks it. 入声 characters are 仄 in 平水韵 whatever their modern tone."""
    return load(book).tones.get(ch, NOTHING)


def rhymes(ch: str, book: str = "pingshui") -> frozenset[str]:
    """The level-tone rhyme groups of a character: 流 -> {"下平十一尤"}, or {"七尤"} in 中华新韵; empty if the
    character has no level-tone reading. Two characters rhyme when their groups meet."""
    return load(book).rhymes.get(ch, NOTHING)


def oblique_rhymes(ch: str, book: str = "pingshui") -> frozenset[str]:
    """The groups of a character's oblique-tone readings: 骤 -> {"去声二十六宥"}, or {"七尤"} in 中华新韵,
    whose groups hold both tones (a 词 may rhyme 平 with 仄 within one)."""
    return load(book).oblique.get(ch, NOTHING)


@cache
def known(book: str = "pingshui") -> frozenset[str]:
    """Every character the book lists."""
    return frozenset(load(book).tones)


@cache
def ci_table() -> dict[str, frozenset[tuple[str, str]]]:
    # 词 rhyme 上 with 去 (通押); 入声 stays apart
    return invert(((part, "仄" if tone in "上去" else tone), chars) for _, tone, part, chars in pingshui_rows())


def ci_rhymes(ch: str) -> frozenset[tuple[str, str]]:
    """The 词林正韵 部 of a character with its tone, "平", "仄" (上 and 去) or "入": 流 -> {("第十二部", "平")}.
    Two rhyme characters of a 词 rhyme when they share a pair (a few tunes, 西江月 among them, rhyme 平 with 仄
    of one 部). Several pairs for a polyphonic character."""
    return ci_table().get(ch, NOTHING)


@cache
def group_names() -> dict[str, str]:
    names = {}
    every = load("pingshui").groups
    for group in every:  # short forms first so that an exact name of any book wins below
        names.setdefault(group[-1], group)  # 尤 -> 下平十一尤
    for group in every:
        names.setdefault(group[2:], group)  # 十一尤 -> 下平十一尤
    for group in every + load("xinyun").groups + tuple(part for _, _, part, _ in pingshui_rows()):
        names[group] = group
    return names


def group_name(group: str) -> str:
    """The display name of a rhyme group: a group of either book or a 词林正韵 部 is its own name; a 平水韵
    group may also be given by its rhyme character or number ("尤", "十一尤" -> "下平十一尤")."""
    try:
        return group_names()[group]
    except KeyError:
        raise ValueError(f"unknown rhyme group {group!r}: expected e.g. 下平十一尤 (平水韵), 十一庚 (中华新韵) "
                         f"or 第十二部 (词林正韵)") from None
