"""Verdicts in the shape of OpenAI's /v1/moderations results, so a client written for that
endpoint reads ours: {"flagged", "categories", "category_scores", "category_applied_input_types"}
with OpenAI's thirteen category names. Personal data has no OpenAI category: it is redacted, not
reported here."""

from __future__ import annotations

from dataclasses import replace

from llmos.safety.detectors import detectors_for
from llmos.safety.guard import Verdict, _classify, check_text, sentence_spans
from llmos.safety.policy import Policy

OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors",
    "violence", "violence/graphic",
)
# Each of our categories reports under these; a rule adds its own (rules.yaml, `openai:`).
OPENAI_OF = {
    "violence": ("violence",),
    "sexual_minors": ("sexual/minors",),
    "self_harm": ("self-harm",),
    "hate": ("hate",),
    "harassment": ("harassment",),
    "illegal_instructions": ("illicit",),
    "personal_data": (),
}


def _names(category: str, extra: tuple[str, ...]) -> tuple[str, ...]:
    return OPENAI_OF[category] + extra


def moderate(texts: str | list[str], policy: Policy) -> list[dict]:
    """One OpenAI-shaped moderation result per text. A category is flagged when a finding
    that maps to it acts (warn, redact or block); its score is the strongest evidence: 1.0 for
    a rule or word list, else the classifier's probability (reported even below its threshold)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    det = detectors_for(policy)
    results = []
    for text in texts:
        verdict = check_text(text, policy, classifier=False)
        flags = dict.fromkeys(OPENAI_CATEGORIES, False)
        scores = dict.fromkeys(OPENAI_CATEGORIES, 0.0)
        findings = list(verdict.findings)
        if policy.classifier:
            low = replace(policy, threshold=1e-6)  # every probability, to report scores
            for f in _classify(low, text, sentence_spans(text)):
                for name in _names(f.category, ()):
                    scores[name] = max(scores[name], f.score)
                if f.score >= policy.threshold:
                    findings.append(f)
        for f in findings:
            for name in _names(f.category, det.openai_of(f.rule)):
                scores[name] = max(scores[name], f.score)
                if f.action != "allow":
                    flags[name] = True
        acted = [f for f in findings if f.action != "allow"]
        results.append({"flagged": any(flags.values()), "categories": flags,
                        "category_scores": {k: round(v, 6) for k, v in scores.items()},
                        "category_applied_input_types": {k: ["text"] for k in OPENAI_CATEGORIES},
                        # beyond OpenAI's shape: the action the policy takes, and what fired (no text)
                        "action": Verdict(acted, text).action, "findings": [f.as_dict() for f in acted]})
    return results
