"""Token shards written by `llmos prepare`, read through memory maps.

Batches are random windows (nanoGPT's sampling). All ranks of a distributed run draw the same
global batch from the same seeded generator and each takes its own slice, so a run's data order
depends only on the seed and the global batch size, and resuming restores it exactly.
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
        self.shards = {}
        for split in ("train", "val"):
            arrays = []
            for shard in self.meta[split]:
                if shard["tokens"] == 0:
                    continue
                f = self.path / shard["file"]
                if not f.is_file():
                    raise DataError(f"{f} is missing; run `llmos prepare` again")
                arrays.append(np.memmap(f, dtype=dtype, mode="r", shape=(shard["tokens"],)))
            self.shards[split] = arrays

    def tokens(self, split: str) -> int:
        return sum(len(a) for a in self.shards[split])

    def check(self, split: str, block_size: int, batch_size: int = 1):
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
