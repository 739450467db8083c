"""Text <-> token ids: a HF `tokenizers` model plus the special tokens and chat template of a
checkpoint. The engine below never sees text; everything textual lives here and above."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from llmos.fast_bpe import FastBPE

# Base models have no chat template: a plain transcript lets them take part in chats anyway.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_CHAT_STOPS = ["\nUser:"]


class Tokenizer:
    """tokenizer: a `tokenizers` object, or None with `fast` (a FastBPE) and `path` (the
    tokenizer.json it stands for, loaded only if something needs more than ids and text)."""

    def __init__(
        self,
        tokenizer: HFTokenizer | None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
        stop_tokens: Iterable[str] = (),
        chat_template: str | None = None,
        fast: FastBPE | None = None,
        path: Path | None = None,
    ):
        if tokenizer is None and (fast is None or path is None):
            raise ValueError("a Tokenizer needs a `tokenizers` object, or a FastBPE and its tokenizer.json")
        self._hf, self.fast, self._path = tokenizer, fast, path
        self.bos_token, self.eos_token, self.add_bos = bos_token, eos_token, add_bos
        self.bos_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_id = self.token_to_id(eos_token) if eos_token else None
        names = [eos_token, *stop_tokens]
        self.stop_ids = sorted({i for t in names if t and (i := self.token_to_id(t)) is not None})
        self.chat_template = chat_template
        self._template = None

    @classmethod
    def from_dir(cls, path: str | Path, meta: dict | None = None) -> Tokenizer:
        path = Path(path)
        if meta is None:
            meta = json.loads((path / "config.json").read_text())
        info = meta.get("tokenizer", {})
        # Gemma's tokenizer.json takes seconds to parse; its cached arrays, milliseconds.
        fast = FastBPE.load(path)
        return cls(
            None if fast else HFTokenizer.from_file(str(path / "tokenizer.json")),
            fast=fast, path=path / "tokenizer.json",
            bos_token=info.get("bos_token"),
            eos_token=info.get("eos_token"),
            add_bos=info.get("add_bos_token", False),
            stop_tokens=info.get("stop_tokens", ()),
            chat_template=meta.get("prompt_style", {}).get("chat_template"),
        )

    @property
    def hf(self) -> HFTokenizer:
        """The `tokenizers` object (parsed on first use when the fast form serves the rest)."""
        if self._hf is None:
            self._hf = HFTokenizer.from_file(str(self._path))
        return self._hf

    @property
    def vocab_size(self) -> int:
        if self.fast:
            return self.fast.size
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.fast.encode(text) if self.fast else self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        if self.fast:
            return self.fast.decode(ids, skip_special)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (partial UTF-8 pieces show as U+FFFD)."""
        return self.decode([token_id], skip_special=False)

    def token_to_id(self, token: str) -> int | None:
        return self.fast.token_to_id(token) if self.fast else self.hf.token_to_id(token)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as the model expects to read it (its chat template, rendered in a
        sandbox: templates come with model files and must not run code)."""
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"chat template error: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template or PLAIN_CHAT_TEMPLATE)
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        # A template that writes the BOS token itself must not get a second one.
        starts_with_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self.encode(text, add_bos=self.add_bos and not starts_with_bos)

    def chat_stop_strings(self) -> list[str]:
        return [] if self.chat_template else list(PLAIN_CHAT_STOPS)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas that are safe to print.

    Byte-level and byte-fallback tokenizers split characters across tokens, so a lone token can
    decode to U+FFFD; such text is held back until the character is complete. Decoding always
    restarts a few tokens back, because some tokenizers change a token's text depending on what
    precedes it (a leading space, for instance).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # decoding context starts here
        self.read = 0  # text of ids[:read] has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
