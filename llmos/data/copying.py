"""The copying check: which spans of a text are verbatim copies of a corpus (memorisation by a
model, or plagiarism of a writer's sources).

The index holds every character n-gram of the corpus (n = 24 by default) as a 64-bit
polynomial hash, sorted, beside the n-gram's position in the corpus text. Characters, not
words, so Chinese and English are measured the same way. Both the corpus and a checked text
are normalised the same way first: lowercase, every run of whitespace one space (a line
break and a space are the same thing to a reader looking for copying). A text's n-grams are
looked up all at once (np.searchsorted); every hit is then verified against the corpus text
itself and extended forwards and backwards by string comparison, so a hash collision can never
report copying, and a span's length is exact. Offsets map back to the original text.

Limits: verbatim only. A paraphrase, a changed word every few dozen characters, or a
translation is not found.

An index folder: index.json (n, sources, sizes), text.npy (the normalised corpus, UTF-8,
sources separated by NUL), starts.npy (where each source begins), hashes.npy and
positions.npy (sorted n-gram hashes and where each occurs). Plain numpy arrays, loaded with
allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NGRAM = 24  # characters: 4-5 English words, a long Chinese phrase
MAX_CANDIDATES = 64  # occurrences of one n-gram verified; more only in very repetitive corpora
FORMAT = "llmos-copy-index"
VERSION = 1
DATASET_INDEX = "copy_index"  # the index's folder inside a prepared dataset
SEPARATOR = "\x00"  # between sources in the corpus text; never in a normalised text
_BASE = np.uint64(0x100000001B3)  # odd multiplier of the rolling hash (arithmetic mod 2**64)
_WHITESPACE = np.array([c for c in range(0x3001) if chr(c).isspace()] + [0], dtype=np.uint32)


class CopyError(ValueError):
    """Nothing to check against, or a bad index or option; the message says what to do."""


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def normalise(text: str) -> tuple[str, np.ndarray]:
    """Lowercase, whitespace runs (and NUL) -> one space. Returns the normalised text and, for
    each of its characters, the offset of the original character it stands for."""
    lowered = text.lower()
    if len(lowered) != len(text):  # a few letters lowercase to two characters ("İ"): keep those as they are
        lowered = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    cps = _codepoints(lowered)
    space = np.isin(cps, _WHITESPACE)
    keep = ~space
    keep[1:] |= ~space[:-1]  # the first whitespace character of a run stands for the run
    if len(keep):
        keep[0] = not space[0]
    offsets = np.flatnonzero(keep)
    kept = np.where(space[offsets], np.uint32(32), cps[offsets])
    return kept.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass"), offsets


def ngram_hashes(cps: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n-gram of a codepoint array (len - n + 1 of them), vectorised."""
    m = len(cps) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    values = cps.astype(np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    for k in range(n):  # n passes over the array: h = h * B + c (wrapping)
        h *= _BASE
        h += values[k : k + m]
    return h


@dataclass
class CopyIndex:
    n: int
    text: str  # the normalised corpus, sources joined by SEPARATOR
    starts: np.ndarray  # int64: where each source begins in `text`
    names: list[str]
    hashes: np.ndarray  # uint64, sorted
    positions: np.ndarray  # where each hash's n-gram begins in `text`
    meta: dict = field(default_factory=dict)  # where it came from (shown by `llmos check`)

    def source_of(self, pos: int) -> str:
        return self.names[int(np.searchsorted(self.starts, pos, side="right")) - 1]

    def describe(self) -> str:
        return (f"{len(self.names):,} source{'s' * (len(self.names) != 1)}, {len(self.text) - len(self.names) + 1:,} "
                f"characters, {self.n}-grams" + (f" ({self.meta['from']})" if self.meta.get("from") else ""))

    def save(self, folder: str | Path):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "text.npy", np.frombuffer(self.text.encode("utf-8", "surrogatepass"), dtype=np.uint8))
        np.save(folder / "starts.npy", self.starts)
        np.save(folder / "hashes.npy", self.hashes)
        np.save(folder / "positions.npy", self.positions)
        info = {"format": FORMAT, "version": VERSION, "n": self.n, "chars": len(self.text), "ngrams": len(self.hashes),
                "normalisation": "lowercase, whitespace runs as one space", "sources": self.names,
                "meta": self.meta}
        (folder / "index.json").write_text(json.dumps(info, ensure_ascii=False))

    @classmethod
    def load(cls, folder: str | Path) -> CopyIndex:
        folder = Path(folder)
        try:
            info = json.loads((folder / "index.json").read_text())
        except (OSError, ValueError) as e:
            raise CopyError(f"{folder} is not a copy index ({e}); build one with `llmos prepare`") from None
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise CopyError(f"{folder} holds a copy index of another format or version; run `llmos prepare` again")
        try:
            arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False,
                                    mmap_mode=None if name in ("text", "starts") else "r")
                      for name in ("text", "starts", "hashes", "positions")}
        except (OSError, ValueError) as e:
            raise CopyError(f"{folder}: a file of the copy index is missing or damaged ({e}); run `llmos prepare` again") from None
        text = arrays["text"].tobytes().decode("utf-8", "surrogatepass")
        if len(text) != info["chars"] or len(arrays["hashes"]) != len(arrays["positions"]):
            raise CopyError(f"{folder}: the copy index's files disagree; run `llmos prepare` again")
        return cls(info["n"], text, arrays["starts"], info["sources"], arrays["hashes"], arrays["positions"],
                   info.get("meta") or {})


