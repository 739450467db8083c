"""Knowledge bases: documents split into passages, embedded with all-MiniLM-L6-v2, stored in SQLite.

`add` reads files (or folders of text files), splits them into passages under their headings,
recognises FAQ entries ("Q: ... A: ...", or a heading that is a question followed by its
answer), embeds them and stores them with their vectors. Re-adding a file replaces its
passages only when its content changed; nothing is duplicated. Binary or unreadable files are
skipped and reported. Search is exact cosine similarity over the stored unit vectors (a matrix
product: milliseconds at 10k passages).
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llmos.db import Store

TEXT_SUFFIXES = {".md", ".markdown", ".txt", ".text", ".rst", ".org"}
MAX_WORDS = 120  # words per passage (about 160 tokens: under the embedder's 256)
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
QA = re.compile(r"^\s*(?:Q|Question|问)\s*[:：]\s*(.+?)\s*\n\s*(?:A|Answer|答)\s*[:：]\s*(.+)$", re.S | re.I)


class KBError(ValueError):
    """A knowledge base is missing, or its input cannot be used; the message says what to do."""


@dataclass
class Passage:
    heading: str
    text: str
    question: str | None = None  # FAQ entries
    answer: str | None = None

    @property
    def embed_text(self) -> str:
        if self.question:
            return self.question
        return f"{self.heading}: {self.text}" if self.heading else self.text


@dataclass
class Hit:
    score: float
    source: str
    heading: str
    text: str
    question: str | None = None
    answer: str | None = None
    passage_id: int = 0


@dataclass
class AddReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    passages: int = 0
    seconds: float = 0.0


def _words(text: str) -> int:
    han = sum(1 for c in text if "\u4e00" <= c <= "\u9fff")
    return len(text.split()) + han // 2  # two Han characters weigh about one English word


def _split_long(paragraph: str) -> list[str]:
    if _words(paragraph) <= MAX_WORDS:
        return [paragraph]
    sentences = re.split(r"(?<=[.!?。！？])\s*", paragraph)
    out, cur = [], ""
    for s in sentences:
        if cur and _words(cur + " " + s) > MAX_WORDS:
            out.append(cur.strip())
            cur = ""
        cur += (" " if cur else "") + s
    if cur.strip():
        out.append(cur.strip())
    return out


def split_passages(text: str) -> list[Passage]:
    """Passages of at most ~MAX_WORDS words, each under its nearest heading; FAQ entries apart."""
    passages: list[Passage] = []
    heading, pending = "", []
    open_question: str | None = None  # a heading that is a question: its answer follows
    answer: list[str] = []

    def flush_text():
        cur: list[str] = []
        for para in pending:
            for piece in _split_long(para):
                if cur and _words(" ".join(cur + [piece])) > MAX_WORDS:
                    passages.append(Passage(heading, "\n".join(cur)))
                    cur = []
                cur.append(piece)
        if cur:
            passages.append(Passage(heading, "\n".join(cur)))
        pending.clear()

    def flush_question():
        nonlocal open_question
        if open_question and answer:
            body = "\n".join(answer)
            passages.append(Passage(heading, f"Q: {open_question}\nA: {body}", open_question, body))
        open_question = None
        answer.clear()

    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = block.strip().split("\n")
        if not block.strip():
            continue
        m = HEADING.match(lines[0])
        if m:
            flush_question()
            flush_text()
            title = m.group(2).strip()
            if title.endswith(("?", "？")):
                open_question = title
            else:
                heading = title
            lines = lines[1:]
            if not lines:
                continue
        block = "\n".join(lines).strip()
        qa = QA.match(block)
        if qa:
            flush_text()
            q, a = qa.group(1).strip(), " ".join(qa.group(2).split())
            passages.append(Passage(heading, f"Q: {q}\nA: {a}", q, a))
        elif open_question is not None:
            answer.append(" ".join(block.split()))
        else:
            pending.append(" ".join(block.split()))
    flush_question()
    flush_text()
    return passages


def read_text_file(path: Path) -> str:
    """The file's text, or KBError saying why it was skipped."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KBError(f"unreadable ({e.strerror or e})") from None
    if b"\x00" in data[:8192]:
        raise KBError("binary file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise KBError("not UTF-8 text") from None


def collect_files(paths: list[str]) -> list[Path]:
    files = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise KBError(f"{p}: no such file or folder")
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                            and not any(part.startswith(".") for part in f.relative_to(path).parts))
        else:
            files.append(path)
    return files


