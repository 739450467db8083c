"""Memory within the context window: what of a conversation is sent to the model.

The prompt is assembled under a token budget, in this order of priority:
  1. the persona (and its example dialogue, if there is room), with the entries of its card's
     lorebook that the recent turns bring in (the one lorebook engine, writing/lorebook.py),
     placed before or after the character, or as a message at a depth in the history; a card's
     post-history instructions go after the history, just before the reply,
  2. pinned facts ("my name is...", set by /pin or extracted from the user's words),
  3. the rolling summary of older turns,
  4. knowledge-base passages for the current question (placed just before it),
  5. the most recent turns, verbatim, newest first until the budget is spent.
Turns that no longer fit and are not yet summarised are folded into the summary by the model.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from llmos.cards import fill_macros
from llmos.writing.lorebook import MAX_STEPS, Activation, Fired, activate

LORE_SCAN_DEPTH = 2  # recent messages a lore entry searches, unless its book or itself says otherwise
LORE_SHARE = 4  # lore may take a quarter of the budget, unless its book sets a token_budget

FACT_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"\bmy name is ([A-Z][\w'-]*(?: [A-Z][\w'-]*)?)"), "The user's name is {0}."),
    (re.compile(r"\b(?:call me|i'?m called|i am called) ([A-Z][\w'-]*)", re.I), "The user's name is {0}."),
    (re.compile(r"\bmy (novel|story|book|poem|script|screenplay|play|game|series) is (set in|about|called|titled|named) ([^.!?\n]+)", re.I),
     "The user's {0} is {1} {2}."),
    (re.compile(r"\bi(?: am|'m) writing (an? [^.!?\n]+)", re.I), "The user is writing {0}."),
    (re.compile(r"\bi (live|work|study) (in|at) ([^.!?\n,]+)", re.I), "The user {0}s {1} {2}."),
    (re.compile(r"\bmy (order number|order) is #?(\w+)", re.I), "The user's {0} is {1}."),
    (re.compile(r"我叫([\u4e00-\u9fffA-Za-z]{1,8})"), "用户名叫{0}。"),
    (re.compile(r"我的名字是([\u4e00-\u9fffA-Za-z]{1,8})"), "用户名叫{0}。"),
    (re.compile(r"我的(小说|故事|书|剧本|诗)(?:的背景)?(设定在|发生在|叫|讲的是|写的是)([^，。！？,.!?\n]+)"), "用户的{0}{1}{2}。"),
    (re.compile(r"我(住在|在)([^，。！？,.!?\n]{1,12})(工作|上学|读书)?"), "用户{0}{1}{2}。"),
]


def extract_facts(text: str) -> list[str]:
    """Facts a user states about themselves or their work, as short sentences to pin."""
    facts = []
    for pattern, template in FACT_PATTERNS:
        for m in pattern.finditer(text):
            groups = [(g or "").strip() for g in m.groups()]
            fact = template.format(*groups).replace("  ", " ")
            if fact not in facts:
                facts.append(fact)
    return facts


@dataclass
class Context:
    messages: list[dict]
    tokens: int
    budget: int
    kept_turns: list[int] = field(default_factory=list)  # turn ids sent verbatim
    overflow: list[dict] = field(default_factory=list)  # unsummarised turns that did not fit
    passages: list = field(default_factory=list)  # knowledge-base hits sent
    lore: list[str] = field(default_factory=list)  # which lorebook entries fired, or were left out, and why

    def render(self) -> str:
        lines = [f"--- context: {self.tokens} of {self.budget} tokens, {len(self.kept_turns)} recent turns verbatim ---"]
        lines += [f"(lore) {line}" for line in self.lore]
        for m in self.messages:
            lines.append(f"[{m['role']}] {m['content']}")
        lines.append("--- end of context ---")
        return "\n".join(lines)


def system_text(persona, facts: list[str], summary: str, before: list[str] = (), after: list[str] = ()) -> str:
    """The system message: lore placed before the character, the persona, lore placed after it,
    pinned facts, the summary."""
    parts = [*before, persona.system_prompt(), *after]
    if facts:
        parts.append("Facts to remember:\n" + "\n".join(f"- {f}" for f in facts))
    if summary:
        parts.append(f"Summary of the conversation so far: {summary}")
    return "\n\n".join(parts)


def with_passages(question: str, passages: list) -> str:
    """The user's message with the knowledge-base passages right before it: small models heed
    text next to the question far better than text in the system prompt."""
    if not passages:
        return question
    refs = "\n".join(f"[{i}] ({h.source}{' - ' + h.heading if h.heading else ''}) {h.text}" for i, h in enumerate(passages, 1))
    return (f"Passages from the knowledge base:\n{refs}\n\nAnswer from these passages and cite them by number, "
            f"like [1]. If they do not contain the answer, say you do not know.\n\nQuestion: {question}")


def chat_lore(count_tokens, persona, turns: list[dict], budget: int, seed: int = 0) -> Activation:
    """The persona's lorebook entries that the recent turns bring in, within the lore budget."""
    from llmos.chat.personas import persona_lore

    entries, scan_depth, token_budget, recursive = persona_lore(persona)
    if not entries:
        return Activation()
    texts = [t["content"] for t in turns]
    default = LORE_SCAN_DEPTH if scan_depth is None else scan_depth

    def scan(depth: int | None) -> str:
        n = default if depth is None else depth
        return "\n".join(texts[-n:]) if n > 0 else ""

    def count(text: str) -> int:
        return count_tokens([{"role": "system", "content": text}])

    lore_budget = min(token_budget, budget // 2) if token_budget else budget // LORE_SHARE
    return activate(entries, scan, count, lore_budget, rng=random.Random(seed), max_steps=MAX_STEPS if recursive else 0)


def _lore_lines(lore: Activation) -> list[str]:
    lines = [f"{f.entry.label!r} fired ({f.entry.position.replace('_', ' ')}"
             + (f" {f.entry.depth}, as {f.entry.role}" if f.entry.position == "at_depth" else "") + f"): {f.why}"
             for f in lore.placed]
    lines += [f"{f.entry.label!r} left out: {f.why}" for f in lore.left_out]
    return lines + lore.warnings


def build_context(count_tokens, persona, facts: list[str], summary: str, summary_upto: int,
                  turns: list[dict], passages: list, budget: int) -> Context:
    """The messages to send. `turns` are the session's active turns, oldest first, the last
    one being the user's new message; `count_tokens(messages)` measures a prompt."""
    fresh = [t for t in turns if t["id"] > summary_upto]
    lore = chat_lore(count_tokens, persona, turns, budget, seed=turns[-1]["id"] if turns else 0)

    def text(fired: Fired) -> str:
        return fill_macros(fired.entry.content.strip(), persona.display_name)

    before = [text(f) for f in lore.at("before_char")]
    after = [text(f) for f in lore.at("after_char", "an_top", "an_bottom", "em_top", "em_bottom")]
    at_depth = [(f.entry.depth, {"role": f.entry.role, "content": text(f)}) for f in lore.at("at_depth")]
    for f in lore.at("outlet"):
        lore.left_out.append(Fired(f.entry, f"{f.why}: an outlet entry is placed only where a prompt names its outlet"))
    lore.placed = [f for f in lore.placed if f.entry.position != "outlet"]
    tail = [{"role": "system", "content": persona.post_history}] if persona.post_history else []
    if fresh and passages:  # the passages travel with the newest message (not stored with it)
        fresh = [*fresh[:-1], {**fresh[-1], "content": with_passages(fresh[-1]["content"], passages)}]
    newest = [{"role": t["role"], "content": t["content"]} for t in fresh[-1:]]

    def arrange(history: list[dict]) -> list[dict]:
        """The history with lore at its depths (0: after the last message) and the post-history
        instructions at the end."""
        out = list(history)
        for depth, message in sorted(at_depth, key=lambda d: d[0]):
            out.insert(len(out) - min(max(depth, 0), len(out)), message)
        return out + tail

    # the summary gives way (its oldest part first) before the persona, facts or the new message
    while True:
        system = {"role": "system", "content": system_text(persona, facts, summary, before, after)}
        if not summary or count_tokens([system, *arrange(newest)]) <= budget:
            break
        summary = summary[max(1, len(summary) // 4):] if len(summary) > 40 else ""
    kept: list[dict] = []
    for turn in reversed(fresh):  # newest first, while they fit
        trial = [system, *arrange([{"role": t["role"], "content": t["content"]} for t in [turn, *kept]])]
        if kept and count_tokens(trial) > budget:
            break
        kept.insert(0, turn)
    kept_ids = {t["id"] for t in kept}
    overflow = [t for t in fresh if t["id"] not in kept_ids]
    history = arrange([{"role": t["role"], "content": t["content"]} for t in kept])
    messages = [system, *history]
    # the persona's example dialogue only when there is room for it, no summary yet, and no
    # passages (with them, a small model copies the example instead of reading the passages)
    examples = persona.example_messages()
    if examples and not passages and not summary and not overflow and count_tokens([system, *examples, *history]) <= budget:
        messages = [system, *examples, *history]
    return Context(messages, count_tokens(messages), budget, [t["id"] for t in kept], overflow, list(passages),
                   _lore_lines(lore))


SUMMARY_INSTRUCTION = ("Write a short summary (at most 80 words) of the conversation below, for your own memory. "
                       "Keep names, facts about the user, decisions and open questions. Write only the summary.")


def summarise(llm, previous: str, turns: list[dict], persona_name: str, max_chars: int = 6000) -> str:
    """Fold `turns` (and the previous summary) into a new summary, written by the model."""
    transcript = "\n".join(f"{'User' if t['role'] == 'user' else persona_name}: {t['content']}" for t in turns)
    if len(transcript) > max_chars:  # the oldest part goes first if even the summary input is too long
        transcript = transcript[-max_chars:]
    body = (f"Summary so far: {previous}\n\n" if previous else "") + f"Conversation:\n{transcript}"
    messages = [{"role": "system", "content": SUMMARY_INSTRUCTION}, {"role": "user", "content": body}]
    params = llm.sampling(temperature=0.0, max_tokens=120, repetition_penalty=1.1)
    text = llm.generate(messages, params, truncate="left").completions[0].text.strip()
    if text:
        return text
    # the model wrote nothing usable: keep an extractive digest rather than lose the turns
    digest = "; ".join(f"the user said: {t['content'][:80]}" for t in turns if t["role"] == "user")
    return (f"{previous} {digest}".strip())[-600:]
