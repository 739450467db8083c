"""Dialogue strategies: rules checked on every user turn, declared in the persona file.

- farewell: "bye", "see you", "再见", "拜拜"... -> a fitting goodbye, and the session closes;
- topic_guard: a message that names a denied topic (or, with an `allow` list, none of the
  allowed ones) is declined politely;
- handover: a request for a human, or `after_unhappy` unhappy messages in a row -> a message,
  and the session is flagged for a person to pick up.
A strategy that fires answers instead of the model. Replies come in the user's language.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmos.chat.personas import Persona

FAREWELL = {
    "en": re.compile(r"\b(good\s*bye|bye(\s*bye)?|see you( later| soon)?|farewell|good\s*night|that'?s all for (now|today)|"
                     r"i have to go|gotta go|talk (to you )?later|take care)\b", re.I),
    "zh": re.compile(r"(再见|拜拜|回头见|下次见|明天见|晚安|先走了|告辞|就到这里)"),
}
HUMAN = {
    "en": re.compile(r"\b(human|real person|a person|an agent|live agent|operator|manager|someone real|speak to (someone|somebody))\b", re.I),
    "zh": re.compile(r"(人工|真人|转人工|客服人员|找你们经理|经理)"),
}
UNHAPPY = {
    "en": re.compile(r"\b(useless|not helpful|unhelpful|terrible|awful|ridiculous|angry|annoyed|frustrat\w*|"
                     r"doesn'?t help|didn'?t help|not what i asked|wrong again|waste of time|still (not|no)\b)", re.I),
    "zh": re.compile(r"(没用|不满意|太差|生气|垃圾|气死|没帮助|答非所问|浪费时间|还是不行)"),
}
DEFAULT_REPLIES = {
    "farewell": {"en": "Goodbye!", "zh": "再见！"},
    "topic_guard": {"en": "Sorry, I can't help with that here.", "zh": "抱歉，这个问题我在这里帮不上忙。"},
    "handover": {"en": "I'm passing this conversation to a person, who will get back to you.",
                 "zh": "我会把对话转给工作人员，他们会尽快联系您。"},
}


@dataclass
class Action:
    strategy: str  # "farewell", "topic_guard", "handover"
    reply: str
    close: bool = False  # end the session
    handover: bool = False  # flag it for a person
    reason: str = ""


def language_of(text: str) -> str:
    han = sum(1 for c in text if "\u4e00" <= c <= "\u9fff")
    return "zh" if han and han * 3 >= len(text.replace(" ", "")) * 0.5 else "en"


def _reply(persona: Persona, strategy: str, lang: str) -> str:
    reply = persona.strategies.get(strategy, {}).get("reply")
    if isinstance(reply, str):
        return reply
    return (reply or {}).get(lang) or DEFAULT_REPLIES[strategy][lang]


def _matches(patterns: dict, text: str) -> bool:
    return any(p.search(text) for p in patterns.values())


def is_unhappy(text: str) -> bool:
    return _matches(UNHAPPY, text)


def evaluate(persona: Persona, text: str, unhappy_streak: int) -> Action | None:
    """The first strategy of the persona that fires on this user message, if any.
    `unhappy_streak` counts unhappy user messages in a row before this one."""
    lang = language_of(text)
    s = persona.strategies
    if "farewell" in s and _matches(FAREWELL, text):
        return Action("farewell", _reply(persona, "farewell", lang), close=True)
    if "handover" in s:
        if _matches(HUMAN, text):
            return Action("handover", _reply(persona, "handover", lang), handover=True, reason="asked for a person")
        limit = int(s["handover"].get("after_unhappy", 2))
        if is_unhappy(text) and unhappy_streak + 1 >= limit:
            return Action("handover", _reply(persona, "handover", lang), handover=True,
                          reason=f"unhappy {unhappy_streak + 1} times in a row")
    if "topic_guard" in s:
        guard = s["topic_guard"]
        low = text.lower()
        denied = [w for w in guard.get("deny", []) if w.lower() in low]
        allowed = guard.get("allow", [])
        off = bool(denied) or (bool(allowed) and not any(w.lower() in low for w in allowed))
        if off:
            return Action("topic_guard", _reply(persona, "topic_guard", lang),
                          reason=f"off topic ({denied[0]})" if denied else "off topic")
    return None