def list_kbs(store: Store) -> list[dict]:
    with store.lock:
        rows = store.db.execute("""
            SELECT b.name, b.embedder, b.created_at,
                   (SELECT COUNT(*) FROM kb_documents d WHERE d.kb_id = b.id) AS documents,
                   (SELECT COUNT(*) FROM kb_passages p WHERE p.kb_id = b.id) AS passages,
                   (SELECT COUNT(*) FROM kb_passages p WHERE p.kb_id = b.id AND p.question IS NOT NULL) AS faq
            FROM kb_bases b ORDER BY b.name""")
        return [dict(r) for r in rows]


def delete_kb(store: Store, name: str):
    with store.transaction() as db:
        if db.execute("DELETE FROM kb_bases WHERE name = ?", (name,)).rowcount == 0:
            raise KBError(f"no knowledge base named {name!r}")


class KnowledgeBase:
    def __init__(self, store: Store, name: str, create: bool = False, embedder=None):
        from llmos.embedder import DEFAULT_EMBEDDER

        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", name):
            raise KBError(f"a knowledge base name is letters, digits, '-', '_' or '.', got {name!r}")
        self.store, self.name = store, name
        self._embedder = embedder
        with store.lock:
            row = store.db.execute("SELECT id FROM kb_bases WHERE name = ?", (name,)).fetchone()
        if row is None:
            if not create:
                known = ", ".join(r["name"] for r in list_kbs(store)) or "none yet"
                raise KBError(f"no knowledge base named {name!r} (known: {known}); build one with `llmos kb add {name} FILES...`")
            with store.transaction() as db:
                db.execute("INSERT OR IGNORE INTO kb_bases (name, embedder, created_at) VALUES (?, ?, ?)",
                           (name, DEFAULT_EMBEDDER, time.time()))
            with store.lock:
                row = store.db.execute("SELECT id FROM kb_bases WHERE name = ?", (name,)).fetchone()
        self.id = row["id"]
        self._matrix: torch.Tensor | None = None
        self._rows: list[int] = []

    @property
    def embedder(self):
        if self._embedder is None:
            from llmos.embedder import get_embedder

            self._embedder = get_embedder()
        return self._embedder

    def add(self, paths: list[str], progress=None) -> AddReport:
        """Add or refresh files; progress(done, total) is called as passages are embedded."""
        t0 = time.perf_counter()
        report = AddReport()
        files = collect_files(paths)
        if not files:
            raise KBError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) under {', '.join(paths)}")
        documents = []
        for f in files:
            try:
                documents.append((str(f.resolve()), read_text_file(f)))
            except KBError as e:
                report.skipped.append((str(f), str(e)))
        return self.add_texts(documents, progress, report, t0)

    def add_texts(self, documents: list[tuple[str, str]], progress=None, report: AddReport | None = None,
                  started: float | None = None) -> AddReport:
        """Add or refresh documents given as (name, text): files read by `add`, or uploads.
        A document whose text is unchanged is skipped."""
        t0 = started or time.perf_counter()
        report = report or AddReport()
        todo: list[tuple[str, str, list[Passage], bool]] = []
        for key, text in documents:
            digest = hashlib.sha256(text.encode()).hexdigest()
            with self.store.lock:
                row = self.store.db.execute("SELECT sha256 FROM kb_documents WHERE kb_id = ? AND path = ?",
                                            (self.id, key)).fetchone()
            if row is not None and row["sha256"] == digest:
                report.unchanged.append(key)
                continue
            passages = split_passages(text)
            if not passages:
                report.skipped.append((key, "no text in it"))
                continue
            todo.append((key, digest, passages, row is not None))
        total = sum(len(p) for _, _, p, _ in todo)
        done = 0
        for key, digest, passages, existed in todo:
            # embed first, then replace the document's passages in one transaction: a crash
            # leaves either the old passages or the new ones, never half of each
            vectors = self.embedder.embed([p.embed_text for p in passages],
                                          progress=(lambda d, t, base=done: progress(base + d, total)) if progress else None)
            done += len(passages)
            with self.store.transaction() as db:
                db.execute("DELETE FROM kb_documents WHERE kb_id = ? AND path = ?", (self.id, key))
                doc = db.execute("INSERT INTO kb_documents (kb_id, path, sha256, added_at) VALUES (?, ?, ?, ?)",
                                 (self.id, key, digest, time.time())).lastrowid
                db.executemany(
                    "INSERT INTO kb_passages (doc_id, kb_id, ord, heading, text, question, answer, vector) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(doc, self.id, i, p.heading, p.text, p.question, p.answer, vectors[i].numpy().astype(np.float32).tobytes())
                     for i, p in enumerate(passages)])
            (report.updated if existed else report.added).append(key)
            report.passages += len(passages)
        self._matrix = None
        report.seconds = time.perf_counter() - t0
        return report

    def remove(self, path: str):
        """Take one document (and its passages) out of the knowledge base."""
        with self.store.transaction() as db:
            if db.execute("DELETE FROM kb_documents WHERE kb_id = ? AND path = ?", (self.id, path)).rowcount == 0:
                raise KBError(f"knowledge base {self.name!r} has no document {path!r}")
        self._matrix = None

    def _load(self):
        if self._matrix is None:
            with self.store.lock:
                rows = self.store.db.execute("SELECT id, vector FROM kb_passages WHERE kb_id = ? ORDER BY id", (self.id,)).fetchall()
            self._rows = [r["id"] for r in rows]
            dim = self.embedder.dim
            self._matrix = torch.from_numpy(np.frombuffer(b"".join(r["vector"] for r in rows), dtype=np.float32).reshape(-1, dim).copy())
        return self._matrix

    def _hits(self, scored: list[tuple[int, float]]) -> list[Hit]:
        if not scored:
            return []
        ids = [self._rows[i] for i, _ in scored]
        with self.store.lock:
            rows = {r["id"]: r for r in self.store.db.execute(
                f"SELECT p.id, p.heading, p.text, p.question, p.answer, d.path FROM kb_passages p "
                f"JOIN kb_documents d ON d.id = p.doc_id WHERE p.id IN ({','.join('?' * len(ids))})", ids)}
        return [Hit(score, Path(rows[pid]["path"]).name, rows[pid]["heading"], rows[pid]["text"],
                    rows[pid]["question"], rows[pid]["answer"], pid)
                for pid, (_, score) in zip(ids, scored) if pid in rows]

    def search(self, query: str, k: int = 5) -> list[Hit]:
        from llmos.embedder import cosine_top_k

        matrix = self._load()
        return self._hits(cosine_top_k(self.embedder.embed([query])[0], matrix, k))

    def faq_answer(self, query: str, threshold: float = 0.8) -> Hit | None:
        """The FAQ entry whose question matches the query at `threshold` or above."""
        for hit in self.search(query, k=5):
            if hit.question and hit.score >= threshold:
                return hit
        return None

    def documents(self) -> list[dict]:
        with self.store.lock:
            return [dict(r) for r in self.store.db.execute(
                "SELECT d.path, d.sha256, d.added_at, COUNT(p.id) AS passages FROM kb_documents d "
                "LEFT JOIN kb_passages p ON p.doc_id = d.id WHERE d.kb_id = ? GROUP BY d.id ORDER BY d.path", (self.id,))]