def build_index(sources: list[tuple[str, str]], n: int = NGRAM, meta: dict | None = None) -> CopyIndex:
    """An index of (name, text) sources: their normalised text and every n-gram's hash."""
    if n < 4:
        raise CopyError(f"n (the n-gram length in characters) must be at least 4, got {n}")
    parts, names, starts, offset = [], [], [], 0
    for name, text in sources:
        norm = normalise(text)[0].strip(" ")
        parts.append(norm)
        names.append(str(name))
        starts.append(offset)
        offset += len(norm) + 1
    corpus = SEPARATOR.join(parts)
    cps = _codepoints(corpus)
    hashes = ngram_hashes(cps, n)
    # n-grams across two sources are not text anyone wrote: leave them out
    seps = np.concatenate([[0], np.cumsum(cps == 0)])
    within = seps[n:] - seps[:-n] == 0 if len(hashes) else np.zeros(0, dtype=bool)
    positions = np.flatnonzero(within)
    order = np.argsort(hashes[positions], kind="stable")
    positions = positions[order].astype(np.uint32 if len(corpus) < 2**32 else np.int64)
    return CopyIndex(n, corpus, np.asarray(starts, dtype=np.int64), names, hashes[positions], positions, dict(meta or {}))


def _extend(a: str, i: int, b: str, j: int, known: int, limit: int, backwards: bool = False) -> int:
    """How many characters a and b share going forwards from a[i], b[j] (backwards: before
    them), given that the first `known` are shared; at most `limit`. Galloping, then bisection:
    O(log length) string comparisons, each done in C."""
    def same(lo: int, hi: int) -> bool:  # are characters lo..hi (counted from the anchor) equal?
        if backwards:
            return a[i - hi : i - lo] == b[j - hi : j - lo]
        return a[i + lo : i + hi] == b[j + lo : j + hi]

    lo, step = known, 32
    while True:
        probe = min(lo + step, limit)
        if probe <= lo:
            return lo
        if not same(lo, probe):
            hi = probe
            break
        lo, step = probe, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if same(lo, mid):
            lo = mid
        else:
            hi = mid
    return lo


def find_matches(norm: str, idx: CopyIndex) -> list[tuple[int, int, int]]:
    """Verbatim matches of at least n characters between a normalised text and the corpus:
    (start, end, corpus position), each as long as it goes; left to right, a match is looked for
    wherever an n-gram sticks out of the matches found so far."""
    n = idx.n
    qh = ngram_hashes(_codepoints(norm), n)
    if not len(qh) or not len(idx.hashes):
        return []
    lo = np.searchsorted(idx.hashes, qh, side="left")
    hi = np.searchsorted(idx.hashes, qh, side="right")
    matches, covered = [], 0
    corpus = idx.text
    for i in np.flatnonzero(hi > lo).tolist():
        if i + n <= covered:
            continue
        gram, best = norm[i : i + n], None
        for p in idx.positions[lo[i] : min(hi[i], lo[i] + MAX_CANDIDATES)].tolist():
            if corpus[p : p + n] != gram:  # a hash collision: not a copy
                continue
            fwd = _extend(norm, i, corpus, p, n, min(len(norm) - i, len(corpus) - p))
            back = _extend(norm, i, corpus, p, 0, min(i, p), backwards=True)
            if best is None or fwd + back > best[1] - best[0]:
                best = (i - back, i + fwd, p - back)
        if best is not None:
            matches.append(best)
            covered = max(covered, best[1])
    return matches


