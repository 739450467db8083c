"""A conversation: one chat session driven turn by turn (the REPL, piped input and tests use it).

Each user message goes through, in order: fact extraction (pinned), the persona's strategies
(farewell, hand-over, topic guard), FAQ answers from the knowledge base, and otherwise the
model, with the context assembled under the token budget (see memory.py). Every turn is
stored as it happens; a reply cut short (Ctrl-C) is stored with what was written so far.

Every reply a message got stays in the session (the ones /retry replaced inactive): they are its
alternatives, and a swipe makes another one the active reply, for the latest message only (the
turns after an older one answer the reply it has). The persona's greetings are the alternatives
of the opening turn until the first message.

Ratings, retries and swipes become preference pairs (data/prefs.py): two replies to one message
rated differently, and, when the writer goes on after a /retry or /swipe, the reply they kept
over the others.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from llmos.chat import memory, strategies
from llmos.chat.personas import Persona, load_persona, persona_from_dict
from llmos.chat.sessions import SessionError, Sessions
from llmos.data.prefs import Preferences
from llmos.explain import answer_overlap
from llmos.llm import ContentFiltered

RETRIEVE_K = 3
MIN_PASSAGE_SCORE = 0.25  # below this a passage is not about the question


@dataclass
class Alternatives:
    """The replies to one user message (or the persona's greetings), oldest first."""

    reply_to: int | None  # the user turn they answer; None for the greetings
    turns: list[dict]  # each with `active`; at most one is
    latest: bool  # the latest exchange: the only one a swipe may change

    @property
    def index(self) -> int | None:
        """Which alternative is the active one."""
        return next((i for i, t in enumerate(self.turns) if t["active"]), None)


@dataclass
class ChatSettings:
    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    budget: int | None = None  # prompt tokens; default: the model's context minus max_tokens
    extract_facts: bool = True


class Conversation:
    def __init__(self, llm, sessions: Sessions, session_id: int | None = None, persona: str | Persona | None = None,
                 kb=None, settings: ChatSettings | None = None):
        self.llm, self.sessions, self.kb = llm, sessions, kb
        self.settings = settings or ChatSettings()
        self.last_context: memory.Context | None = None
        self.last_action: strategies.Action | None = None
        self.on_context = None  # called with each assembled Context (for --show-context)
        self._reply_to: int | None = None  # the user turn being answered
        if session_id is None:
            self.persona = persona if isinstance(persona, Persona) else load_persona(persona)
            self.id = sessions.create(self.persona, llm.name, kb.name if kb else None)
            # the first greeting opens the chat; the others wait, inactive, for a swipe
            greetings = [g for g in (self.persona.greeting, *self.persona.alternate_greetings) if g.strip()]
            for i, greeting in enumerate(greetings):
                sessions.add_turn(self.id, "assistant", greeting, active=i == 0, greeting=True)
        else:
            row = sessions.get(session_id)
            self.id = session_id
            if persona is not None:
                self.switch_persona(persona)
            else:
                self.persona = persona_from_dict(json.loads(row["persona_data"]), f"session {session_id}")
            if row["status"] == "closed":
                sessions.update(self.id, status="open")
            if row["model"] != llm.name:  # the session goes on with another model: say so in it
                sessions.update(self.id, model=llm.name)

    # -- state --

    @property
    def row(self) -> dict:
        return self.sessions.get(self.id)

    def turns(self) -> list[dict]:
        return self.sessions.turns(self.id)

    @property
    def closed(self) -> bool:
        return self.row["status"] == "closed"

    @property
    def budget(self) -> int:
        if self.settings.budget:
            return self.settings.budget
        return max(256, self.llm.context_window - self.settings.max_tokens - 8)

    def count_tokens(self, messages: list[dict]) -> int:
        if getattr(self.llm, "tokenizer", None) is None:  # a remote model: about 4 characters a token
            return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)
        return len(self.llm.encode_prompt(messages))

    # -- a turn --

    def send(self, text: str) -> Iterator[str]:
        """Store the user's message and stream the reply (also stored)."""
        text = text.strip()
        if not text:
            raise ValueError("an empty message")
        self._record_kept()
        user_id = self.sessions.add_turn(self.id, "user", text)
        if self.settings.extract_facts:
            for fact in memory.extract_facts(text):
                self.sessions.add_fact(self.id, fact, source="extracted")
        yield from self._respond(text, user_id)

    def _respond(self, text: str, user_id: int) -> Iterator[str]:
        self._reply_to = user_id
        row = self.row
        unhappy = row["unhappy"] + 1 if strategies.is_unhappy(text) else 0
        action = strategies.evaluate(self.persona, text, row["unhappy"])
        self.last_action = action
        if action is not None:
            fields = {"unhappy": 0 if action.handover else unhappy}
            if action.close:
                fields["status"] = "closed"
            if action.handover:
                fields.update(handover=1, handover_reason=action.reason, status="handed over")
            self.sessions.update(self.id, **fields)
            self.sessions.add_turn(self.id, "assistant", action.reply, strategy=action.strategy, reason=action.reason,
                                   reply_to=user_id)
            yield action.reply
            return
        self.sessions.update(self.id, unhappy=unhappy)
        passages = []
        if self.kb is not None:
            threshold = float(self.persona.strategies.get("faq", {}).get("threshold", 0.8))
            faq = self.kb.faq_answer(text, threshold)
            if faq is not None:
                reply = f"{faq.answer}\n\nSource: {faq.source}"
                self.sessions.add_turn(self.id, "assistant", reply, strategy="faq", passage=faq.passage_id,
                                       score=round(faq.score, 4), reply_to=user_id)
                yield reply
                return
            passages = [h for h in self.kb.search(text, RETRIEVE_K) if h.score >= MIN_PASSAGE_SCORE]
        yield from self._generate(passages)

    def _context(self, passages: list) -> memory.Context:
        row = self.row
        facts = self.sessions.facts(self.id)
        ctx = memory.build_context(self.count_tokens, self.persona, facts, row["summary"], row["summary_upto"],
                                   self.turns(), passages, self.budget)
        if ctx.overflow:  # fold what no longer fits into the rolling summary, then assemble again
            summary = memory.summarise(self.llm, row["summary"], ctx.overflow, self.persona.name)
            self.sessions.update(self.id, summary=summary, summary_upto=ctx.overflow[-1]["id"])
            ctx = memory.build_context(self.count_tokens, self.persona, facts, summary, ctx.overflow[-1]["id"],
                                       self.turns(), passages, self.budget)
        return ctx

    def _generate(self, passages: list) -> Iterator[str]:
        ctx = self._context(passages)
        self.last_context = ctx
        if self.on_context:
            self.on_context(ctx)
        s = self.settings
        params = self.llm.sampling(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed)
        reply, finished, refused = "", False, False
        try:
            for delta in self.llm.stream(ctx.messages, params, truncate="left"):
                if delta.text:
                    reply += delta.text
                    yield delta.text
            finished = True
        except ContentFiltered:  # the safety policy refused the message: it is taken back, no reply kept
            refused = True
            raise
        finally:  # also when the reader stops early (Ctrl-C): keep what was written
            if refused:
                self.undo()
            else:
                yield from self._keep_reply(reply.strip(), finished, passages)

    def _keep_reply(self, reply: str, finished: bool, passages: list) -> Iterator[str]:
        """Store a reply (cut short or not) with its sources; yields the sources line it adds."""
        answer = reply
        if passages and finished:
            cites = "; ".join(f"[{i}] {h.source}{' - ' + h.heading if h.heading else ''}" for i, h in enumerate(passages, 1))
            tail = f"\n\nSources: {cites}"
            reply += tail
            yield tail
        meta = {"interrupted": True} if not finished else {}
        meta["reply_to"] = self._reply_to
        if passages:
            meta["passages"] = [h.passage_id for h in passages]
            meta["scores"] = [round(h.score, 4) for h in passages]
            # how much of the answer the cited passages account for (word trigrams they share)
            meta["overlap"] = answer_overlap(answer, passages)
        self.sessions.add_turn(self.id, "assistant", reply, **meta)

    # -- commands --

    def _last(self, role: str) -> dict | None:
        return next((t for t in reversed(self.turns()) if t["role"] == role and not t["meta"].get("greeting")), None)

    def retry(self) -> Iterator[str]:
        """A new reply to the last user message (the old one is kept, inactive)."""
        user = self._last("user")
        if user is None:
            raise SessionError("nothing to retry yet")
        self.sessions.deactivate([t["id"] for t in self.turns() if t["id"] > user["id"]])
        yield from self._respond(user["content"], user["id"])

    def alternatives(self, turn_id: int | None = None) -> Alternatives:
        """The replies to the message `turn_id` is (or answers), the one a reply is active among
        them; by default the last message's. Before the first message: the persona's greetings."""
        every = self.sessions.turns(self.id, include_inactive=True)
        user = self._last("user")
        if turn_id is None:
            target = user
        else:
            target = next((t for t in every if t["id"] == turn_id), None)
            if target is None:
                raise SessionError(f"no turn {turn_id} in chat session {self.id}")
            if target["role"] == "assistant" and not target["meta"].get("greeting"):
                reply_to = target["meta"].get("reply_to")
                if reply_to is None:
                    raise SessionError(f"turn {turn_id} was stored before replies recorded their message; "
                                       f"it has no alternatives")
                target = next(t for t in every if t["id"] == reply_to)
        if target is None or target["meta"].get("greeting"):
            greetings = [t for t in every if t["meta"].get("greeting")]
            return Alternatives(None, greetings, latest=user is None)
        replies = [t for t in every if t["role"] == "assistant" and t["meta"].get("reply_to") == target["id"]]
        return Alternatives(target["id"], replies, latest=user is not None and user["id"] == target["id"])

    def swipe(self, index: int | None = None, *, turn: int | None = None) -> Iterator[str]:
        """Make another alternative the active reply to the last message: by its index among
        `alternatives()` (one past the last writes a new one, as retry) or by its turn id. Yields
        the reply's text. Checked and done when called, before the first piece is read."""
        if (index is None) == (turn is None):
            raise ValueError("swipe to an index or to a turn id (one of them)")
        alts = self.alternatives(turn)
        n = len(alts.turns)
        what = "greetings" if alts.reply_to is None else "replies"
        if turn is not None:
            index = next((i for i, t in enumerate(alts.turns) if t["id"] == turn), None)
            if index is None:
                raise SessionError(f"turn {turn} is a message, not a reply: swipe to one of its replies "
                                   f"({', '.join(str(t['id']) for t in alts.turns) or 'none yet'})")
        if not alts.latest and alts.reply_to is None:
            raise SessionError("the greetings can be swiped only before the first message")
        if not alts.latest:
            siblings = {t["id"] for t in alts.turns}
            later = sum(1 for t in self.turns() if t["id"] > alts.reply_to and t["id"] not in siblings)
            raise SessionError(f"turn {alts.turns[index]['id']} answers an older message: swiping it would orphan the "
                               f"{later} turn(s) after it; only the last reply can be swiped (/undo back to it first)")
        if index == n and alts.reply_to is not None:
            return self.retry()
        if n == 0:
            raise SessionError(f"no {what} to swipe yet")
        if not 0 <= index < n:
            raise SessionError(f"no alternative {index}: the {what} are 0 to {n - 1}"
                               + (f" ({n} writes a new one)" if alts.reply_to is not None else ""))
        chosen = alts.turns[index]
        self.sessions.select(chosen["id"], [t["id"] for t in alts.turns])
        return iter([chosen["content"]])

    def undo(self) -> str:
        """Take back the last user message and the reply to it; returns the message."""
        user = self._last("user")
        if user is None:
            raise SessionError("nothing to undo")
        self.sessions.deactivate([t["id"] for t in self.turns() if t["id"] >= user["id"]])
        return user["content"]

    def edit(self, text: str) -> Iterator[str]:
        """Replace the last user message with `text` and reply again."""
        self.undo()
        yield from self.send(text)

    def rate(self, rating: int):
        """Rate the last reply: 1-5, or +1/-1 for thumbs up/down (stored as 5 and 1)."""
        if rating not in (1, 2, 3, 4, 5):
            raise ValueError("a rating is 1 to 5 (or up/down)")
        reply = self._last("assistant")
        if reply is None:
            raise SessionError("no reply to rate yet")
        self.sessions.rate(reply["id"], rating)
        replies = self._replies_to(reply["meta"].get("reply_to"))
        if len(replies) > 1:  # replies to the same message rated differently: preference pairs
            self._record(replies, source="chat-rating", ratings=[t["rating"] for t in replies])

    # -- preference pairs --

    def _replies_to(self, user_id: int | None) -> list[dict]:
        """Every reply to one user message, the ones /retry replaced included."""
        if user_id is None:
            return []
        return [t for t in self.sessions.turns(self.id, include_inactive=True)
                if t["role"] == "assistant" and t["meta"].get("reply_to") == user_id and t["content"].strip()]

    def _record(self, replies: list[dict], source: str, kept: int | None = None, ratings=None):
        user_id = replies[0]["meta"]["reply_to"]
        Preferences(self.sessions.store).record_choice(
            self._pair_prompt(user_id), [t["content"] for t in replies], kept=kept, ratings=ratings, source=source,
            model=self.llm.name, meta={"session": self.id, "turn": user_id})

    def _pair_prompt(self, user_id: int) -> list[dict]:
        """The prompt a reply answered, rebuilt for training: the persona with the pinned facts
        and summary, then the active turns up to the message (knowledge passages left out)."""
        row = self.row
        system = memory.system_text(self.persona, self.sessions.facts(self.id), row["summary"])
        turns = [{"role": t["role"], "content": t["content"]} for t in self.turns()
                 if row["summary_upto"] < t["id"] <= user_id]
        return [{"role": "system", "content": system}, *turns]

    def _record_kept(self):
        """The writer goes on after a /retry or /swipe: the reply they kept over the others."""
        last = self._last("assistant")
        replies = self._replies_to(last["meta"].get("reply_to")) if last and last["content"].strip() else []
        if len(replies) > 1 and not last["meta"].get("strategy"):
            kept = next(i for i, t in enumerate(replies) if t["id"] == last["id"])
            self._record(replies, source="chat-retry", kept=kept, ratings=[t["rating"] for t in replies])

    def pin(self, fact: str) -> bool:
        return self.sessions.add_fact(self.id, fact, source="user")

    def switch_persona(self, persona: str | Persona):
        self.persona = persona if isinstance(persona, Persona) else load_persona(persona)
        self.sessions.update(self.id, persona=self.persona.name,
                             persona_data=json.dumps(self.persona.to_dict(), ensure_ascii=False))
