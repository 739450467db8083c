"""Text in, text out: a loaded model with its tokenizer and prompt style, over the engine.

This is the layer that knows about text: prompts and chat templates become token ids, token
ids become streamed text (`TextHook`, the engine's per-request hook), and stop strings end
sequences. Writing, chat and the server all generate through `LLM`: `request` builds the
engine request, `stream` runs it, on an engine of its own or, inside a server, through the
server's scheduler (`with_driver`), so that every caller shares one batch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmos.engine import generate as engine
from llmos.engine.beam import beam_search
from llmos.engine.generate import ContextError, Event, Request, Rewind, Timings, TokenLogprob
from llmos.engine.sampling import SamplingParams
from llmos.weights.store import LoadedModel, load

TRUNCATION = ("error", "left")


@dataclass
class Delta:
    """A piece of streamed output for candidate `index`."""

    index: int
    text: str
    token: int | None = None
    logprob: TokenLogprob | None = None


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None  # beam search: the hypothesis' summed log-probability
    safety: dict | None = None  # what the safety policy found in the text (Verdict.as_dict()), when one is on


@dataclass
class Result:
    prompt: str
    prompt_tokens: int
    completions: list[Completion]
    timings: dict = field(default_factory=dict)
    truncated_tokens: int = 0


class ContentFiltered(ValueError):
    """A prompt stopped by a block rule of the safety policy."""

    def __init__(self, verdict):
        self.verdict = verdict
        fired = verdict.blocking[0]
        super().__init__(f"the prompt was refused by the safety policy ({fired.category}: {fired.rule}); "
                         f"rephrase it, or edit the policy (`llmos safety policy` prints the default)")


class StopStrings:
    """Cuts a candidate's text at the first stop string, holding back any tail that might be
    the beginning of one so that streamed text never has to be taken back."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters already released
        self.hit = False

    def feed(self, piece: str) -> str:
        self.text += piece
        if not self.stops:
            out, self.sent = self.text[self.sent :], len(self.text)
            return out
        cut = min((i for s in self.stops if (i := self.text.find(s, max(0, self.sent - len(s)))) >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            self.text = self.text[:cut]
            out, self.sent = self.text[self.sent :], len(self.text)
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        safe = len(self.text) - hold
        out, self.sent = self.text[self.sent : safe], max(self.sent, safe)
        return out

    def finish(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


MAX_REWINDS = 8  # rewinds to one position before a banned string found there is let through


def banned_pattern(strings: list[str], as_regex: bool = False):
    """One case-insensitive pattern for banned strings. Plain strings are literal and, when ASCII,
    matched as whole words (as llmos eval counts slop, so
    "delve into" does not ban "delve intone"); with as_regex each string is a regular expression
    (the `regex` module's syntax). A bad expression raises ValueError."""
    import regex

    parts = []
    for s in strings:
        if not s:
            continue
        if as_regex:
            try:
                regex.compile(s)
            except regex.error as e:
                raise ValueError(f"banned string {s!r} is not a valid regular expression ({e}); "
                                 f"fix it, or send the strings as plain text (banned_regex off)") from None
            parts.append(f"(?:{s})")
        else:
            whole = s.isascii()  # Chinese has no spaces between words: there a phrase is matched anywhere
            lead = r"(?<!\w)" if whole and regex.match(r"\w", s) else ""
            tail = r"(?!\w)" if whole and regex.search(r"\w$", s) else ""
            parts.append(lead + regex.escape(s) + tail)
    return regex.compile("|".join(parts), regex.IGNORECASE | regex.V0) if parts else None


class BannedText:
    """One candidate's text checked against banned strings as tokens arrive. Text is passed on
    only once no banned string can still complete within it; what may still become one is held
    back, from the start of the token where it begins, the way the safety StreamGuard holds a
    partial match (the `regex` module's partial matching, a match that the end of the text may
    still change counting as open). A complete match asks for a rewind to the token where it
    began; after MAX_REWINDS at one position it is let through, so generation always ends."""

    def __init__(self, pattern, as_regex: bool = False):
        self.pattern, self.regex = pattern, as_regex
        self.text = ""  # the accepted text of the candidate so far
        self.ends: list[int] = []  # len(self.text) after each token
        self.tokens: list[int] = []
        self.sent = 0  # characters passed on
        self.rewinds: dict[int, int] = {}  # token position -> rewinds there
        self.allowed: set[int] = set()  # starts of matches let through after too many rewinds

    def _token_at(self, char: int) -> int:
        """The token whose text holds character `char` (the first of the tokens that emitted
        nothing before it: their bytes are part of it)."""
        k = next((i for i, e in enumerate(self.ends) if e > char), len(self.ends))
        while k > 0 and self.ends[k - 1] == (self.ends[k - 2] if k >= 2 else 0):
            k -= 1
        return k

    def _start_of(self, token: int) -> int:
        return self.ends[token - 1] if token > 0 else 0

    def _open(self, m) -> bool:
        """May more text still undo this match? A partial one, or one at the very end that a
        following letter would stop being a whole word (any, for a regular expression: it may
        end in a lookahead). A match that may only grow is banned as it is."""
        if m.partial:
            return True
        if m.end() < len(self.text):
            return False
        return self.regex or (m.group()[-1:].isascii() and (m.group()[-1:].isalnum() or m.group()[-1:] == "_"))

    def _scan(self, final: bool) -> tuple[int | None, int]:
        """(start of the first complete banned match, or None; where held text begins)."""
        hold = len(self.text)
        for m in self.pattern.finditer(self.text, self.sent, partial=not final, overlapped=True):
            if m.start() in self.allowed or m.start() >= len(self.text):
                continue
            if not final and self._open(m):
                hold = min(hold, m.start())
            else:
                return m.start(), hold
        return None, hold

    def feed(self, token: int, piece: str) -> str | Rewind:
        """The text to pass on after this token, or the Rewind it calls for."""
        self.tokens.append(token)
        self.text += piece
        self.ends.append(len(self.text))
        while True:
            banned, hold = self._scan(final=False)
            if banned is None:
                break
            rewind = self._rewind(banned)  # None: let through (now allowed), so scan again
            if rewind is not None:
                return rewind
        boundary = self._start_of(self._token_at(hold)) if hold < len(self.text) else hold
        boundary = max(self.sent, boundary)
        out, self.sent = self.text[self.sent : boundary], boundary
        return out

    def _rewind(self, start: int) -> Rewind | None:
        k = self._token_at(start)
        self.rewinds[k] = self.rewinds.get(k, 0) + 1
        if self.rewinds[k] > MAX_REWINDS:
            self.allowed.add(start)
            return None
        cut = self._start_of(k)
        self.text, self.sent = self.text[:cut], min(self.sent, cut)
        del self.ends[k:], self.tokens[k:]
        return Rewind(k)

    def at_end(self) -> Rewind | None:
        """A banned string that only the end of the text completes (a whole word at the very end)."""
        banned, _ = self._scan(final=True)
        return self._rewind(banned) if banned is not None else None

    def finish(self, piece: str = "") -> str:
        """The rest of the text, cut before any banned string still in it (an end the candidate
        was not asked about: a deadline, a stop string)."""
        self.text += piece
        banned, _ = self._scan(final=True)
        end = banned if banned is not None else len(self.text)
        out, self.sent = self.text[self.sent : max(end, self.sent)], len(self.text)
        return out


class TextHook:
    """The text side of one request, plugged into the engine: each candidate's tokens are
    detokenized as they stream, checked against banned strings (a banned string rewinds the
    candidate), cut at the first stop string and, when a safety policy is on, passed through
    that candidate's guard (redactions applied; a block rule ends the candidate with finish
    reason "content_filter")."""

    def __init__(self, tokenizer, n: int, stops: list[str], truncated: int = 0, guards: list | None = None,
                 banned=None, banned_regex: bool = False):
        self.tokenizer = tokenizer
        self.decoders = [tokenizer.stream() for _ in range(n)]
        # banned: the pattern of banned_pattern
        self.bans = [BannedText(banned, banned_regex) for _ in range(n)] if banned is not None else None
        self.cutters = [StopStrings(stops) for _ in range(n)]
        self.guards = guards  # one llmos.safety.StreamGuard per candidate, or None
        self.released = [""] * n  # each candidate's text as streamed
        self.audited = False  # its safety findings are in the audit log (LLM.audit_outputs)
        self.truncated = truncated  # prompt tokens dropped from the left to fit the context

    def _release(self, index: int, text: str, end: bool = False) -> str:
        if self.guards is not None:
            guard = self.guards[index]
            text = guard.feed(text) + (guard.finish() if end and not guard.blocked else "")
        self.released[index] += text
        return text

    def token(self, index: int, token: int) -> tuple[str, bool | str | Rewind]:
        cutter = self.cutters[index]
        piece = self.decoders[index].push(token)
        if self.bans is not None:
            piece = self.bans[index].feed(token, piece)
            if isinstance(piece, Rewind):
                return "", self._rewound(index, piece)
        text = self._release(index, cutter.feed(piece), end=cutter.hit)
        if self.guards is not None and self.guards[index].blocked:
            return text, "content_filter"
        return text, cutter.hit

    def _rewound(self, index: int, rewind: Rewind) -> Rewind:
        """The candidate's decoder as it was after the tokens the rewind keeps."""
        decoder = self.decoders[index] = self.tokenizer.stream()
        for t in self.bans[index].tokens:
            decoder.push(t)
        return rewind

    def at_end(self, index: int) -> Rewind | None:
        if self.bans is None:
            return None
        rewind = self.bans[index].at_end()
        return self._rewound(index, rewind) if rewind is not None else None

    def finish(self, index: int) -> str:
        cutter = self.cutters[index]
        if cutter.hit or (self.guards is not None and self.guards[index].blocked):
            return ""
        piece = self.decoders[index].flush()
        if self.bans is not None:
            piece = self.bans[index].finish(piece)
        return self._release(index, cutter.feed(piece) + cutter.finish(), end=True)

    @property
    def texts(self) -> list[str]:
        """Each candidate's text so far (what was streamed, without any held-back tail)."""
        return list(self.released)

    @property
    def verdicts(self) -> list | None:
        """Each candidate's safety verdict so far (None when no policy is on)."""
        return None if self.guards is None else [g.verdict for g in self.guards]


Driver = Callable[[Request], Iterator[list[Event]]]


class LLM:
    def __init__(self, loaded: LoadedModel, driver: Driver | None = None):
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.defaults = dict(loaded.meta.get("generation", {}))
        # How requests run: None, on an engine of their own; a server's scheduler, in its batch.
        self.driver = driver
        # The safety policy prompts and outputs are checked against (llmos.safety.Policy; None: off),
        # and where what it finds is recorded: audit(where, verdict), e.g. into the store's audit log.
        self.safety = None
        self.audit: Callable | None = None

    def with_driver(self, driver: Driver) -> LLM:
        """The same model and tokenizer, generating through `driver` (a server's scheduler)."""
        other = copy.copy(self)
        other.driver = driver
        return other

    @classmethod
    def load(cls, name_or_path: str | Path | None = None, precision: str = "auto", progress=None) -> LLM:
        return cls(load(name_or_path, precision, progress))

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def context_window(self) -> int:
        return self.model.config.max_seq_len

    def sampling(self, **overrides) -> SamplingParams:
        """SamplingParams from the model's defaults, overridden by the non-None arguments."""
        values = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        return SamplingParams(**values)

    def encode_prompt(self, prompt: str | list[dict], chat: bool | None = None) -> list[int]:
        """A string is completed as is, unless chat=True wraps it as one user message; a list
        of {"role", "content"} messages goes through the chat template."""
        if isinstance(prompt, list):
            return self.tokenizer.encode_chat(prompt)
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def _fit(self, ids: list[int], max_tokens: int, truncate: str) -> tuple[list[int], int]:
        ctx = self.context_window
        if truncate not in TRUNCATION:
            raise ValueError(f"truncate must be one of {', '.join(TRUNCATION)}, got {truncate!r}")
        if len(ids) < ctx or truncate == "error":
            return ids, 0
        # Keep the most recent text, and room for at least a quarter of the requested tokens.
        keep = max(1, ctx - max(1, min(max_tokens, ctx // 4)))
        head = ids[:1] if self.tokenizer.bos_id is not None and ids[0] == self.tokenizer.bos_id else []
        kept = head + ids[len(ids) - keep + len(head) :]
        return kept, len(ids) - len(kept)

    def request(
        self,
        prompt: str | list[dict],
        params: SamplingParams | None = None,
        n: int = 1,
        stop: list[str] | None = None,
        chat: bool | None = None,
        truncate: str = "error",
        ignore_eos: bool = False,
        empty_ok: bool = False,
        banned_strings: list[str] | None = None,
        banned_regex: bool = False,
    ) -> Request:
        """The engine request for a prompt: token ids, the model's end tokens (unless
        ignore_eos), and a TextHook with the stop strings (the chat template's too). empty_ok:
        an empty prompt starts from the beginning-of-text token (a story's first words).
        banned_strings: text never to produce, in any case and any tokenisation; when a candidate
        completes one it is rewound to where that began and samples again (with banned_regex,
        each is a regular expression); see BannedText."""
        banned = banned_pattern(banned_strings, banned_regex) if banned_strings else None
        params = params or self.sampling()
        ids, dropped = self._fit(self.encode_prompt(prompt, chat), params.max_tokens, truncate)
        if not ids and empty_ok:
            ids = [self.tokenizer.bos_id if self.tokenizer.bos_id is not None else 0]
        stops = list(stop or [])
        if isinstance(prompt, list) or chat:
            stops += self.tokenizer.chat_stop_strings()
        if not ignore_eos:
            params = replace(params, stop_token_ids=sorted(set(params.stop_token_ids) | set(self.tokenizer.stop_ids)))
        return Request(ids, params, n, TextHook(self.tokenizer, n, stops, dropped, self._guards(prompt, n), banned,
                                                banned_regex))

    def _guards(self, prompt: str | list[dict], n: int) -> list | None:
        """With a safety policy on: check the prompt's newest text (a chat's last user message;
        earlier turns were checked when they were new), raise ContentFiltered when a block rule
        fires, and give each candidate a stream guard. A prompt is checked, never changed: what
        a redact rule finds in it is recorded, not removed."""
        if self.safety is None:
            return None
        from llmos.safety import StreamGuard, check_text

        if isinstance(prompt, list):
            newest = next((m.get("content") or "" for m in reversed(prompt) if m.get("role") == "user"), "")
        else:
            newest = prompt
        # the classifier runs here as on streams: only when the policy turns it on for them
        verdict = check_text(newest, self.safety, classifier=self.safety.stream_classifier)
        if verdict.findings and self.audit is not None:
            self.audit("prompt", verdict)
        if verdict.blocked:
            raise ContentFiltered(verdict)
        return [StreamGuard(self.safety) for _ in range(n)]

    def audit_outputs(self, req: Request):
        """Record what the safety policy found in a finished request's outputs (once)."""
        hook = req.hook
        if self.audit is None or not isinstance(hook, TextHook) or hook.verdicts is None or hook.audited:
            return
        hook.audited = True
        for verdict in hook.verdicts:
            if verdict.findings:
                self.audit("output", verdict)

    def run(self, req: Request) -> Iterator[list[Event]]:
        """Each step's events for a request, until it ends; closing the iterator cancels it."""
        if self.driver is not None:
            return self.driver(req)
        return engine.run(self.model, req)

    def stream(
        self,
        prompt: str | list[dict],
        params: SamplingParams | None = None,
        n: int = 1,
        stop: list[str] | None = None,
        chat: bool | None = None,
        truncate: str = "error",
        result: Result | None = None,
        banned_strings: list[str] | None = None,
        banned_regex: bool = False,
    ) -> Iterator[Delta]:
        """Yield text deltas as they are generated; `result`, when given, is filled in as the
        stream ends (completions, finish reasons, timings). banned_strings (regular expressions
        with banned_regex) are never produced: see `request`. Streamed text is never taken back;
        a token id in a delta may be (its text was held back, then rewound)."""
        t0 = time.perf_counter()
        req = self.request(prompt, params, n, stop, chat, truncate, banned_strings=banned_strings,
                           banned_regex=banned_regex)
        stop_ids = req.params.stop_token_ids
        steps = self.run(req)
        try:
            for events in steps:
                for e in events:
                    if e.finish_reason == "error":
                        raise RuntimeError(f"generation failed: {e.text}")
                    if e.finish_reason is None and e.token not in stop_ids:
                        yield Delta(e.index, e.text, e.token, e.logprob)
        finally:
            steps.close()  # a reader that stops early cancels the request
            self.audit_outputs(req)
        if result is not None:
            self.result(prompt, req, result)
            result.timings["total_s"] = round(time.perf_counter() - t0, 4)

    def result(self, prompt: str | list[dict], req: Request, into: Result | None = None) -> Result:
        """The Result of a finished request made by `request` (texts, token ids, logprobs, timings)."""
        into = into or Result("", 0, [])
        hook = req.hook
        into.prompt = prompt if isinstance(prompt, str) else self.tokenizer.decode(req.prompt, False)
        into.prompt_tokens = len(req.prompt)
        into.truncated_tokens = hook.truncated
        stop_ids = req.params.stop_token_ids
        verdicts = hook.verdicts or [None] * len(req.sequences)
        into.completions = [
            Completion(i, hook.texts[i], [t for t in seq.output if t not in stop_ids], seq.finish_reason,
                       seq.logprobs if req.params.logprobs is not None else None,
                       safety=v.as_dict() if v is not None else None)
            for (i, seq), v in zip(enumerate(req.sequences), verdicts)
        ]
        into.timings = req.timings.as_dict()
        return into

    def generate(self, prompt: str | list[dict], params: SamplingParams | None = None, n: int = 1,
                 stop: list[str] | None = None, chat: bool | None = None, truncate: str = "error",
                 banned_strings: list[str] | None = None, banned_regex: bool = False) -> Result:
        result = Result("", 0, [])
        for _ in self.stream(prompt, params, n, stop, chat, truncate, result, banned_strings, banned_regex):
            pass
        return result

    @property
    def heads(self):
        """The multi-task heads saved with a model trained with --objective multitask, else None."""
        if not hasattr(self, "_heads"):
            self._heads = None
            info = self.loaded.meta.get("heads")
            if info:
                from safetensors.torch import load_file

                from llmos.train.multitask import Heads

                state = load_file(str(self.loaded.path / info.get("file", "heads.safetensors")))
                self._heads = Heads.from_state(self.model.config.d_model, info, state)
        return self._heads

    def embed(self, texts: list[str]):
        """One L2-normalised vector per text: the mean of the final hidden states over its tokens
        (for models trained with --objective mlm, their sentence embedding); a model trained with
        --objective multitask gives its style embedding (the pooled state through its projection head)."""
        return self.embed_tokens([self.embedding_tokens(t) for t in texts])

    def embedding_tokens(self, text: str) -> list[int]:
        """The token ids `embed` pools for a text (at most a context window)."""
        return self.tokenizer.encode(text, add_bos=False)[: self.context_window] or [0]

    def embed_tokens(self, ids: list[list[int]]):
        """`embed` of texts already tokenized (each list at most a context window long)."""
        import torch

        heads = self.heads
        if heads is not None:
            with torch.inference_mode():
                return heads.embed(self._pooled_tokens(ids))
        return torch.nn.functional.normalize(self._pooled_tokens(ids), dim=-1)

    def style_similarity(self, texts: list[str]) -> list[float]:
        """Each text's cosine similarity to the centroid of the corpus a multi-task model was
        trained on (its style), in [-1, 1]."""
        if self.heads is None:
            raise ValueError(f"{self.name} has no style embedding: train it with `llmos finetune --objective multitask`")
        return (self.embed(texts) @ self.heads.centroid).tolist()

    def classify(self, texts: list[str]) -> list[str]:
        """Each text's label by the task head of a model trained with --objective multitask on labelled data."""
        import torch

        heads = self.heads
        if heads is None or heads.classify is None:
            raise ValueError(f"{self.name} has no label head: train it with --objective multitask on JSONL with labels")
        with torch.inference_mode():
            return [heads.labels[i] for i in heads.classify(self._pooled(texts)).argmax(1).tolist()]

    def _pooled(self, texts: list[str]):
        return self._pooled_tokens([self.embedding_tokens(t) for t in texts])

    def _pooled_tokens(self, ids: list[list[int]]):
        import torch

        with torch.inference_mode():
            if self.model.config.causal:
                # right padding: a causal model's real tokens never see the padded tail
                width = max(len(i) for i in ids)
                batch = torch.tensor([i + [0] * (width - len(i)) for i in ids])
                mask = torch.tensor([[1.0] * len(i) + [0.0] * (width - len(i)) for i in ids])
                hidden = self.model(batch, return_hidden=True).float()
                out = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            else:  # a bidirectional model would attend to padding, so texts go one by one
                out = torch.stack([self.model(torch.tensor([i]), return_hidden=True).float().mean(1)[0] for i in ids])
        return out

    def beam_search(self, prompt: str | list[dict], beams: int, max_tokens: int = 256, n: int = 1,
                    length_penalty: float = 1.0, chat: bool | None = None, truncate: str = "error") -> Result:
        """The n most likely continuations found by beam search (deterministic)."""
        t0 = time.perf_counter()
        ids, dropped = self._fit(self.encode_prompt(prompt, chat), max_tokens, truncate)
        timings = Timings()
        hyps = beam_search(self.model, ids, beams, max_tokens, self.tokenizer.stop_ids,
                           length_penalty, n, timings)
        completions = []
        for i, h in enumerate(hyps):
            tokens = [t for t in h.tokens if t not in self.tokenizer.stop_ids]
            completions.append(Completion(i, self.tokenizer.decode(tokens), tokens, h.finish_reason, score=h.score))
        prompt_text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, False)
        return Result(prompt_text, len(ids), completions,
                      {**timings.as_dict(), "total_s": round(time.perf_counter() - t0, 4)}, dropped)


__all__ = ["LLM", "Result", "Completion", "Delta", "ContextError", "ContentFiltered", "SamplingParams"]
