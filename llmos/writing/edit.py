"""Reading structured answers: a revision with suggestions, a list of distinct ideas; and a
word-level diff for showing what a revision changed."""

from __future__ import annotations

import difflib
import re

from llmos.writing.rank import _trigrams


def parse_revision(text: str) -> tuple[str, list[str]]:
    """(revised text, suggestions) from an answer in the REVISED: / SUGGESTIONS: format; an
    answer that ignores the format is taken as the revision itself."""
    body = re.sub(r"^\s*REVISED:\s*", "", text.strip())
    revised, _, rest = body.partition("SUGGESTIONS:")
    suggestions = [re.sub(r"^\s*[-*•]\s*", "", line).strip() for line in rest.splitlines()
                   if re.match(r"\s*[-*•]\s*\S", line)]
    return revised.strip(), suggestions


def word_diff(old: str, new: str) -> list[tuple[str, str]]:
    """[(op, text)] with op in ' ' (kept), '-' (removed), '+' (added), word by word (character
    by character for Chinese)."""
    split = (lambda s: list(s)) if re.search(r"[\u3400-\u9fff]", old + new) else (lambda s: re.findall(r"\s+|\S+", s))
    a, b = split(old), split(new)
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out.append((" ", "".join(a[i1:i2])))
        if op in ("delete", "replace"):
            out.append(("-", "".join(a[i1:i2])))
        if op in ("insert", "replace"):
            out.append(("+", "".join(b[j1:j2])))
    return out


def distinct_ideas(texts: list[str], limit: int, threshold: float = 0.5) -> list[str]:
    """Numbered items from several answers, dropping any that shares more than `threshold` of
    its word trigrams (Jaccard) with an idea already kept."""
    from llmos.writing.novel import parse_numbered

    kept: list[str] = []
    grams: list[set] = []
    for text in texts:
        items = parse_numbered(text if re.match(r"\s*1[.)]", text) else "1. " + text)
        for item in items:
            g = set(_trigrams(item))
            if not item or any(len(g & h) / max(1, len(g | h)) > threshold for h in grams):
                continue
            if any(item.lower() == k.lower() for k in kept):
                continue
            kept.append(item)
            grams.append(g)
            if len(kept) == limit:
                return kept
    return kept
