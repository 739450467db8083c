"""Overused phrases of machine-written fiction ("slop"), one list per language.

The lists are plain text files beside this module (`en.txt`, `zh.txt`): one phrase a line,
`#` starts a comment, blank lines are skipped. Edit them freely; `llmos eval` counts the
phrases in generated text, and the same lists can serve as banned strings.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

SLOP_DIR = Path(__file__).parent


@cache
def load_slop(lang: str) -> tuple[str, ...]:
    """The phrases for `lang` ("en" or "zh"), lower-cased, in file order, without duplicates."""
    path = SLOP_DIR / f"{lang}.txt"
    if not path.is_file():
        langs = sorted(p.stem for p in SLOP_DIR.glob("*.txt"))
        raise ValueError(f"no slop list for language {lang!r}; lists: {', '.join(langs)}")
    phrases: dict[str, None] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        phrase = line.split("#", 1)[0].strip().lower()
        if phrase:
            phrases[phrase] = None
    return tuple(phrases)


def find_slop(text: str, phrases) -> list[str]:
    """The phrases found in `text`, in order of position: case-insensitive, English phrases as
    whole words only (so "delve into" is not found in "delve intone"), and overlapping finds
    counted once, as the longest ("眼中闪过一丝" is not also "闪过一丝")."""
    lower = text.lower()
    found = []  # (start, end, phrase)
    for phrase in phrases:
        if phrase.isascii():
            pattern = r"(?<!\w)" + re.escape(phrase) + r"(?!\w)"
            found += [(m.start(), m.end(), phrase) for m in re.finditer(pattern, lower)]
        else:
            start = lower.find(phrase)
            while start >= 0:
                found.append((start, start + len(phrase), phrase))
                start = lower.find(phrase, start + 1)
    hits, covered_to = [], -1
    for start, end, phrase in sorted(found, key=lambda f: (f[0], f[0] - f[1])):
        if start >= covered_to:
            hits.append(phrase)
            covered_to = end
    return hits
