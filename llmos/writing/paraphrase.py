"""Paraphrase by back-translation, for `llmos prepare --augment backtranslate`: each line of a
text translated into Chinese and back with the `translate` task's own prompts (it translates
between English and Chinese; the multilingual gemma3-270m is the bundled model that can), at
temperature 0.7. The data layer's Augmenter calls it with a seeded generator per view.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

LABEL = re.compile(r"^(English|Chinese|英文|中文)\s*[:：]\s*", re.I)


@dataclass
class BackTranslator:
    """Paraphrase English by translating it into Chinese and back with `model` (a model name or path)."""

    model: str
    llm: object = field(default=None, repr=False)

    def __call__(self, text: str, rng: random.Random) -> str:
        from llmos.llm import LLM
        from llmos.writing.tasks import WriteRequest, prepare_write

        if self.llm is None:
            self.llm = LLM.load(self.model, precision="fp32")
        out = []
        for line in text.split("\n"):
            piece = line
            if line.strip():
                for target, source in (("zh", "en"), ("en", "zh")):
                    seed = rng.randrange(2**31)
                    req = WriteRequest("translate", piece, {"to": target}, source, None, 1,
                                       {"temperature": 0.7, "seed": seed, "max_tokens": min(256, len(piece) + 16)})
                    prompt, params, stops, _ = prepare_write(self.llm, req)
                    said = self.llm.generate(prompt, params, stop=stops).completions[0].text
                    # a base model may answer with the few-shot prompt's next label: keep the line then
                    said = LABEL.sub("", said.strip()).strip()
                    if not said:
                        piece = line
                        break
                    piece = said
            out.append(piece)
        return "\n".join(out)