@dataclass
class CopyReport:
    """What `check_copying` found. Offsets (start, end) are into the original text; "chars"
    counts normalised characters (a run of whitespace is one)."""
    text: str
    n: int
    min_chars: int
    ngrams: int  # the text's n-grams
    copied_share: float  # the share of them found verbatim in the corpus
    longest: dict | None  # the longest verbatim overlap, whatever its length (None: no n-gram found)
    spans: list[dict]  # maximal verbatim spans of at least min_chars, by start
    sources: list[dict]  # per source: characters of the text copied from it (in spans), most first
    seconds: float = 0.0

    @property
    def copied(self) -> bool:
        return bool(self.spans)

    def as_dict(self) -> dict:
        return {"copied": self.copied, "min_chars": self.min_chars, "n": self.n, "ngrams": self.ngrams,
                "copied_share": self.copied_share, "longest": self.longest, "spans": self.spans,
                "sources": self.sources, "seconds": self.seconds}

    def marked(self, style: str = "brackets") -> str:
        """The text with its copied spans marked: "ansi" (bold red on a terminal), "brackets"
        ([[...]]), or "html" (escaped, spans in <mark title="source">)."""
        if style not in ("ansi", "brackets", "html"):
            raise CopyError(f"style must be 'ansi', 'brackets' or 'html', got {style!r}")
        merged: list[list] = []  # overlapping spans are marked as one
        for s in self.spans:
            if merged and s["start"] <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], s["end"])
                merged[-1][2].append(s["source"])
            else:
                merged.append([s["start"], s["end"], [s["source"]]])
        escape = html.escape if style == "html" else (lambda x: x)
        pieces, at = [], 0
        for start, end, names in merged:
            copied = escape(self.text[start:end])
            if style == "ansi":
                copied = f"\x1b[1;31m{copied}\x1b[0m"
            elif style == "brackets":
                copied = f"[[{copied}]]"
            else:
                title = html.escape("; ".join(dict.fromkeys(names)), quote=True)
                copied = f'<mark class="copied" title="{title}">{copied}</mark>'
            pieces += [escape(self.text[at:start]), copied]
            at = end
        pieces.append(escape(self.text[at:]))
        return "".join(pieces)


def check_copying(text: str, idx: CopyIndex, min_chars: int = 50) -> CopyReport:
    """Find the verbatim copies of the corpus in `text`: spans of at least min_chars characters
    (normalised), the longest overlap of any length, and the share of the text's n-grams copied."""
    if min_chars < idx.n:
        raise CopyError(f"min_chars must be at least the index's n-gram length ({idx.n}), got {min_chars}")
    t0 = time.perf_counter()
    norm, offsets = normalise(text)
    found, matches = find_matches(norm, idx), []
    for s, e, p in found:
        while s < e and norm[s] == " ":  # a span starts and ends on text, not on a space
            s, p = s + 1, p + 1
        while e > s and norm[e - 1] == " ":
            e -= 1
        matches.append((s, e, p))
    ngrams = max(0, len(norm) - idx.n + 1)
    share = 0.0
    if found:
        edges = np.zeros(ngrams + 1, dtype=np.int64)
        for s, e, _ in found:
            edges[s] += 1
            edges[e - idx.n + 1] -= 1
        share = float((np.cumsum(edges[:-1]) > 0).sum() / ngrams)

    def described(s: int, e: int, p: int) -> dict:
        start, end = int(offsets[s]), int(offsets[e - 1]) + 1
        return {"start": start, "end": end, "source": idx.source_of(p), "chars": e - s}

    longest = None
    if matches:
        s, e, p = max(matches, key=lambda m: (m[1] - m[0], -m[0]))
        longest = described(s, e, p)
        longest["text"] = text[longest["start"] : longest["end"]]
    kept = sorted((m for m in matches if m[1] - m[0] >= min_chars), key=lambda m: (m[0], -m[1]))
    spans, covered_by = [], {}
    for s, e, p in kept:
        if spans and e <= spans[-1][1]:  # inside a longer span already found
            continue
        spans.append((s, e, p))
    described_spans = [described(s, e, p) for s, e, p in spans]
    for (s, e, _), d in zip(spans, described_spans):
        covered_by.setdefault(d["source"], set()).update(range(s, e))
    sources = sorted(({"source": k, "chars": len(v)} for k, v in covered_by.items()), key=lambda x: -x["chars"])
    return CopyReport(text, idx.n, min_chars, ngrams, share, longest, described_spans, sources,
                      time.perf_counter() - t0)


