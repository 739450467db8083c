"""The content policy: which categories exist, what each does when it fires, and the switches
for the classifier and the audit log. A policy is a YAML file; the shipped default is
llmos/safety/data/policy.yaml (`llmos safety policy` prints it for copying)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmos.safety.rules import DATA, rule_ids

DEFAULT_POLICY = DATA / "policy.yaml"

CATEGORIES = ("violence", "sexual_minors", "self_harm", "hate", "harassment", "illegal_instructions", "personal_data")
ACTIONS = ("allow", "warn", "redact", "block")  # weakest first: a verdict takes the strongest that fired
LANGUAGES = ("en", "zh")
RANK = {a: i for i, a in enumerate(ACTIONS)}


class PolicyError(ValueError):
    pass


@dataclass
class Policy:
    actions: dict[str, str]  # category -> action
    rule_actions: dict[str, str] = field(default_factory=dict)  # rule id -> action, overriding its category's
    languages: tuple[str, ...] = LANGUAGES
    classifier: bool = True
    stream_classifier: bool = False
    threshold: float = 0.8
    classifier_max_action: str = "warn"
    classifier_languages: tuple[str, ...] = ("en",)  # sentences in these languages are classified
    store_text: bool = False
    extra_words: dict[str, list[str]] = field(default_factory=dict)  # category -> phrases the writer adds
    source: str = "default"

    def action_for(self, category: str, rule: str, source: str) -> str:
        action = self.rule_actions.get(rule, self.actions.get(category, "allow"))
        if source == "classifier" and RANK[action] > RANK[self.classifier_max_action]:
            action = self.classifier_max_action
        return action

    def key(self) -> tuple:
        """What decides which detectors run (a compiled detector set is cached by it)."""
        return (tuple(sorted(self.actions.items())), tuple(sorted(self.rule_actions.items())), self.languages,
                tuple((c, tuple(w)) for c, w in sorted(self.extra_words.items())))


def _action(value, where: str) -> str:
    if value not in ACTIONS:
        raise PolicyError(f"{where}: unknown action {value!r}; use one of {', '.join(ACTIONS)}")
    return value


def policy_from_dict(data: dict, source: str = "<dict>") -> Policy:
    """Validate a parsed policy; every error names the file and key and says what to write."""
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: a policy is a YAML mapping with a `categories:` key")
    known = {"version", "languages", "categories", "classifier", "audit", "words"}
    if unknown := sorted(set(data) - known):
        raise PolicyError(f"{source}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(known))}")
    cats = data.get("categories") or {}
    if not isinstance(cats, dict):
        raise PolicyError(f"{source}: `categories` must map each category to its action")
    actions = {c: "allow" for c in CATEGORIES}
    rule_actions = {}
    for name, spec in cats.items():
        if name not in CATEGORIES:
            raise PolicyError(f"{source}: categories.{name}: unknown category; use one of {', '.join(CATEGORIES)}")
        if isinstance(spec, str):  # `violence: warn` is short for `violence: {action: warn}`
            spec = {"action": spec}
        if not isinstance(spec, dict) or "action" not in spec:
            raise PolicyError(f"{source}: categories.{name}: give an action, e.g. `{name}: {{action: warn}}`")
        if extra := sorted(set(spec) - {"action", "rules"}):
            raise PolicyError(f"{source}: categories.{name}.{extra[0]}: unknown key; a category takes `action` and `rules`")
        actions[name] = _action(spec["action"], f"{source}: categories.{name}.action")
        rules = spec.get("rules") or {}
        if not isinstance(rules, dict):
            raise PolicyError(f"{source}: categories.{name}.rules must map rule ids to actions")
        for rule, action in rules.items():
            if str(rule) not in rule_ids():
                raise PolicyError(f"{source}: categories.{name}.rules.{rule}: unknown rule id; "
                                  "the ids are in llmos/safety/data/rules.yaml (and pii_*, words_<category>_<en|zh|policy>)")
            rule_actions[str(rule)] = _action(action, f"{source}: categories.{name}.rules.{rule}")

    langs = data.get("languages", list(LANGUAGES))
    if not isinstance(langs, list) or any(x not in LANGUAGES for x in langs):
        raise PolicyError(f"{source}: languages: give a list drawn from {', '.join(LANGUAGES)}, e.g. [en, zh]")

    clf = data.get("classifier", {})
    if isinstance(clf, bool):
        clf = {"enabled": clf}
    if not isinstance(clf, dict) or set(clf) - {"enabled", "stream", "threshold", "max_action", "languages"}:
        raise PolicyError(f"{source}: classifier takes enabled, stream, threshold, max_action and languages")
    clf_langs = clf.get("languages", ["en"])
    if not isinstance(clf_langs, list) or any(x not in LANGUAGES for x in clf_langs):
        raise PolicyError(f"{source}: classifier.languages: give a list drawn from {', '.join(LANGUAGES)}, e.g. [en]")
    threshold = clf.get("threshold", 0.8)
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold <= 1:
        raise PolicyError(f"{source}: classifier.threshold must be a probability in (0, 1], got {threshold!r}")

    audit = data.get("audit") or {}
    if not isinstance(audit, dict) or set(audit) - {"store_text"}:
        raise PolicyError(f"{source}: audit takes one key, store_text: true or false")

    words = data.get("words") or {}
    if not isinstance(words, dict):
        raise PolicyError(f"{source}: words must map categories to lists of phrases")
    for name, phrases in words.items():
        if name not in CATEGORIES:
            raise PolicyError(f"{source}: words.{name}: unknown category; use one of {', '.join(CATEGORIES)}")
        if not isinstance(phrases, list) or not all(isinstance(p, str) and p.strip() for p in phrases):
            raise PolicyError(f"{source}: words.{name} must be a list of non-empty phrases")

    return Policy(actions=actions, rule_actions=rule_actions, languages=tuple(langs),
                  classifier=bool(clf.get("enabled", True)), stream_classifier=bool(clf.get("stream", False)),
                  threshold=float(threshold),
                  classifier_max_action=_action(clf.get("max_action", "warn"), f"{source}: classifier.max_action"),
                  classifier_languages=tuple(clf_langs),
                  store_text=bool(audit.get("store_text", False)),
                  extra_words={k: [p.strip() for p in v] for k, v in words.items()}, source=source)


def load_policy(path: str | Path | None = None) -> Policy:
    """The shipped default policy (None) or a YAML file. Raises PolicyError with one line."""
    path = Path(path) if path is not None else DEFAULT_POLICY
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PolicyError(f"cannot read policy {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text; save the policy as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise PolicyError(f"{path}: not valid YAML{at}; compare with `llmos safety policy`") from None
    return policy_from_dict(data, str(path) if path != DEFAULT_POLICY else "default policy")


def default_policy_text() -> str:
    return DEFAULT_POLICY.read_text(encoding="utf-8")
