"""`llmos prepare`: corpus -> clean documents -> deduplicated -> train/val split -> tokenizer ->
memory-mapped token shards, with a report of what was kept, removed and skipped.

Output folder:
  train_000.bin, ...   token ids (uint16 when the vocabulary fits, else uint32), documents
  val_000.bin, ...     joined by the end-of-text token
  copy_index/          the training split's n-gram index for `llmos check` (llmos.data.copying)
  tokenizer.json       HF tokenizers
  meta.json            vocabulary, dtype, shards, special tokens, the options used
  report.json          documents, tokens, duplicates removed, files skipped and why

Instruction data (JSONL chats or prompt/completion pairs, rendered with the model given as
--tokenizer) adds, per shard, `.mask.bin` (1 where a token carries the loss: what the
assistant writes) and `.starts.bin` (where each example begins), so that training packs whole
examples into its rows without attention across them.

Plain text adds `train_docs.bin` and `val_docs.bin`: one row per document (shard, start, end,
group, label; int64), for the multi-task objective's contrastive pairs (two passages of one
group) and labels. A document's group is itself, or the value of a JSONL field (--group-by
author); its label is the JSONL field --label-field ("label"), -1 where it has none. With
--augment, each training document gets new views (llmos.data.augment) in its own group.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmos.data.clean import CleanOptions, Document, expand_inputs, read_documents
from llmos.data.dedup import MinHasher, exact_key, near_duplicates


class PrepareError(ValueError):
    """The corpus or the options cannot produce a dataset; the message says why."""


@dataclass
class PrepareConfig:
    inputs: list[str]
    out: str
    tokenizer: str = "char"  # "char", "bpe", or a model name/path whose tokenizer to reuse
    vocab_size: int = 8192  # for "bpe"
    val_fraction: float = 0.1
    seed: int = 1337
    separator: str | None = None
    dedup: bool = True
    near_dup_threshold: float = 0.8
    lowercase: bool = False
    remove_stopwords: bool = False
    shard_tokens: int = 50_000_000
    group_by: str = "document"  # contrastive positives: the same document, or the same value of this JSONL field
    label_field: str = "label"  # the JSONL field holding a document's class, for the task head
    augment: list[str] = field(default_factory=list)  # llmos.data.augment transforms
    augment_copies: int = 1
    augment_model: str | None = None  # backtranslate's translator
    copy_index: bool = True  # index the training split for the copying check (`llmos check`)
    report: dict = field(default_factory=dict, repr=False)

    def validate(self):
        if not self.inputs:
            raise PrepareError("give at least one input file, folder or glob pattern")
        if not 0 < self.val_fraction < 1:
            raise PrepareError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if not 0 < self.near_dup_threshold <= 1:
            raise PrepareError(f"--near-dup-threshold must be in (0, 1], got {self.near_dup_threshold}")


def split_documents(docs: list[Document], fraction: float, seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split by document, seeded: (text, document number) pairs. A corpus of fewer than 10
    documents (one long text, say) is split inside each document instead: its last `fraction`
    of lines goes to validation."""
    if len(docs) >= 10:
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        total = sum(len(d.text) for d in docs)
        val, size = set(), 0
        for i in order:
            if size >= fraction * total:
                break
            val.add(i)
            size += len(docs[i].text)
        if len(val) < len(docs):
            return [(d.text, i) for i, d in enumerate(docs) if i not in val], [(docs[i].text, i) for i in sorted(val)]
    train, val = [], []
    for i, d in enumerate(docs):
        cut = d.text.rfind("\n", 0, int(len(d.text) * (1 - fraction)))
        cut = cut + 1 if cut > 0 else int(len(d.text) * (1 - fraction))
        train.append((d.text[:cut], i))
        if d.text[cut:].strip():
            val.append((d.text[cut:], i))
    return train, val


def document_classes(docs: list[Document], group_by: str, label_field: str) -> tuple[list[int], list[int], list[str]]:
    """Per document: its contrastive group and its label number (-1: none), and the label names."""
    groups, labels, keys = [], [], {}
    for i, d in enumerate(docs):
        value = d.meta.get(group_by) if group_by != "document" else None
        key = ("field", str(value)) if value not in (None, "") else ("document", i)
        groups.append(keys.setdefault(key, len(keys)))
    names = sorted({str(d.meta[label_field]) for d in docs if d.meta.get(label_field) not in (None, "")})
    index = {n: k for k, n in enumerate(names)}
    for d in docs:
        value = d.meta.get(label_field)
        labels.append(index[str(value)] if value not in (None, "") else -1)
    return groups, labels, names


