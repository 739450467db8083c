"""Checking text against a policy: `check_text` for a whole text (a prompt, a finished output),
`StreamGuard` for an output as it streams. Both run the same detectors and produce the same
findings and the same redacted text; the guard releases text as soon as nothing can still
change it, holding back only a tail that a match may yet cover (a word that may become an
email address, digits that may become a card number, "how to make" that may become a recipe),
the way a stop-string cutter holds back a partial stop string."""

from __future__ import annotations

from dataclasses import dataclass, field

import regex

from llmos.safety.detectors import HAN, Detectors, Finding, detectors_for
from llmos.safety.policy import RANK, Policy

# A sentence ends after terminal punctuation (and any closing quotes or brackets), or at a line break.
SENTENCE_END = regex.compile(r"[.!?。！？…]+[\"'”’」』)\]）]*|\n+")
MIN_SENTENCE = 8  # characters; shorter sentences ("Yes.", "他笑了。") are not worth classifying
# A new scan of a stream starts this many characters before the released point: any match that
# could still grow began after it (it was held), so only lookbehinds and word edges need context.
LOOKBACK = 4


def sentence_spans(text: str, start: int = 0) -> list[tuple[int, int, bool]]:
    """(start, end, complete) for the sentences of text[start:]. A sentence is complete once a
    character follows its terminator (a closing quote may still come), or at a line break."""
    spans, s = [], start
    for m in SENTENCE_END.finditer(text, start):
        complete = m.end() < len(text) or m.group().startswith("\n")
        if not complete:
            break
        spans.append((s, m.end(), True))
        s = m.end()
    if s < len(text):
        spans.append((s, len(text), False))
    return spans


@dataclass
class Verdict:
    findings: list[Finding] = field(default_factory=list)
    original: str = field(default="", repr=False)

    @property
    def action(self) -> str:
        """The strongest action that fired: block > redact > warn > allow."""
        return max((f.action for f in self.findings), key=RANK.__getitem__, default="allow")

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def blocking(self) -> list[Finding]:
        """The block findings, first in the text first."""
        return [f for f in self.findings if f.action == "block"]

    @property
    def categories(self) -> list[str]:
        return sorted({f.category for f in self.findings if f.action != "allow"})

    @property
    def text(self) -> str:
        """The text with every redact finding replaced by its label ("[email]", "[card]", ...)."""
        return redact(self.original, 0, len(self.original), self.findings)

    def as_dict(self, with_text: bool = False) -> dict:
        """JSON-ready. The matched text and the redacted text only with with_text=True."""
        d = {"action": self.action, "blocked": self.blocked, "categories": self.categories,
             "findings": [f.as_dict(self.original if with_text else None) for f in self.findings]}
        if with_text:
            d["text"] = self.text
        return d


def redact(text: str, a: int, b: int, findings: list[Finding]) -> str:
    """text[a:b] with the redact findings inside it replaced; overlapping ones merge under the
    label of the first."""
    out, pos = [], a
    for f in sorted((f for f in findings if f.action == "redact" and f.start < b and f.end > a), key=lambda f: f.start):
        if f.end <= pos:
            continue
        if f.start >= pos:
            out.append(text[pos : f.start])
            out.append(f.label)
        pos = max(pos, min(f.end, b))
    out.append(text[pos:b])
    return "".join(out)


def _classify(policy: Policy, text: str, spans: list[tuple[int, int, bool]], classifier=None) -> list[Finding]:
    from llmos.safety.classifier import CLASSES, get_classifier

    chosen = []
    for s, e, _ in spans:
        stripped = text[s:e].strip()
        lang = "zh" if HAN.search(stripped) else "en"
        if len(stripped) >= MIN_SENTENCE and lang in policy.classifier_languages:
            lead = len(text[s:e]) - len(text[s:e].lstrip())
            chosen.append((s + lead, s + lead + len(stripped), stripped))
    if not chosen:
        return []
    probs = (classifier or get_classifier()).probabilities([c[2] for c in chosen])
    findings = []
    for (s, e, _), row in zip(chosen, probs):
        for k, category in enumerate(CLASSES[1:], start=1):
            p = float(row[k])
            if p >= policy.threshold and policy.actions[category] != "allow":
                action = policy.action_for(category, f"classifier_{category}", "classifier")
                findings.append(Finding(category, action, f"classifier_{category}", s, e, p, "classifier", f"[{category}]"))
    return findings


def _sorted(findings) -> list[Finding]:
    return sorted(set(findings), key=lambda f: (f.start, f.end, f.rule))


def check_text(text: str, policy: Policy, classifier: bool | None = None) -> Verdict:
    """The verdict on a whole text. classifier=None follows the policy (`classifier.enabled`)."""
    det = detectors_for(policy)
    findings, _ = det.scan(text)
    if policy.classifier if classifier is None else classifier:
        findings += _classify(policy, text, sentence_spans(text))
    return Verdict(_sorted(findings), text)


class StreamGuard:
    """One streamed candidate: `feed` each piece as it comes and send on what it returns;
    `finish` at the end. After a block finding, `blocked` is True: the text up to where the
    blocked span starts has been released and every later call returns ""."""

    def __init__(self, policy: Policy, classifier: bool | None = None):
        self.policy = policy
        self.detectors: Detectors = detectors_for(policy)
        self.use_classifier = policy.stream_classifier if classifier is None else classifier
        # With a classifier that may block, a sentence is released only once it has been classified.
        self.hold_sentences = self.use_classifier and any(
            policy.action_for(c, f"classifier_{c}", "classifier") == "block" for c in policy.actions)
        self.text = ""
        self.sent = 0  # characters of self.text released
        self.classified = 0  # characters of self.text whose sentences have been classified
        self.findings: set[Finding] = set()
        self.blocked = False

    @property
    def verdict(self) -> Verdict:
        return Verdict(_sorted(self.findings), self.text)

    def feed(self, piece: str) -> str:
        if self.blocked or not piece:
            return ""
        self.text += piece
        return self._advance(final=False)

    def finish(self) -> str:
        """Release what is still held (redacted), deciding the matches the end left open."""
        if self.blocked:
            return ""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self.text
        found, hold = self.detectors.scan(text, max(0, self.sent - LOOKBACK), partial=not final)
        self.findings.update(found)
        if self.use_classifier:
            spans = [s for s in sentence_spans(text, self.classified) if s[2] or final]
            if spans:
                self.findings.update(_classify(self.policy, text, spans))
                self.classified = spans[-1][1]
            if self.hold_sentences:
                hold = min(hold, self.classified)
        block = self._first_block()
        while block is not None:  # the stream ends where the block begins: settle what comes before it
            hold = block
            self.findings.update(self.detectors.scan(text[:block], max(0, self.sent - LOOKBACK))[0])
            if (block := self._first_block()) == hold:
                break
        # never cut through a redaction: release up to its start, or past its end
        moved = True
        while moved:
            moved = False
            for f in self.findings:
                if f.action == "redact" and f.start < hold < f.end:
                    hold, moved = f.start, True
        hold = max(hold, self.sent)
        out = redact(text, self.sent, hold, list(self.findings))
        self.sent = hold
        if block is not None:
            self.blocked = True
        return out

    def _first_block(self) -> int | None:
        return min((f.start for f in self.findings if f.action == "block" and f.end > self.sent), default=None)
