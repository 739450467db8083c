"""The rule-based detectors: regular-expression rules and word lists (data/rules.yaml,
data/words.yaml) and personal data with checksums. `Detectors.scan` runs them all over a text;
with partial=True it also reports matches cut off by the end of the text, which is what lets a
stream hold back only the tail that may still turn into a match.

Personal data found here:
- emails;
- phone numbers: North American (NANP: area and exchange codes start 2-9; 555-0100..0199, the
  numbers set aside for fiction, are left alone), UK mobiles, +country forms, Chinese mobiles
  (1[3-9] and 9 more digits) and landlines (0 area code, separator, 7-8 digits);
- payment card numbers: 13-19 digits passing the Luhn check;
- Chinese resident ID numbers: 18 characters, a plausible birth date and the GB 11643-1999
  check character (ISO 7064 MOD 11-2);
- US Social Security numbers in their printed form (AAA-GG-SSSS; area not 000, 666 or 9xx,
  group not 00, serial not 0000).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import regex
import yaml

from llmos.safety.policy import DATA, Policy

FLAGS = regex.IGNORECASE | regex.VERSION0
HAN = regex.compile(r"\p{Han}")
LATIN = regex.compile(r"[A-Za-z]")


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
    lang: str = ""  # "zh": needs a Han character to match; "en": a Latin letter; "": anything


# -- checksums --

def luhn_ok(digits: str) -> bool:
    """The Luhn check of payment card numbers: double every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_ID_WEIGHTS = [2 ** (17 - i) % 11 for i in range(17)]  # 7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2


def cn_id_check_char(first17: str) -> str:
    """GB 11643-1999: the 18th character of a resident ID number from the first 17 digits."""
    return "10X98765432"[sum(int(c) * w for c, w in zip(first17, _ID_WEIGHTS)) % 11]


def cn_id_ok(number: str) -> bool:
    number = number.upper()
    if len(number) != 18 or not number[:17].isdigit():
        return False
    year, month, day = int(number[6:10]), int(number[10:12]), int(number[12:14])
    if not (1900 <= year <= 2100 and 1 <= month <= 12 and 1 <= day <= 31):
        return False
    return cn_id_check_char(number[:17]) == number[17]


def ssn_ok(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit() or c in "xX")


def _card(m: str) -> str | None:
    d = _digits(m)
    return "[card]" if 13 <= len(d) <= 19 and d.isdigit() and luhn_ok(d) else None


def _cn_id(m: str) -> str | None:
    return "[id]" if cn_id_ok(m) else None


def _ssn(m: str) -> str | None:
    d = _digits(m)
    return "[id]" if ssn_ok(d[:3], d[3:5], d[5:]) else None


def _nanp(m: str) -> str | None:
    d = _digits(m)
    d = d[1:] if len(d) == 11 and d[0] == "1" else d
    if len(d) != 10 or d[0] in "01" or d[3] in "01":
        return None
    if d[3:6] == "555" and d[6:8] == "01":  # 555-0100 to 555-0199: reserved for fiction
        return None
    return "[phone]"


def _phone(m: str) -> str | None:
    return "[phone]" if 7 <= len(_digits(m)) <= 15 else None


def _email(m: str) -> str | None:
    return "[email]"


# Personal data, most specific first: a match overlapping one kept earlier is dropped.
PII = [
    ("pii_email", r"(?<![\w.+-])[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,}(?![\w-])", _email),
    ("pii_cn_id", r"(?<![0-9a-z])\d{17}[0-9x](?![0-9a-z])", _cn_id),
    ("pii_card", r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])", _card),
    ("pii_ssn", r"(?<![\d-])\d{3}[- ]\d{2}[- ]\d{4}(?![\d-])", _ssn),
    ("pii_cn_mobile", r"(?<![\d+])(?:(?:\+|00)?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)", _phone),
    ("pii_cn_landline", r"(?<![\d-])(?:\(0\d{2,3}\)\s?|0\d{2,3}-)\d{3,4}-?\d{4}(?![\d-])", _phone),
    ("pii_phone_nanp", r"(?<![\d+])(?:\+?1[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\d)", _nanp),
    ("pii_phone_uk", r"(?<![\d+])(?:\+44\s?7\d{3}|07\d{3})\s?\d{3}\s?\d{3}(?!\d)", _phone),
    ("pii_phone_intl", r"(?<![\w+])\+(?:[2-9]\d{0,2})[ .-]?\d{1,4}(?:[ .-]?\d{2,4}){2,4}(?!\d)", _phone),
]


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
    return set(rule_data()[0]) | {name for name, _, _ in PII} | {
        f"words_{c}_{lang}" for c in rule_data()[1] for lang in ("en", "zh")} | {f"words_{c}_policy" for c in rule_data()[1]}


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
                self.pii.append(Detector(rid, "personal_data", "pii", regex.compile(pattern, FLAGS), check))
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
        has = {"": True, "zh": HAN.search(text, start) is not None, "en": LATIN.search(text, start) is not None}
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