# --- finding the index for a run, a model, a dataset or a folder of texts ---

def _dataset_index(dataset: Path, what: str) -> CopyIndex:
    folder = dataset / DATASET_INDEX
    if not (folder / "index.json").is_file():
        raise CopyError(f"{what}, which has no copy index: run `llmos prepare` again (without --no-copy-index) "
                        f"or pass --against the folder of texts it was made from")
    idx = CopyIndex.load(folder)
    idx.meta.setdefault("from", f"training split of {dataset}")
    return idx


def _trained_on(config_file: Path, name: str) -> CopyIndex:
    """The index of the dataset a checkpoint's config.json says it was trained on."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CopyError(f"cannot read {config_file} ({e})") from None
    data = (config.get("data") or {}).get("path")
    if not data:
        raise CopyError(f"{name} was not trained here (its config names no training data): "
                        f"pass --against a folder of the texts to compare with")
    dataset = Path(data)
    if not (dataset / "meta.json").is_file():
        raise CopyError(f"{name} was trained on {data}, which is not there (paths are relative to where training "
                        f"ran): pass --against the dataset folder or the texts it was made from")
    return _dataset_index(dataset, f"{name} was trained on {data}")


def _corpus_key(files: list[Path], n: int) -> str:
    digest = hashlib.sha256(f"{VERSION}:{n}".encode())
    for f in files:
        digest.update(str(f.resolve()).encode("utf-8", "surrogatepass") + b"\0")
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return digest.hexdigest()[:24]


def index_texts(inputs: list[str | Path], n: int = NGRAM, cache: bool = True) -> CopyIndex:
    """An index of files and folders of .txt, .md and .jsonl (read as `llmos prepare` reads
    them), kept in $LLMOS_HOME/copy_indexes under a hash of the files' paths and contents."""
    from llmos.data.clean import CleanOptions, expand_inputs, read_documents
    from llmos.settings import llmos_home

    files, problems = expand_inputs([str(i) for i in inputs])
    if not files:
        raise CopyError("; ".join(f"{i}: {r}" for i, r in problems) or "no texts to check against")
    folder = llmos_home() / "copy_indexes" / _corpus_key(files, n)
    if cache and (folder / "index.json").is_file():
        try:
            return CopyIndex.load(folder)
        except CopyError:
            pass  # rebuilt below
    skipped: list[tuple[str, str]] = []
    docs = [(d.source, d.text) for d in read_documents(files, CleanOptions(), skipped)]
    if not docs:
        raise CopyError(f"no text found in {', '.join(map(str, inputs))} "
                        f"({'; '.join(f'{f}: {r}' for f, r in skipped[:3]) or 'empty'})")
    idx = build_index(docs, n, {"from": ", ".join(map(str, inputs))})
    if cache:
        tmp = folder.with_name(folder.name + ".partial")
        idx.save(tmp)
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)
    return idx


def resolve_index(spec: str | Path) -> CopyIndex:
    """What to check against: a training run or checkpoint folder (the copy index of the dataset
    it was trained or fine-tuned on), a model name (the same, when it was trained here), a copy
    index folder, a dataset folder from `llmos prepare`, or files and folders of texts (indexed
    on the fly and cached)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "index.json").is_file():
            return CopyIndex.load(path)
        if (path / "meta.json").is_file():
            return _dataset_index(path, f"{spec} is a dataset")
        if (path / "LATEST").is_file():
            checkpoint = path / (path / "LATEST").read_text().strip()
            return _trained_on(checkpoint / "config.json", str(spec))
        if (path / "config.json").is_file():
            return _trained_on(path / "config.json", str(spec))
        if (path / "metrics.jsonl").is_file():
            raise CopyError(f"{spec} is a training run without a checkpoint yet: check again once it has saved one, "
                            f"or pass --against its dataset folder")
        return index_texts([path])
    if path.is_file():
        return index_texts([path])
    from llmos.settings import models_dir
    from llmos.weights.store import BUNDLED

    if str(spec) in BUNDLED:
        raise CopyError(f"{spec} was not trained here: pass --against a folder of the texts to compare with")
    installed = models_dir() / str(spec) / "config.json"
    if installed.is_file():
        return _trained_on(installed, str(spec))
    raise CopyError(f"no run, model, copy index, dataset or folder of texts called {spec!r}")
