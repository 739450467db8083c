"""Document-level deduplication: exact (hash of the text with whitespace collapsed and case
folded) and near-duplicate (MinHash signatures over character 5-grams, banded LSH, then the
estimated Jaccard similarity checked against a threshold). Character shingles work for
languages without spaces, Chinese included.
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np

MERSENNE = (1 << 61) - 1


def exact_key(text: str) -> str:
    return hashlib.sha1(re.sub(r"\s+", " ", text).strip().casefold().encode()).hexdigest()


class MinHasher:
    def __init__(self, num_perm: int = 128, shingle: int = 5, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, MERSENNE, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, MERSENNE, num_perm, dtype=np.uint64)
        self.num_perm, self.shingle = num_perm, shingle

    def signature(self, text: str) -> np.ndarray:
        text = re.sub(r"\s+", " ", text).casefold()
        k = self.shingle
        grams = {text[i : i + k] for i in range(max(1, len(text) - k + 1))}
        h = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
        # (a*h + b) mod p, in uint64 arithmetic: h < 2^32 and a < 2^61 would overflow, so
        # split a into 32-bit halves.
        a_hi, a_lo = self.a >> np.uint64(32), self.a & np.uint64(0xFFFFFFFF)
        hv = h[:, None]
        prod = ((a_hi * hv % MERSENNE) << np.uint64(32)) % MERSENNE
        prod = (prod + a_lo * hv + self.b) % MERSENNE
        return prod.min(axis=0)


def near_duplicates(signatures: list[np.ndarray], threshold: float = 0.8, bands: int = 16) -> set[int]:
    """Indices of documents that nearly duplicate an earlier one (the first copy is kept)."""
    if not signatures:
        return set()
    rows = len(signatures[0]) // bands
    buckets: dict[tuple, list[int]] = {}
    drop: set[int] = set()
    for i, sig in enumerate(signatures):
        candidates = set()
        for b in range(bands):
            key = (b, sig[b * rows : (b + 1) * rows].tobytes())
            candidates.update(buckets.get(key, ()))
        if any(float(np.mean(signatures[j] == sig)) >= threshold for j in candidates if j not in drop):
            drop.add(i)
            continue
        for b in range(bands):
            buckets.setdefault((b, sig[b * rows : (b + 1) * rows].tobytes()), []).append(i)
    return drop
