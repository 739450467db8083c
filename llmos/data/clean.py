"""Reading a corpus into clean documents.

Inputs are files, folders (searched recursively) and glob patterns of .txt, .md and .jsonl.
A .txt/.md file is one document, or several when a record separator is given (for instance a
line holding only "%", the fortune-file convention). A .jsonl file holds one document per line:
its "text" field, or an instruction example (a chat's "messages", or "prompt" and
"completion": see sft.py); the other fields are kept as metadata. Files that are binary, empty,
not UTF-8 or unreadable are skipped and listed with the reason, never fatal.
"""

from __future__ import annotations

import glob
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from llmos.data import sft

EXTENSIONS = (".txt", ".md", ".jsonl")
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
# C0/C1 control characters except tab and newline (carriage returns are normalised first).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
TRAILING_SPACE = re.compile(r"[ \t]+\n")
BLANK_RUNS = re.compile(r"\n{3,}")


@dataclass
class Document:
    text: str
    source: str
    meta: dict = field(default_factory=dict)
    kind: str = "text"  # "text", or an instruction example: "chat", "pair"
    messages: list[dict] | None = None  # the example's conversation (chat and pair)


@dataclass
class CleanOptions:
    separator: str | None = None  # a line equal to this splits a text file into records
    lowercase: bool = False  # off by default: case carries meaning a generative model must learn
    remove_stopwords: bool = False  # off by default: it produces text nobody writes


STOPWORDS = frozenset(
    "a an and are as at be but by for from has have he her his i in is it its of on or she "
    "that the their them they this to was were will with you your".split()
)


def clean_text(text: str, options: CleanOptions | None = None) -> str:
    options = options or CleanOptions()
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = ANSI_ESCAPE.sub("", text)
    text = CONTROL.sub("", text)
    text = text.replace("\u00a0", " ")
    text = TRAILING_SPACE.sub("\n", text)
    text = BLANK_RUNS.sub("\n\n", text)
    text = text.strip("\n ")
    if options.lowercase:
        text = text.lower()
    if options.remove_stopwords:
        text = re.sub(
            r"[A-Za-z']+",
            lambda m: "" if m.group(0).lower() in STOPWORDS else m.group(0),
            text,
        )
        text = re.sub(r"[ \t]{2,}", " ", text)
    return text


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to read, and (input, reason) for inputs that name nothing usable."""
    files, problems = [], []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
            if not found:
                problems.append((item, "folder holds no .txt, .md or .jsonl files"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                problems.append((item, "pattern matches no file"))
            files.extend(matches)
        else:
            problems.append((item, "no such file or folder"))
    unique = list(dict.fromkeys(files))
    return unique, problems


def read_documents(files: list[Path], options: CleanOptions, skipped: list[tuple[str, str]]) -> Iterator[Document]:
    """Yield cleaned, non-empty documents; append (file, reason) to `skipped` for the rest."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix not in EXTENSIONS:
            skipped.append((str(path), f"unsupported extension {suffix or '(none)'}; use .txt, .md or .jsonl"))
            continue
        try:
            raw = path.read_bytes()
        except OSError as e:
            skipped.append((str(path), f"unreadable ({e.strerror or e})"))
            continue
        if not raw.strip():
            skipped.append((str(path), "empty"))
            continue
        if b"\x00" in raw[:8192]:
            skipped.append((str(path), "binary (contains NUL bytes)"))
            continue
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            skipped.append((str(path), f"not UTF-8 (byte {e.start})"))
            continue
        count = 0
        if suffix == ".jsonl":
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    skipped.append((f"{path}:{lineno}", "invalid JSON line"))
                    continue
                kind = sft.kind_of(record) if isinstance(record, dict) else None
                if kind in ("chat", "pair"):
                    try:
                        messages = sft.check_record(record, f"{path}:{lineno}")
                    except sft.SFTError as e:
                        skipped.append((f"{path}:{lineno}", str(e).split(": ", 1)[-1]))
                        continue
                    for key in ("messages", "prompt", "completion"):
                        record.pop(key, None)
                    count += 1
                    # the text stands for the example in deduplication and splitting
                    yield Document("\n".join(m["content"] for m in messages), f"{path}:{lineno}", record, kind, messages)
                    continue
                if kind != "text":
                    skipped.append((f"{path}:{lineno}", "no string 'text' field (nor 'messages', nor 'prompt' and 'completion')"))
                    continue
                cleaned = clean_text(record.pop("text"), options)
                if cleaned:
                    count += 1
                    yield Document(cleaned, f"{path}:{lineno}", record)
        else:
            records = [text]
            if options.separator is not None:
                records = re.split(rf"(?m)^{re.escape(options.separator)}[ \t]*$", text)
            for i, rec in enumerate(records):
                cleaned = clean_text(rec, options)
                if cleaned:
                    count += 1
                    yield Document(cleaned, f"{path}#{i}" if len(records) > 1 else str(path))
        if count == 0:
            skipped.append((str(path), "no text left after cleaning"))
