"""What each token of a vocabulary writes, as text, for constrained decoding.

Tokenizers split characters across tokens: byte-level BPE (SmolLM2) stores bytes, so a Chinese
character can be split over two tokens, and SentencePiece with byte fallback (Gemma 3) spells
rare characters as <0xE4><0xBD><0xA0>. Every token is therefore described by the bytes it
appends, split into three parts: `head` (continuation bytes that finish a character begun by
earlier tokens), `text` (whole characters) and `tail` (the start of a character that later
tokens finish). Special tokens have no piece.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from llmos.tokenizer import Tokenizer


@dataclass(frozen=True)
class Piece:
    head: bytes
    text: str
    tail: bytes


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def utf8_length(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC0 <= lead < 0xE0:
        return 2
    if 0xE0 <= lead < 0xF0:
        return 3
    if 0xF0 <= lead < 0xF8:
        return 4
    return 0  # a continuation byte or invalid


def split_bytes(b: bytes) -> Piece | None:
    """Split a token's bytes into (continuation head, whole characters, unfinished tail)."""
    i = 0
    while i < len(b) and i < 3 and 0x80 <= b[i] <= 0xBF:
        i += 1
    rest = b[i:]
    k = len(rest) - 1
    while k >= 0 and 0x80 <= rest[k] <= 0xBF:
        k -= 1
    tail = b""
    if k >= 0 and utf8_length(rest[k]) > len(rest) - k:
        tail, rest = rest[k:], rest[:k]
    try:
        text = rest.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return Piece(b[:i], text, tail)


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenTable:
    def __init__(self, tokenizer: Tokenizer):
        if tokenizer.fast is not None:  # SentencePiece-style BPE: "▁" spaces, <0xNN> bytes
            special, byte_level, metaspace = tokenizer.fast.special, False, True
            size, token_text = tokenizer.fast.size, tokenizer.fast.text
        else:
            spec = json.loads(tokenizer.hf.to_str())
            decoder = json.dumps(spec.get("decoder") or {}, ensure_ascii=False)  # "▁" as itself
            special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
            byte_level = '"ByteLevel"' in decoder
            metaspace = "▁" in decoder or '"Metaspace"' in decoder
            size, token_text = tokenizer.hf.get_vocab_size(with_added_tokens=True), tokenizer.hf.id_to_token
        inverse = _byte_decoder() if byte_level else None
        self.size = size
        self.pieces: list[Piece | None] = [None] * size
        for i in range(size):
            if i in special:
                continue
            tok = token_text(i)
            if tok is None:
                continue
            if byte_level:
                try:
                    raw = bytes(inverse[c] for c in tok)
                except KeyError:
                    raw = tok.encode()
            elif m := _BYTE_TOKEN.fullmatch(tok):
                raw = bytes([int(m.group(1), 16)])
            else:
                raw = (tok.replace("▁", " ") if metaspace else tok).encode()
            self.pieces[i] = split_bytes(raw)
        self.stop_ids = list(tokenizer.stop_ids)

    def whole(self) -> dict[int, str]:
        """Tokens that are whole characters only: id -> text."""
        return {i: p.text for i, p in enumerate(self.pieces) if p is not None and not p.head and not p.tail and p.text}


@lru_cache(maxsize=4)
def token_table(tokenizer: Tokenizer) -> TokenTable:
    return TokenTable(tokenizer)
