"""A fast-loading form of SentencePiece-style BPE tokenizers (Gemma's): the same ids and text as
the `tokenizers` library, from arrays that load in milliseconds instead of a 33 MB JSON file
that takes seconds to parse.

It covers exactly one shape of tokenizer.json, checked by `qualifies`: a BPE model with byte
fallback and no dropout, a normalizer that only turns spaces into "▁", no pre-tokenizer (or
Gemma's, which splits on spaces that the normalizer has already replaced), the decoder chain
Replace("▁", " ") + ByteFallback + Fuse, and added tokens matched verbatim. Anything else keeps
using `tokenizers`.

Encoding follows `tokenizers`: added tokens are cut out of the raw text first (leftmost, longest),
the rest is normalized and merged pair by pair, always the lowest-ranked pair present and the
leftmost of equals. To cache work, text is cut into words before each "▁" that follows another
character: no merge can cross such a cut unless the vocabulary holds a token that spans one
("x▁..."), and cuts inside any occurrence of such a token are dropped.
"""

from __future__ import annotations

import heapq
import json
import os
import re
from pathlib import Path

import numpy as np

CACHE_NAME = "tokenizer.fast.npz"
CACHE_VERSION = 1
MIN_SIZE = 1 << 20  # smaller tokenizer.json files parse fast enough as they are
_SHIFT = 20  # ids below 2**20: pair keys and (rank, id) values pack into one int64
_MASK = (1 << _SHIFT) - 1  # the id part of a packed value
_SPACE = "\u2581"
_DECODERS = [{"type": "Replace", "pattern": {"String": _SPACE}, "content": " "}, {"type": "ByteFallback"},
             {"type": "Fuse"}]


def qualifies(spec: dict) -> bool:
    """Whether a parsed tokenizer.json has the one shape this module reproduces exactly."""
    model = spec.get("model") or {}
    normalizer = spec.get("normalizer") or {}
    pre = spec.get("pre_tokenizer")
    decoder = spec.get("decoder") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback") or model.get("dropout"):
        return False
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("ignore_merges"):
        return False
    if normalizer != {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}:
        return False
    if pre is not None and pre != {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                                   "invert": False}:
        return False
    if decoder.get("type") != "Sequence" or decoder.get("decoders") != _DECODERS:
        return False
    vocab = model.get("vocab") or {}
    if len(vocab) >= 1 << _SHIFT or any(f"<0x{b:02X}>" not in vocab for b in range(256)):
        return False
    return all(not (a.get("normalized") or a.get("lstrip") or a.get("rstrip") or a.get("single_word"))
               for a in spec.get("added_tokens", []))


def build_cache(spec: dict, out: Path, source_stamp: list[int]):
    """Write the arrays FastBPE loads (atomically), from a qualifying tokenizer.json."""
    model = spec["model"]
    vocab = dict(model["vocab"])
    for a in spec.get("added_tokens", []):
        vocab.setdefault(a["content"], a["id"])
    size = max(vocab.values()) + 1
    texts = [""] * size
    for text, i in vocab.items():
        texts[i] = text
    encoded = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(size + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded])
    merges = []
    for rank, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        merges.append((vocab[a] << _SHIFT | vocab[b], rank << _SHIFT | vocab[a + b]))
    pairs = np.array(sorted(merges), dtype=np.int64).reshape(-1, 2)
    added = spec.get("added_tokens", [])
    # Tokens with a "▁" right after another character: merges may cross a word cut only there.
    spanning = sorted({t for t in vocab if re.search(f"[^{_SPACE}]{_SPACE}", t)})
    chars = {t: i for t, i in model["vocab"].items() if len(t) == 1}
    header = {"version": CACHE_VERSION, "source": source_stamp, "spanning": spanning}
    _save(out, header, blob=np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets=offsets,
          pair_keys=pairs[:, 0].copy(), pair_values=pairs[:, 1].copy(),
          added_ids=np.array([a["id"] for a in added], dtype=np.int64),
          added_special=np.array([bool(a.get("special")) for a in added], dtype=bool),
          chars=np.frombuffer("".join(chars).encode("utf-32-le"), dtype=np.uint32),
          char_ids=np.array(list(chars.values()), dtype=np.int64),
          byte_ids=np.array([model["vocab"][f"<0x{b:02X}>"] for b in range(256)], dtype=np.int64))


