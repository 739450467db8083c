"""Which language a text is in, as far as choosing prompts and models needs to know."""

from __future__ import annotations

import re

_HAN = re.compile(r"[\u3400-\u9fff]")
# Han characters as a regex class body: CJK unified ideographs, extension A and compatibility
# ideographs (for text cut into single Han characters and other words).
HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"


def has_han(text: str) -> bool:
    """True if the text holds Chinese characters (CJK unified ideographs)."""
    return bool(_HAN.search(text or ""))


def detect(*texts: str) -> str:
    """'zh' if any of the texts holds Chinese characters, else 'en'."""
    return "zh" if any(has_han(t) for t in texts if t) else "en"
