"""Named, seeded transforms that make new views of a document (`llmos prepare --augment`).

Each copy of a training document gets its own generator, seeded from the run's seed, the
document's number and the copy's number, so a corpus augments the same way every time and one
changed document leaves the others' views alone. A view keeps its source's group and label: it
is a positive for the contrastive objective, and more text for a small corpus. Validation
documents are never augmented.

- crop: a contiguous span of whole lines, 50 to 90% of the document (the first line starts
  anywhere); a document of one line is cut at word boundaries instead.
- shuffle: the sentences of each paragraph (blank-line separated) in a new order; a paragraph
  of one sentence stays as it is.
- backtranslate: each line translated into another language and back by a model: a
  paraphrase. The translator is given by the caller (`llmos.writing.paraphrase.BackTranslator`,
  which the CLI builds from --augment-model), since models sit above the data layer. Slow;
  asked for by name.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

TRANSFORMS = ("crop", "shuffle", "backtranslate")
SENTENCE_END = re.compile(r"(?<=[.!?。！？…])[\"'”’)\]]*\s+")


class AugmentError(ValueError):
    """An unknown transform or a setting that cannot work; the message says which."""


def crop(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    unit, joiner = (lines, "\n") if len(lines) >= 4 else (text.split(" "), " ")
    if len(unit) < 2:
        return text
    keep = max(1, round(len(unit) * rng.uniform(0.5, 0.9)))
    start = rng.randrange(0, len(unit) - keep + 1)
    return joiner.join(unit[start : start + keep]).strip() or text


def sentences(paragraph: str) -> list[str]:
    return [s for s in SENTENCE_END.split(paragraph.strip()) if s]


def shuffle(text: str, rng: random.Random) -> str:
    paragraphs = re.split(r"\n\s*\n", text)
    out = []
    for p in paragraphs:
        parts = sentences(p)
        if len(parts) > 1:
            rng.shuffle(parts)
            p = " ".join(s.strip() for s in parts)
        out.append(p)
    return "\n\n".join(out)


def parse(names: list[str] | str) -> list[str]:
    if isinstance(names, str):
        names = [names]
    chosen = [n.strip() for item in names for n in item.split(",") if n.strip()]
    for n in chosen:
        if n not in TRANSFORMS:
            raise AugmentError(f"unknown --augment transform {n!r}: choose from {', '.join(TRANSFORMS)}")
    return chosen


@dataclass
class Augmenter:
    names: list[str]
    copies: int = 1
    seed: int = 1337
    translator: object = None  # for backtranslate: (text, random.Random) -> text
    log: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.names = parse(self.names)
        if self.copies < 1:
            raise AugmentError(f"--augment-copies must be at least 1, got {self.copies}")
        if "backtranslate" in self.names and self.translator is None:
            raise AugmentError("--augment backtranslate needs a model to translate with: --augment-model MODEL")
        self.fns = {"crop": crop, "shuffle": shuffle}
        if "backtranslate" in self.names:
            self.fns["backtranslate"] = self.translator

    def views(self, index: int, text: str) -> list[tuple[str, str]]:
        """(transform, new text) for each copy of document `index`: the transforms applied in
        the order given. Copies identical to the source are dropped."""
        out = []
        for copy in range(self.copies):
            rng = random.Random(f"{self.seed}:{index}:{copy}")
            new = text
            for name in self.names:
                new = self.fns[name](new, rng)
            changed = changed_share(text, new)
            self.log.append({"document": index, "copy": copy, "transforms": "+".join(self.names),
                             "chars_before": len(text), "chars_after": len(new), "changed": round(changed, 3),
                             **({"kept": False} if new == text else {})})
            if new != text:
                out.append(("+".join(self.names), new))
        return out

    def summary(self) -> dict:
        kept = [r for r in self.log if r.get("kept", True)]
        return {
            "transforms": self.names, "copies": self.copies, "seed": self.seed,
            "views_added": len(kept), "views_unchanged": len(self.log) - len(kept),
            "chars_before": sum(r["chars_before"] for r in kept), "chars_after": sum(r["chars_after"] for r in kept),
            "mean_changed": round(sum(r["changed"] for r in kept) / max(len(kept), 1), 3),
        }


def changed_share(before: str, after: str) -> float:
    """The share of the source's lines (or words, for one-line texts) not found in the view in
    the same order: 0 for an identical copy, near 1 for a paraphrase."""
    import difflib

    a, b = before.split("\n"), after.split("\n")
    if len(a) < 4:
        a, b = before.split(), after.split()
    if not a:
        return 0.0
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return 1 - sum(m.size for m in matcher.get_matching_blocks()) / len(a)
