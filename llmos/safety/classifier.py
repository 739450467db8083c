"""A sentence classifier on the knowledge-base embedder, for harm the rules do not spell out.

Softmax regression over all-MiniLM-L6-v2 sentence vectors, fitted on the labelled seed
sentences in data/seed.jsonl (English and Chinese, dark fiction among the "none" examples so
that darkness alone is not a signal). It is fitted on first use, in a few seconds, and the
weights are cached beside the embedder in $LLMOS_HOME/embedders/ (or in $LLMOS_HOME/safety/ when
that folder is read-only) under the hash of the seed file, the embedder and the classes.
It sees whole sentences only; personal data is left to the checksummed detectors.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch

from llmos.safety.policy import CATEGORIES
from llmos.safety.rules import DATA
from llmos.settings import llmos_home

SEED = DATA / "seed.jsonl"
CLASSES = ("none",) + tuple(c for c in CATEGORIES if c != "personal_data")


class SentenceClassifier:
    def __init__(self, embedder, weight: torch.Tensor, bias: torch.Tensor):
        self.embedder = embedder
        self.weight, self.bias = weight, bias  # (C, D), (C,)

    def probabilities(self, sentences: list[str]) -> torch.Tensor:
        """sentences -> (N, C) class probabilities, columns in CLASSES order."""
        if not sentences:
            return torch.zeros(0, len(CLASSES))
        x = self.embedder.embed(sentences)  # (N, D) unit vectors
        return torch.softmax(x @ self.weight.T + self.bias, dim=-1)


def fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full batch with L-BFGS; classes weighted to balance."""
    torch.manual_seed(0)
    counts = torch.bincount(y, minlength=n_classes).clamp(min=1).float()
    class_weight = counts.sum() / (n_classes * counts)
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    scale = 20.0  # unit vectors have small dot products; a fixed temperature lets the weights stay small

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(scale * x @ w.T + b, y, weight=class_weight) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (scale * w).detach(), b.detach()


def load_seed(path: Path = SEED) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(CLASSES.index(row["label"]))
    return texts, labels


_lock = threading.Lock()
_cache: dict[str, SentenceClassifier] = {}


def get_classifier(embedder_path: str | Path | None = None) -> SentenceClassifier:
    """The fitted classifier (one per process), fitting and caching it on first use."""
    from llmos.embedder import DEFAULT_EMBEDDER, get_embedder

    with _lock:
        key = str(embedder_path or "")
        if key in _cache:
            return _cache[key]
        embedder = get_embedder(embedder_path)
        digest = hashlib.sha256(SEED.read_bytes() + DEFAULT_EMBEDDER.encode() + ",".join(CLASSES).encode()).hexdigest()[:16]
        # beside the embedder it was fitted on (so it goes where the embedder goes), else in $LLMOS_HOME/safety
        places = [Path(embedder.path) / f"safety-classifier-{digest}.pt", llmos_home() / "safety" / f"classifier-{digest}.pt"]
        for cached in places:
            try:
                state = torch.load(cached, weights_only=True)
                weight, bias = state["weight"], state["bias"]
                break
            except (OSError, RuntimeError, KeyError):
                continue
        else:
            texts, labels = load_seed()
            weight, bias = fit(embedder.embed(texts), torch.tensor(labels), len(CLASSES))
            for cached in places:
                try:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cached.with_suffix(f".{os.getpid()}.tmp")
                    torch.save({"weight": weight, "bias": bias, "classes": list(CLASSES)}, tmp)
                    tmp.replace(cached)  # whole file or none, when two processes fit at once
                    break
                except OSError:
                    continue
        _cache[key] = SentenceClassifier(embedder, weight, bias)
        return _cache[key]
