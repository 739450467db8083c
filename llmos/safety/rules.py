"""The shipped rules and word lists (data/rules.yaml, data/words.yaml), loaded once, with
their `{name}` definitions expanded and word edges written so that partial matches work."""

from __future__ import annotations

import functools
from pathlib import Path

import regex
import yaml

from llmos.safety.pii import PII_RULES

DATA = Path(__file__).parent / "data"


def word_edges(pattern: str) -> str:
    """`\\b` rewritten into forms whose partial matches `regex` reports reliably: (?!\\w) where
    it ends a word, (?<!\\w) where it starts one, and a gap `[^...]{0,n}?\\b` as a gap that ends
    in a non-word character. The same matches; but with \\b, `regex` gives up on a text that
    ends inside the gap or after a space instead of reporting that more text may still match."""
    # a gap of excluded characters before a word: its last character is a non-word one
    pattern = regex.sub(r"\[\^([^\]]*)\]\{0,(\d+)\}\?\\b",
                        lambda m: f"[^{m[1]}]{{0,{int(m[2]) - 1}}}?[^\\w{m[1]}]", pattern)
    pattern = regex.sub(r"\\b(?=\||\)|$|\[\^|\\s)", lambda m: r"(?!\w)", pattern)  # before a gap or the end
    return pattern.replace(r"\b", r"(?<!\w)")


@functools.cache
def rule_data() -> tuple[dict, dict]:
    """(rules by id, word lists) as shipped, with `{name}` definitions expanded."""
    raw = yaml.safe_load((DATA / "rules.yaml").read_text(encoding="utf-8"))
    defs = raw.get("defs", {})
    rules = {}
    for r in raw["rules"]:
        pattern = r["pattern"]
        for _ in range(3):  # definitions may use definitions
            for name, value in defs.items():
                pattern = pattern.replace("{" + name + "}", value)
        rules[r["id"]] = {**r, "pattern": word_edges(pattern)}
    words = yaml.safe_load((DATA / "words.yaml").read_text(encoding="utf-8"))
    return rules, words


def rule_ids() -> set[str]:
    """Every id a policy may name: the rules, the personal-data detectors, the word lists."""
    rules, words = rule_data()
    return set(rules) | set(PII_RULES) | {f"words_{c}_{lang}" for c in words for lang in ("en", "zh", "policy")}
