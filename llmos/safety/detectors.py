"""The detectors a policy switches on: regular-expression rules and word lists (rules.py) and
personal data with checksums (pii.py). `Detectors.scan` runs them over a text; with
partial=True it also reports where the first match begins that more text may still change,
which is what lets a stream hold back only the tail that may still turn into a match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import regex

from llmos.safety.pii import PII
from llmos.safety.policy import Policy
from llmos.safety.rules import rule_data

FLAGS = regex.IGNORECASE | regex.VERSION0
HAN = regex.compile(r"\p{Han}")
LATIN = regex.compile(r"[A-Za-z]")
DIGIT = regex.compile(r"\d")


@dataclass(frozen=True)
class Finding:
    category: str
    action: str
    rule: str
    start: int
    end: int
    score: float = 1.0
    source: str = "rule"  # rule, words, pii or classifier
    label: str = ""  # what a redaction writes, e.g. "[email]"

    def as_dict(self, text: str | None = None) -> dict:
        d = {"category": self.category, "action": self.action, "rule": self.rule, "source": self.source,
             "start": self.start, "end": self.end, "score": round(self.score, 4)}
        if text is not None:
            d["match"] = text[self.start : self.end]
        return d


@dataclass(frozen=True)
class Detector:
    rule: str
    category: str
    source: str
    pattern: regex.Pattern
    check: Callable[[str], str | None] | None = None  # PII: the match -> its label, or None to reject
    openai: tuple[str, ...] = ()
    lang: str = ""  # "zh": needs a Han character to match; "en": a Latin letter; "digits": a digit; "": anything


def _words_pattern(phrases: list[str], lang: str) -> regex.Pattern:
    body = "|".join(regex.escape(p).replace(r"\ ", r"\s+") for p in sorted(phrases, key=len, reverse=True))
    return regex.compile(rf"(?<!\w)(?:{body})(?!\w)" if lang == "en" else f"(?:{body})", FLAGS)


class Detectors:
    """The detectors a policy switches on (a rule whose action is allow does not run)."""

    def __init__(self, policy: Policy):
        rules, words = rule_data()
        self.items: list[Detector] = []
        self.pii: list[Detector] = []

        def on(category: str, rule: str) -> bool:
            return policy.rule_actions.get(rule, policy.actions[category]) != "allow"

        for rid, r in rules.items():
            if r["lang"] in policy.languages and on(r["category"], rid):
                self.items.append(Detector(rid, r["category"], "rule", regex.compile(r["pattern"], FLAGS),
                                           openai=tuple(r.get("openai", ())), lang=r["lang"]))
        for category, by_lang in words.items():
            for lang, phrases in (by_lang or {}).items():
                rid = f"words_{category}_{lang}"
                if phrases and lang in policy.languages and on(category, rid):
                    self.items.append(Detector(rid, category, "words", _words_pattern(phrases, lang), lang=lang))
        for category, phrases in policy.extra_words.items():
            rid = f"words_{category}_policy"
            if on(category, rid):
                self.items.append(Detector(rid, category, "words", _words_pattern(phrases, "en")))
        for rid, pattern, check in PII:
            if on("personal_data", rid):
                self.pii.append(Detector(rid, "personal_data", "pii", regex.compile(pattern, FLAGS), check,
                                         lang="" if rid == "pii_email" else "digits"))
        self.policy = policy

    def openai_of(self, rule: str) -> tuple[str, ...]:
        for d in self.items:
            if d.rule == rule:
                return d.openai
        return ()

    def scan(self, text: str, start: int = 0, partial: bool = False) -> tuple[list[Finding], int]:
        """(findings, hold) for the matches that begin at or after `start`. With partial=True,
        hold is where the first match begins that the end of the text may still change (a
        partial match, or a complete one that ends at the very end and may grow) and that
        match is left out; without it, hold is len(text)."""
        hold = len(text)
        findings = []
        # Every Chinese rule needs a Han character and every English one a Latin letter: a text
        # without them skips those rules (most of the cost on text in the other language).
        has = {"": True, "zh": HAN.search(text, start) is not None, "en": LATIN.search(text, start) is not None,
               # numbers need a digit, or a "+" or "(" at the very end that digits may follow
               "digits": DIGIT.search(text, start) is not None or text.endswith(("+", "("))}
        for d in self.items:
            if not has[d.lang]:
                continue
            for m in d.pattern.finditer(text, start, partial=partial):
                if partial and self._open(d, m, text):
                    hold = min(hold, m.start())
                else:
                    findings.append(self._finding(d, m.start(), m.end(), ""))
        kept: list[tuple[int, int]] = []
        for d in self.pii:
            if not has[d.lang]:
                continue
            for m in d.pattern.finditer(text, start, partial=partial):
                if partial and self._open(d, m, text):  # not checkable yet: hold it, whatever it becomes
                    hold = min(hold, m.start())
                    continue
                label = d.check(m.group())
                if label is None or any(m.start() < e and s < m.end() for s, e in kept):
                    continue
                kept.append((m.start(), m.end()))
                findings.append(self._finding(d, m.start(), m.end(), label))
        return findings, hold

    @staticmethod
    def _open(d: Detector, m, text: str) -> bool:
        """May more text still change this match? Partial, ending at the end, or (since `regex`
        prefers a complete match to a longer partial one) the start of a longer match."""
        if m.partial or m.end() == len(text):
            return True
        return d.pattern.fullmatch(text, m.start(), partial=True) is not None

    def _finding(self, d: Detector, start: int, end: int, label: str) -> Finding:
        action = self.policy.action_for(d.category, d.rule, d.source)
        return Finding(d.category, action, d.rule, start, end, 1.0, d.source, label or f"[{d.category}]")


_compiled: dict[tuple, Detectors] = {}


def detectors_for(policy: Policy) -> Detectors:
    key = policy.key()
    if key not in _compiled:
        _compiled[key] = Detectors(policy)
    return _compiled[key]
