"""Knowledge-base retrieval: all-MiniLM-L6-v2 embeddings (the `llmos kb` path) against BM25.

    python benchmarks/kb.py                 # labelled questions, then 10k passages for speed
    python benchmarks/kb.py --scale 0       # the labelled questions only

Labelled set: benchmarks/data/shop/ (six documents of a made-up stationery shop, written for
this benchmark) and questions.jsonl (60 questions, mostly paraphrased away from the documents'
words, each labelled with a phrase found only in the passage that answers it). Recall@k: the
share of questions whose answering passage is among the top k. BM25 (Okapi, k1=1.5, b=0.75,
lower-cased word tokens) ranks the very same passages. Scale: --scale passages of Tiny
Shakespeare are indexed next to the shop documents; we report indexing speed (passages/s),
query latency (embedding the question + searching, median of 50) and recall with those
distractors present. Results: a table, and JSON in benchmarks/results/kb.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import RESULTS, ROOT, cpu_name, print_table, write_json

DATA = ROOT / "benchmarks" / "data" / "shop"


class BM25:
    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75):
        self.docs = [Counter(self.tokens(t)) for t in texts]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg = sum(self.lengths) / len(self.docs)
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
        self.k1, self.b = k1, b

    @staticmethod
    def tokens(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())

    def top(self, query: str, k: int) -> list[int]:
        q = self.tokens(query)
        scores = []
        for i, d in enumerate(self.docs):
            norm = self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avg)
            scores.append(sum(self.idf.get(w, 0) * d[w] * (self.k1 + 1) / (d[w] + norm) for w in q if w in d))
        return sorted(range(len(scores)), key=lambda i: -scores[i])[:k]


def recall(ranked: list[list[str]], golds: list[str], k: int) -> float:
    return sum(any(g in t for t in r[:k]) for r, g in zip(ranked, golds)) / len(golds)


def shakespeare_files(folder: Path, passages: int) -> int:
    """Write `passages` paragraphs of 70 words from Tiny Shakespeare, 100 per file (two of them
    exceed a passage's 120 words, so each paragraph becomes one passage)."""
    text = (ROOT / "benchmarks" / "data" / "tinyshakespeare.txt").read_text()
    words = text.split()
    chunks = [" ".join(words[i : i + 70]) for i in range(0, len(words) - 70, 70)]
    while len(chunks) < passages:  # the corpus holds ~2.8k such paragraphs: vary the repeats
        chunks += [f"({len(chunks) // 3000}) " + c for c in chunks[: passages - len(chunks)]]
    chunks = chunks[:passages]
    for f in range(0, passages, 100):
        (folder / f"play_{f // 100:04d}.txt").write_text("\n\n".join(chunks[f : f + 100]))
    return len(chunks)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=10_000, help="distractor passages for the speed run (0: skip)")
    ap.add_argument("--out", default=str(RESULTS / "kb.json"))
    args = ap.parse_args()

    import torch

    from llmos.chat.kb import KnowledgeBase
    from llmos.embedder import get_embedder
    from llmos.db import Store

    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines() if line.strip()]
    golds = [q["gold"] for q in questions]
    t0 = time.perf_counter()
    embedder = get_embedder()
    load_s = time.perf_counter() - t0
    results = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "questions": len(questions), "embedder_load_s": load_s}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store = Store(tmp / "kb.db")
        kb = KnowledgeBase(store, "shop", create=True, embedder=embedder)
        report = kb.add([str(DATA)])
        passages = [r["text"] for r in store.db.execute("SELECT text FROM kb_passages ORDER BY id")]
        for g in golds:  # each label must name exactly one passage
            assert sum(g in p for p in passages) == 1, f"label {g!r} is not unique"
        dense = [[h.text for h in kb.search(q["question"], 5)] for q in questions]
        bm25 = BM25(passages)
        sparse = [[passages[i] for i in bm25.top(q["question"], 5)] for q in questions]
        results["labelled"] = {
            "passages": len(passages),
            "minilm": {"recall@1": recall(dense, golds, 1), "recall@5": recall(dense, golds, 5)},
            "bm25": {"recall@1": recall(sparse, golds, 1), "recall@5": recall(sparse, golds, 5)},
            "misses_minilm@1": [q["question"] for q, r in zip(questions, dense) if not any(q["gold"] in t for t in r[:1])],
        }
        lab = results["labelled"]
        rows.append([f"labelled ({len(passages)} passages)", "all-MiniLM-L6-v2", f"{lab['minilm']['recall@1']:.2f}",
                     f"{lab['minilm']['recall@5']:.2f}", f"{report.passages / report.seconds:.0f}", "-"])
        rows.append([f"labelled ({len(passages)} passages)", "BM25", f"{lab['bm25']['recall@1']:.2f}",
                     f"{lab['bm25']['recall@5']:.2f}", "-", "-"])

        if args.scale:
            folder = tmp / "plays"
            folder.mkdir()
            shakespeare_files(folder, args.scale)
            big = KnowledgeBase(store, "scale", create=True, embedder=embedder)
            big.add([str(DATA)])
            t0 = time.perf_counter()
            r = big.add([str(folder)])
            index_s = time.perf_counter() - t0
            big.search("warm up", 5)
            lat, search_only = [], []
            query_vec = embedder.embed(["When will my parcel arrive?"])[0]
            from llmos.embedder import cosine_top_k

            for q in questions[:50]:
                t0 = time.perf_counter()
                big.search(q["question"], 5)
                lat.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                cosine_top_k(query_vec, big._load(), 5)
                search_only.append(time.perf_counter() - t0)
            total = len(passages) + r.passages
            dense_big = [[h.text for h in big.search(q["question"], 5)] for q in questions]
            all_texts = [row["text"] for row in store.db.execute("SELECT text FROM kb_passages WHERE kb_id = ? ORDER BY id", (big.id,))]
            bm25_big = BM25(all_texts)
            sparse_big = [[all_texts[i] for i in bm25_big.top(q["question"], 5)] for q in questions]
            results["scale"] = {
                "passages": total, "index_s": index_s, "passages_per_s": r.passages / index_s,
                "query_ms_median": 1000 * statistics.median(lat), "search_only_ms_median": 1000 * statistics.median(search_only),
                "minilm": {"recall@1": recall(dense_big, golds, 1), "recall@5": recall(dense_big, golds, 5)},
                "bm25": {"recall@1": recall(sparse_big, golds, 1), "recall@5": recall(sparse_big, golds, 5)},
            }
            s = results["scale"]
            rows.append([f"with {total:,} passages", "all-MiniLM-L6-v2", f"{s['minilm']['recall@1']:.2f}",
                         f"{s['minilm']['recall@5']:.2f}", f"{s['passages_per_s']:.0f}",
                         f"{s['query_ms_median']:.1f} ({s['search_only_ms_median']:.2f} search)"])
            rows.append([f"with {total:,} passages", "BM25", f"{s['bm25']['recall@1']:.2f}", f"{s['bm25']['recall@5']:.2f}", "-", "-"])
    print_table(["set", "retriever", "recall@1", "recall@5", "index passages/s", "query ms (median)"], rows)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