def write_documents(out: Path, split: str, lengths: list[int], groups: list[int], labels: list[int],
                    shard_tokens: int) -> str:
    """The document index of a split: (shard, start, end, group, label) per document, offsets
    within the shard; a document that crosses a shard boundary keeps its first part."""
    rows, offset = [], 0
    for n, g, lab in zip(lengths, groups, labels):
        shard, start = divmod(offset, shard_tokens)
        end = min(start + n, shard_tokens)
        rows.append((shard, start, end, g, lab))
        offset += n
    name = f"{split}_docs.bin"
    np.asarray(rows, dtype=np.int64).reshape(-1, 5).tofile(out / name)
    return name


def build_tokenizer(cfg: PrepareConfig, train: list[str], val: list[str]):
    from llmos.data import vocab

    if cfg.tokenizer == "char":
        tok = vocab.char_tokenizer(train + val)  # nanoGPT's char level: every character has a token
        return tok, vocab.tokenizer_meta("char", tok), None, None
    if cfg.tokenizer == "bpe":
        tok = vocab.bpe_tokenizer(train, cfg.vocab_size)
        return tok, vocab.tokenizer_meta("bpe", tok), None, None
    from llmos.weights import store as models

    try:
        tok, info, meta = model_tokenizer(cfg.tokenizer)
    except models.ModelError as e:
        raise PrepareError(f"--tokenizer must be 'char', 'bpe' or a model: {e}") from None
    return tok.hf, info, meta, tok


def model_tokenizer(model: str):
    """(Tokenizer, the dataset's tokenizer info, the model's config) of a model's own tokenizer,
    for data that model will be fine-tuned on. Raises ModelError for a model not found."""
    from llmos.tokenizer import Tokenizer
    from llmos.weights import store as models

    path = models.resolve(model)
    meta = json.loads((path / "config.json").read_text())
    info = dict(meta.get("tokenizer", {}), kind=f"model:{meta.get('name', path.name)}")
    return Tokenizer.from_dir(path, meta), info, meta


def partial_dir(out: Path) -> Path:
    """An empty folder beside `out` to write a dataset into; `publish` puts it in out's place."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path, meta: dict, report: dict):
    """Write meta.json and report.json into tmp, then replace out with it: a dataset folder is
    whole or absent, never half-written."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write_shards(out: Path, split: str, ids: np.ndarray, shard_tokens: int) -> list[dict]:
    shards = []
    for k, start in enumerate(range(0, max(len(ids), 1), shard_tokens)):
        part = ids[start : start + shard_tokens]
        name = f"{split}_{k:03d}.bin"
        mm = np.memmap(out / name, dtype=ids.dtype, mode="w+", shape=(len(part),))
        mm[:] = part
        mm.flush()
        del mm
        shards.append({"file": name, "tokens": int(len(part))})
    return shards


def encode_examples(tok, docs: list[Document], dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instruction examples (and any plain documents among them) -> (ids, loss mask, starts)."""
    from llmos.data import sft

    ids, mask, starts = [], [], []
    for d in docs:
        starts.append(len(ids))
        if d.kind == "text":
            piece = tok.encode(d.text, add_bos=False) + ([tok.eos_id] if tok.eos_id is not None else [])
            ids += piece
            mask += [1] * len(piece)
            continue
        try:
            piece, learn = sft.render(tok, d.messages, pair=d.kind == "pair")
        except sft.SFTError as e:
            raise PrepareError(f"{d.source}: {e}") from None
        ids += piece
        mask += learn
    return np.asarray(ids, dtype=dtype), np.asarray(mask, dtype=np.uint8), np.asarray(starts, dtype=np.int64)


def split_examples(docs: list[Document], fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Whole examples to validation, seeded: at least one, and at least one left to train on."""
    if len(docs) < 2:
        raise PrepareError("instruction data needs at least 2 examples (one is held out for validation)")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(fraction * len(docs))))
    val = set(order[:n_val])
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def write_examples(out: Path, split: str, ids: np.ndarray, mask: np.ndarray, starts: np.ndarray) -> list[dict]:
    """One shard of an instruction split: its ids, loss mask and example starts."""
    name = f"{split}_000"
    for suffix, array in ((".bin", ids), (".mask.bin", mask), (".starts.bin", starts)):
        array.tofile(out / f"{name}{suffix}")
    return [{"file": f"{name}.bin", "tokens": int(len(ids)), "mask": f"{name}.mask.bin",
             "starts": f"{name}.starts.bin", "examples": int(len(starts))}]


