"""Token shards written by `llmos prepare`, read through memory maps.

Batches are random windows (nanoGPT's sampling), or, for instruction data, whole examples
packed into rows (`packed_batch`: each example keeps to itself in attention, and only its
assistant tokens are targets), or, for the multi-task objective, pairs of passages of one group
(`pair_batch`: two documents of one author, or two parts of one document). All ranks of a distributed run draw the same global batch from
the same seeded generator and each takes its own slice, so a run's data order depends only on
the seed and the global batch size, and resuming restores it exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


class DataError(ValueError):
    """The dataset folder is missing, incomplete or too small."""


class TokenData:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{self.path} is not a prepared dataset (no meta.json); run `llmos prepare` first")
        self.meta = json.loads(meta_file.read_text())
        self.vocab_size = int(self.meta["vocab_size"])
        dtype = np.dtype(self.meta["dtype"])
        self.shards, self.examples = {}, {}
        self.instruction = bool(self.meta.get("instruction"))
        for split in ("train", "val"):
            arrays = []
            for shard in self.meta[split]:
                if shard["tokens"] == 0:
                    continue
                f = self.path / shard["file"]
                if not f.is_file():
                    raise DataError(f"{f} is missing; run `llmos prepare` again")
                arrays.append(np.memmap(f, dtype=dtype, mode="r", shape=(shard["tokens"],)))
                if self.instruction:
                    try:
                        mask = np.fromfile(self.path / shard["mask"], dtype=np.uint8)
                        starts = np.fromfile(self.path / shard["starts"], dtype=np.int64)
                    except (OSError, KeyError) as e:
                        raise DataError(f"{self.path}: an instruction shard lacks its mask or starts ({e}); "
                                        f"run `llmos prepare` again") from None
                    if len(mask) != shard["tokens"] or len(starts) != shard.get("examples", len(starts)):
                        raise DataError(f"{self.path}: {shard['file']} and its mask or starts disagree; run `llmos prepare` again")
                    self.examples[split] = (arrays[-1], mask, starts)
            self.shards[split] = arrays
        # the document index of plain text (llmos prepare): shard, start, end, group, label
        self.documents = {}
        for split in ("train", "val"):
            name = self.meta.get(f"{split}_documents")
            if name and (self.path / name).is_file():
                self.documents[split] = np.fromfile(self.path / name, dtype=np.int64).reshape(-1, 5)
        self.labels: list[str] = list(self.meta.get("labels") or [])

    def sample_prompt(self) -> list[int]:
        """The held-out text's first tokens, for the samples printed while training."""
        return [int(t) for t in self.shards["val"][0][:16]]

    def tokens(self, split: str) -> int:
        return sum(len(a) for a in self.shards[split])

    def check(self, split: str, block_size: int, batch_size: int = 1):
        if self.instruction:
            if split not in self.examples or len(self.examples[split][2]) == 0:
                raise DataError(f"the {split} split holds no examples: add some, or prepare with another --val-fraction")
            return
        usable = [a for a in self.shards[split] if len(a) > block_size + 1]
        if not usable:
            n = self.tokens(split)
            raise DataError(
                f"the {split} split has {n} tokens, fewer than one window of {block_size + 1}: "
                f"add text, or lower the context (--block-size)"
            )

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
              rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch, block), targets shifted by one token. `rows` takes
        a slice of the drawn batch (a rank's share of the global batch)."""
        arrays = [a for a in self.shards[split] if len(a) > block_size + 1]
        if not arrays:
            self.check(split, block_size)
        sizes = torch.tensor([len(a) - block_size - 1 for a in arrays], dtype=torch.float64)
        which = torch.multinomial(sizes / sizes.sum(), batch_size, replacement=True, generator=generator) \
            if len(arrays) > 1 else torch.zeros(batch_size, dtype=torch.long)
        offsets = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * sizes[which]).long()
        picks = list(zip(which.tolist(), offsets.tolist()))
        if rows is not None:
            picks = picks[rows]
        windows = np.stack([np.asarray(arrays[w][o : o + block_size + 1], dtype=np.int64) for w, o in picks])
        t = torch.from_numpy(windows)
        return t[:, :-1], t[:, 1:]

    def packed_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                     rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, segments), each (batch, block): random whole examples packed into
        each row (one that does not fit starts the next row; one longer than a row is cut).
        Targets are -100 where the loss does not count (the prompt, padding); segments number
        the examples of a row (padding gets its own), for the model's packed attention."""
        ids, mask, starts = self.examples[split]
        ends = np.append(starts[1:], len(ids))
        usable = np.nonzero(ends - starts >= 2)[0]  # an example needs an input and a target
        if len(usable) == 0:
            raise DataError(f"the {split} split has no example of two tokens or more")
        x = np.zeros((batch_size, block_size), dtype=np.int64)
        y = np.full((batch_size, block_size), -100, dtype=np.int64)
        seg = np.zeros((batch_size, block_size), dtype=np.int64)
        for b in range(batch_size):
            used, k = 0, 0
            while used < block_size:
                e = int(usable[int(torch.randint(len(usable), (1,), generator=generator))])
                s, t = int(starts[e]), int(ends[e])
                length = t - s - 1  # an example of n tokens gives n - 1 (input, target) pairs
                if length > block_size - used:
                    if used:
                        break  # a fresh row for it next time
                    length = block_size
                window = np.asarray(ids[s : s + length + 1], dtype=np.int64)
                x[b, used : used + length] = window[:-1]
                y[b, used : used + length] = np.where(mask[s + 1 : s + length + 1] > 0, window[1:], -100)
                seg[b, used : used + length] = k
                used, k = used + length, k + 1
            seg[b, used:] = k  # padding: a segment of its own, with no targets
        if rows is not None:
            x, y, seg = x[rows], y[rows], seg[rows]
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(seg)

    def check_pairs(self, split: str):
        """The multi-task objective needs a document index and two groups or more."""
        if split not in self.documents:
            raise DataError(f"{self.path} has no document index (instruction data, or prepared by an older "
                            f"version): prepare plain text again with `llmos prepare` for --objective multitask")
        docs = self.documents[split]
        groups = np.unique(docs[docs[:, 2] - docs[:, 1] >= 2][:, 3])
        if len(groups) < 2:
            raise DataError(
                f"the {split} split has {len(groups)} source(s) to tell apart; the contrastive objective needs 2 "
                f"or more: give several documents (files, JSONL records, --separator), or --group-by a JSONL field")

    def pair_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                   rows: slice | None = None):
        """Rows in pairs, [a0, b0, a1, b1, ...]: batch_size // 2 groups (distinct while there are
        enough), two passages of each: two of its documents, or, for a group of one document,
        one from each half of it, so the two never overlap.
        Returns (inputs, targets, lengths, groups, labels): targets -100 on padding after a
        passage shorter than the block; labels -1 where a document has none."""
        docs = self.documents[split]
        docs = docs[docs[:, 2] - docs[:, 1] >= 2]
        by_group: dict[int, np.ndarray] = {}
        for g in np.unique(docs[:, 3]):
            by_group[int(g)] = np.nonzero(docs[:, 3] == g)[0]
        names = sorted(by_group)
        pairs = batch_size // 2
        order = torch.randperm(len(names), generator=generator).tolist()
        chosen = [names[order[k % len(names)]] for k in range(pairs)]  # repeats only when groups run short
        x = np.zeros((batch_size, block_size), dtype=np.int64)
        y = np.full((batch_size, block_size), -100, dtype=np.int64)
        lengths = np.zeros(batch_size, dtype=np.int64)
        groups = np.zeros(batch_size, dtype=np.int64)
        labels = np.full(batch_size, -1, dtype=np.int64)

        def rand(n: int) -> int:
            return int(torch.randint(max(n, 1), (1,), generator=generator))

        for k, g in enumerate(chosen):
            members = by_group[g]
            first = members[rand(len(members))]
            others = members[members != first]
            second = others[rand(len(others))] if len(others) else first
            spans = []
            for view, d in enumerate((first, second)):
                shard, start, end = (int(v) for v in docs[d, :3])
                if first == second and end - start >= 4:
                    half = (end - start) // 2  # two passages of one document: one from each half, apart
                    start, end = (start, start + half) if view == 0 else (start + half, end)
                spans.append((shard, start, end))
            for view, (shard, start, end) in enumerate(spans):
                r = 2 * k + view
                n = min(end - start, block_size + 1)
                o = start + rand(end - start - n + 1)
                w = np.asarray(self.shards[split][shard][o : o + n], dtype=np.int64)
                x[r, : n - 1], y[r, : n - 1] = w[:-1], w[1:]
                lengths[r], groups[r] = n - 1, g
                labels[r] = docs[first if view == 0 else second, 4]
        if rows is not None:
            x, y, lengths, groups, labels = x[rows], y[rows], lengths[rows], groups[rows], labels[rows]
        return tuple(torch.from_numpy(a) for a in (x, y, lengths, groups, labels))