def _save(out: Path, header: dict, **arrays):
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp.npz")  # np.savez adds .npz to other names
    np.savez(tmp, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays)
    os.replace(tmp, out)


def stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


class FastBPE:
    """Encode and decode with the arrays of build_cache; the results are those of `tokenizers`."""

    def __init__(self, arrays):
        header = json.loads(bytes(arrays["header"]).decode())
        self.blob = arrays["blob"].tobytes()
        self.offsets = arrays["offsets"]
        self.keys, self.values = arrays["pair_keys"], arrays["pair_values"]
        self.size = len(self.offsets) - 1
        self.added = {self.text(int(i)): int(i) for i in arrays["added_ids"]}
        self.special = {int(i) for i, s in zip(arrays["added_ids"], arrays["added_special"]) if s}
        self.byte_ids = arrays["byte_ids"].tolist()
        self.chars = dict(zip(arrays["chars"].tobytes().decode("utf-32-le"), arrays["char_ids"].tolist()))
        self.spanning = header["spanning"]
        # Added tokens are found by their first character, then the longest that fits.
        lengths: dict[str, set[int]] = {}
        for text in self.added:
            lengths.setdefault(text[0], set()).add(len(text))
        self._lengths = {first: sorted(n, reverse=True) for first, n in lengths.items()}
        self._starts = re.compile("|".join(sorted(map(re.escape, self._lengths)))) if self._lengths else None
        self._words: dict[str, list[int]] = {}
        self._ids: dict[str, int] | None = None
        self._pairs: dict[int, int] = {}

    @classmethod
    def load(cls, folder: Path) -> FastBPE | None:
        """The cached form beside tokenizer.json, written first if missing or stale; None when
        the tokenizer does not qualify, is small, or the folder cannot hold the cache."""
        source, cache = folder / "tokenizer.json", folder / CACHE_NAME
        try:
            if source.stat().st_size < MIN_SIZE:
                return None
        except OSError:
            return None
        try:
            with np.load(cache) as arrays:
                header = json.loads(bytes(arrays["header"]).decode())
                if header.get("version") == CACHE_VERSION and header.get("source") == stamp(source):
                    return cls({k: arrays[k] for k in arrays.files}) if header.get("qualifies", True) else None
        except (OSError, ValueError, KeyError):
            pass
        try:
            spec = json.loads(source.read_text(encoding="utf-8"))
            if not qualifies(spec):  # remembered, so the next load skips the parse
                _save(cache, {"version": CACHE_VERSION, "source": stamp(source), "qualifies": False})
                return None
            build_cache(spec, cache, stamp(source))
            with np.load(cache) as arrays:
                return cls({k: arrays[k] for k in arrays.files})
        except (OSError, ValueError, KeyError):
            return None

    # -- vocabulary

    def text(self, token_id: int) -> str:
        return self.blob[self.offsets[token_id] : self.offsets[token_id + 1]].decode("utf-8")

    def _lookup(self, text: str) -> int | None:
        if self._ids is None:  # built on first use: encoding needs single characters only (self.chars)
            self._ids = {}
            data, offs = self.blob, self.offsets.tolist()
            for i in range(self.size):
                self._ids.setdefault(data[offs[i] : offs[i + 1]].decode("utf-8"), i)
        return self._ids.get(text)

    def token_to_id(self, text: str) -> int | None:
        return self.added[text] if text in self.added else self._lookup(text)

    # -- encoding

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for start, end in self._added_spans(text):
            self._encode_plain(text[pos:start], ids)
            ids.append(self.added[text[start:end]])
            pos = end
        self._encode_plain(text[pos:], ids)
        return ids

    def _added_spans(self, text: str):
        """(start, end) of each added token in text: leftmost first, the longest at a place."""
        if self._starts is None:
            return
        pos = 0
        while (m := self._starts.search(text, pos)) is not None:
            i = m.start()
            for n in self._lengths[text[i]]:
                if text[i : i + n] in self.added:
                    yield i, i + n
                    pos = i + n
                    break
            else:
                pos = i + 1

    def _encode_plain(self, text: str, ids: list[int]):
        if not text:
            return
        text = text.replace(" ", _SPACE)
        cuts = [m.start() for m in re.finditer(f"(?<=[^{_SPACE}]){_SPACE}", text)]
        if cuts and self.spanning:
            inside = set()
            for token in self.spanning:
                for m in re.finditer(re.escape(token), text):
                    inside.update(range(m.start() + 1, m.end()))
            cuts = [c for c in cuts if c not in inside]
        start = 0
        for cut in [*cuts, len(text)]:
            word = text[start:cut]
            start = cut
            known = self._words.get(word)
            if known is None:
                known = self._merge(word)
                if len(self._words) < 100_000:
                    self._words[word] = known
            ids.extend(known)

    def _pair(self, left: int, right: int) -> int:
        """(rank << 20 | merged id) of a pair, or -1 when no merge joins them."""
        key = left << _SHIFT | right
        v = self._pairs.get(key)
        if v is None:
            i = int(self.keys.searchsorted(key))
            v = int(self.values[i]) if i < len(self.keys) and int(self.keys[i]) == key else -1
            if len(self._pairs) < 1_000_000:
                self._pairs[key] = v
        return v

    def _pairs_of(self, symbols: list[int]) -> list[int]:
        """_pair of every neighbouring pair, in one search."""
        keys = (np.array(symbols[:-1], dtype=np.int64) << _SHIFT) | np.array(symbols[1:], dtype=np.int64)
        idx = self.keys.searchsorted(keys).clip(max=len(self.keys) - 1)
        return np.where(self.keys[idx] == keys, self.values[idx], -1).tolist()

    def _merge(self, word: str) -> list[int]:
        symbols: list[int] = []
        for ch in word:
            i = self.chars.get(ch)
            if i is None:
                symbols.extend(self.byte_ids[b] for b in ch.encode("utf-8"))
            else:
                symbols.append(i)
        n = len(symbols)
        if n < 2:
            return symbols
        if n <= 32:  # short words: rescan the pairs after each merge, cheaper than the bookkeeping
            known, pair = self._pairs.get, self._pair
            while len(symbols) > 1:
                best, at = -1, -1
                for i in range(len(symbols) - 1):
                    v = known(symbols[i] << _SHIFT | symbols[i + 1])
                    if v is None:
                        v = pair(symbols[i], symbols[i + 1])
                    # v is rank << 20 | id and each rank one pair: the smallest v is the lowest
                    # rank, and `<` keeps the leftmost of equals
                    if v >= 0 and (best < 0 or v < best):
                        best, at = v, i
                if best < 0:
                    break
                symbols[at : at + 2] = [best & _MASK]
            return symbols
        # A linked list of symbols and a heap of (rank, position, merged id), as in `tokenizers`:
        # the lowest rank merges first, the leftmost of equal ranks; stale entries are skipped.
        prev, nxt, alive = list(range(-1, n - 1)), [*range(1, n), -1], [True] * n
        heap = [(v >> _SHIFT, i, v & _MASK) for i, v in enumerate(self._pairs_of(symbols)) if v >= 0]
        heapq.heapify(heap)
        while heap:
            _, i, new = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j < 0:
                continue
            v = self._pair(symbols[i], symbols[j])
            if v < 0 or v & _MASK != new:
                continue
            symbols[i], alive[j] = new, False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prev[nxt[j]] = i
            for a, b in ((prev[i], i), (i, nxt[i])):
                if a >= 0 and b >= 0 and (v := self._pair(symbols[a], symbols[b])) >= 0:
                    heapq.heappush(heap, (v >> _SHIFT, a, v & _MASK))
        return [s for s, keep in zip(symbols, alive) if keep]

    # -- decoding

    def decode(self, ids, skip_special: bool = True) -> str:
        parts: list[str] = []
        pending = bytearray()
        count = 0
        for i in ids:
            i = int(i)
            if not 0 <= i < self.size or (skip_special and i in self.special):
                continue
            piece = self.text(i)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and _hex(piece[3:5]):
                pending.append(int(piece[3:5], 16))
                count += 1
                continue
            if pending:
                parts.append(_bytes_text(pending, count))
                pending, count = bytearray(), 0
            parts.append(piece.replace(_SPACE, " "))
        if pending:
            parts.append(_bytes_text(pending, count))
        return "".join(parts)


def _hex(s: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in s)


def _bytes_text(data: bytearray, count: int) -> str:
    """A run of byte tokens: their UTF-8 text, or one U+FFFD per token when it is not valid."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * count