def encode(tok, texts: list[str], eos_id: int | None, dtype) -> tuple[np.ndarray, list[int]]:
    """The texts' ids joined by the end-of-text token, and each text's length in tokens (its own
    end-of-text included)."""
    if not texts:
        return np.zeros(0, dtype=dtype), []
    pieces, lengths = [], []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        pieces.append(np.asarray(enc.ids + ([eos_id] if eos_id is not None else []), dtype=dtype))
        lengths.append(len(pieces[-1]))
    return np.concatenate(pieces), lengths


def prepare(cfg: PrepareConfig, progress=None, translator=None) -> dict:
    """Run the whole pipeline; return the report (also written to report.json). translator:
    (text, random.Random) -> text, for --augment backtranslate (llmos.writing.paraphrase)."""
    report_progress = progress or (lambda *a: None)
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (out / "meta.json").exists():
        raise PrepareError(f"{out} exists and is not a prepared dataset; choose an empty or new -o folder")
    files, problems = expand_inputs(cfg.inputs)
    if not files:
        detail = "; ".join(f"{i}: {r}" for i, r in problems) or "nothing given"
        raise PrepareError(f"no input files found ({detail})")
    skipped: list[tuple[str, str]] = list(problems)
    options = CleanOptions(cfg.separator, cfg.lowercase, cfg.remove_stopwords)
    docs: list[Document] = []
    for i, path in enumerate(files):
        docs.extend(read_documents([path], options, skipped))
        report_progress("Reading", i + 1, len(files))
    read = len(docs)
    exact_removed = near_removed = 0
    if cfg.dedup:
        seen, unique = set(), []
        for d in docs:
            key = exact_key(d.text)
            if key not in seen:
                seen.add(key)
                unique.append(d)
        exact_removed = len(docs) - len(unique)
        hasher = MinHasher(seed=cfg.seed)
        sigs = []
        for i, d in enumerate(unique):
            sigs.append(hasher.signature(d.text))
            if i % 64 == 0 or i == len(unique) - 1:
                report_progress("Deduplicating", i + 1, len(unique))
        drop = near_duplicates(sigs, cfg.near_dup_threshold)
        near_removed = len(drop)
        docs = [d for i, d in enumerate(unique) if i not in drop]
    if not docs:
        reasons = "; ".join(f"{f}: {r}" for f, r in skipped[:5])
        raise PrepareError(f"the corpus is empty after reading and cleaning ({reasons or 'no text'})")
    instruction = any(d.kind != "text" for d in docs)
    if instruction:
        bad = [(f, r) for f, r in skipped if re.search(r"\.jsonl:\d+$", f)]
        if bad:  # in instruction data a broken example is an error, not noise to skip
            raise PrepareError(f"{bad[0][0]}: {bad[0][1]}" + (f" (and {len(bad) - 1} more lines)" if len(bad) > 1 else ""))
        train_docs, val_docs = split_examples(docs, cfg.val_fraction, cfg.seed)
        train_texts, val_texts = [d.text for d in train_docs], [d.text for d in val_docs]
        originals = [(d.source, d.text) for d in train_docs]
    else:
        groups, labels, label_names = document_classes(docs, cfg.group_by, cfg.label_field)
        train_pairs, val_pairs = split_documents(docs, cfg.val_fraction, cfg.seed)
        originals = [(docs[i].source, text) for text, i in train_pairs]  # the copying check's sources, without augmented views
        augmentation = None
        if cfg.augment:
            from llmos.data.augment import AugmentError, Augmenter

            try:
                augmenter = Augmenter(cfg.augment, cfg.augment_copies, cfg.seed, translator)
            except AugmentError as e:
                raise PrepareError(str(e)) from None
            added = []
            for k, (text, i) in enumerate(train_pairs):
                added += [(view, i) for _, view in augmenter.views(i, text)]
                report_progress("Augmenting", k + 1, len(train_pairs))
            train_pairs += added
            augmentation = {**augmenter.summary(), "views": augmenter.log}
        train_texts, val_texts = [t for t, _ in train_pairs], [t for t, _ in val_pairs]
    report_progress("Tokenizer", 0, 1)
    tok, tok_info, source_meta, model_tok = build_tokenizer(cfg, train_texts, val_texts)
    report_progress("Tokenizer", 1, 1)
    if instruction and model_tok is None:
        raise PrepareError("chat and prompt/completion records are rendered with a model's chat template: "
                           "pass --tokenizer MODEL (the model you will fine-tune)")
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab_size <= 65535 else np.uint32
    eos = tok_info.get("eos_token")
    eos_id = tok.token_to_id(eos) if eos else None
    report_progress("Tokenizing", 0, 2)
    if instruction:
        train_ids, train_mask, train_starts = encode_examples(model_tok, train_docs, dtype)
        report_progress("Tokenizing", 1, 2)
        val_ids, val_mask, val_starts = encode_examples(model_tok, val_docs, dtype)
    else:
        train_ids, train_lengths = encode(tok, train_texts, eos_id, dtype)
        report_progress("Tokenizing", 1, 2)
        val_ids, val_lengths = encode(tok, val_texts, eos_id, dtype)
    report_progress("Tokenizing", 2, 2)

    tmp = partial_dir(out)
    meta = {
        "vocab_size": vocab_size,
        "dtype": np.dtype(dtype).name,
        "tokenizer": tok_info,
        "eos_id": eos_id,
        "mask_id": tok.token_to_id(tok_info["mask_token"]) if tok_info.get("mask_token") else None,
        "instruction": instruction,
        "train": (write_examples(tmp, "train", train_ids, train_mask, train_starts) if instruction
                  else write_shards(tmp, "train", train_ids, cfg.shard_tokens)),
        "val": (write_examples(tmp, "val", val_ids, val_mask, val_starts) if instruction
                else write_shards(tmp, "val", val_ids, cfg.shard_tokens)),
        "prepare": {k: v for k, v in asdict(cfg).items() if k != "report"},
    }
    if not instruction:
        for split, pairs, lengths in (("train", train_pairs, train_lengths), ("val", val_pairs, val_lengths)):
            meta[f"{split}_documents"] = write_documents(tmp, split, lengths, [groups[i] for _, i in pairs],
                                                         [labels[i] for _, i in pairs], cfg.shard_tokens)
        meta["labels"] = label_names
        meta["group_by"] = cfg.group_by
    if source_meta is not None:  # keep the source model's prompt style for fine-tuning
        meta["prompt_style"] = source_meta.get("prompt_style")
    tok.save(str(tmp / "tokenizer.json"))
    if cfg.copy_index:
        from llmos.data.copying import DATASET_INDEX, build_index

        report_progress("Copy index", 0, 1)
        build_index(originals).save(tmp / DATASET_INDEX)
        meta["copy_index"] = DATASET_INDEX
        report_progress("Copy index", 1, 1)
    report = {
        "files": len(files),
        "documents_read": read,
        "exact_duplicates_removed": exact_removed,
        "near_duplicates_removed": near_removed,
        "documents_kept": len(docs),
        "train_documents": len(train_texts),
        "val_documents": len(val_texts),
        "train_tokens": int(len(train_ids)),
        "val_tokens": int(len(val_ids)),
        "vocab_size": vocab_size,
        "skipped": [{"file": f, "reason": r} for f, r in skipped],
    }
    if not instruction:
        report["groups"] = len(set(groups))
        report["labels"] = label_names
        if augmentation is not None:
            report["augmentation"] = augmentation
    if instruction:
        report["loss_tokens"] = {"train": int(train_mask.sum()), "val": int(val_mask.sum())}
    publish(tmp, out, meta, report)
    return report
