"""Direct preference optimization: the objective `--objective dpo` (`llmos finetune --dpo`).

For a prompt x with a preferred answer y+ and a rejected one y-, the loss is
    -log sigmoid(beta * [(log pi(y+|x) - log ref(y+|x)) - (log pi(y-|x) - log ref(y-|x))])
(Rafailov et al., 2023), where pi is the model being trained and ref the model it started
from. The reference's log-probabilities never change, so they are computed once, for every
pair, and cached in the run folder (reference/); with `sft_steps`, the first steps train on
the chosen answers alone and the reference is the model as those steps leave it.

Batches put the chosen sides of B pairs in rows 0..B-1 and their rejected sides in rows
B..2B-1; the targets are the answer's tokens (-100 elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REFERENCE_DIR = "reference"


class PairData:
    """A preference dataset written by data/prefs.py's prepare_preferences."""

    instruction = False

    def __init__(self, path: str | Path):
        from llmos.train.data import DataError

        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{self.path} is not a prepared dataset (no meta.json)")
        self.meta = json.loads(meta_file.read_text())
        if not self.meta.get("preference"):
            raise DataError(f"{self.path} holds text, not preference pairs: --objective dpo trains on pairs "
                            f"(`llmos finetune --dpo` prepares them from the store or a JSONL file)")
        self.vocab_size = int(self.meta["vocab_size"])
        self.ids, self.index = {}, {}
        for split in ("train", "val"):
            try:
                self.ids[split] = np.load(self.path / f"{split}.ids.npy", mmap_mode="r", allow_pickle=False)
                self.index[split] = np.load(self.path / f"{split}.index.npy", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{self.path}: the {split} pairs cannot be read ({e}); prepare them again") from None

    def pairs(self, split: str) -> int:
        return len(self.index[split])

    def check(self, split: str, block_size: int, batch_size: int = 1):
        from llmos.train.data import DataError

        if self.pairs(split) == 0:
            raise DataError(f"the {split} split holds no preference pairs")

    def sample_prompt(self) -> list[int]:
        """The first held-out prompt, for the samples printed while training."""
        start, answer = (int(v) for v in self.index["val"][0, :2])
        return [int(t) for t in self.ids["val"][start:answer]]

    def _side(self, split: str, start: int, answer: int, end: int, block: int) -> tuple[np.ndarray, int]:
        """One sequence cut to block + 1 tokens (the prompt's beginning goes first, then the
        answer's end), and where its answer starts."""
        seq = np.asarray(self.ids[split][start:end], dtype=np.int64)
        a = answer - start
        if len(seq) > block + 1:
            drop = min(a, len(seq) - (block + 1))  # keep the answer whole when it fits
            seq, a = seq[drop:], a - drop
            seq = seq[: block + 1]
        return seq, max(a, 1)  # the first token is never a target

    def batch(self, split: str, which: np.ndarray, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the pairs `which`: (2B, T), chosen rows first."""
        rows = []
        for side in (0, 1):
            for k in which:
                start, answer, end = (int(v) for v in self.index[split][k, 3 * side : 3 * side + 3])
                rows.append(self._side(split, start, answer, end, block))
        width = max(len(s) for s, _ in rows) - 1
        x = np.zeros((len(rows), width), dtype=np.int64)
        y = np.full((len(rows), width), -100, dtype=np.int64)
        for r, (seq, a) in enumerate(rows):
            n = len(seq) - 1
            x[r, :n] = seq[:-1]
            y[r, a - 1 : n] = seq[a:]
        return torch.from_numpy(x), torch.from_numpy(y)

    def draw(self, split: str, batch_size: int, generator: torch.Generator, rows: slice | None = None) -> np.ndarray:
        which = torch.randint(self.pairs(split), (batch_size,), generator=generator).numpy()
        return which[rows] if rows is not None else which


def sequence_logps(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the targets' log-probabilities per row, number of targets per row)."""
    logits = model(x)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=-100,
                          reduction="none").view(y.shape)
    return -nll.sum(-1), (y != -100).sum(-1)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The loss and what to watch, from (2B,) log-probabilities, chosen first. Ties (margin 0:
    the model is still its reference) count half towards the accuracy."""
    b = len(policy) // 2
    chosen_reward = beta * (policy[:b] - reference[:b])
    rejected_reward = beta * (policy[b:] - reference[b:])
    margin = chosen_reward - rejected_reward
    return {"loss": -F.logsigmoid(margin).mean(), "margin": margin.mean(),
            "pref_acc": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
            "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean()}


@torch.no_grad()
def reference_logps(model, data: PairData, block: int, batch_size: int = 4, progress=None) -> dict[str, np.ndarray]:
    """Every pair's (chosen, rejected) log-probability under `model` as it is now: (n, 2) per split."""
    was_training = model.training
    model.eval()
    out = {}
    total = sum(data.pairs(s) for s in ("train", "val"))
    done = 0
    for split in ("train", "val"):
        n = data.pairs(split)
        values = np.zeros((n, 2), dtype=np.float64)
        for k in range(0, n, batch_size):
            which = np.arange(k, min(n, k + batch_size))
            x, y = data.batch(split, which, block)
            logps, _ = sequence_logps(model, x.to(_device(model)), y.to(_device(model)))
            values[which, 0] = logps[: len(which)].double().cpu().numpy()
            values[which, 1] = logps[len(which):].double().cpu().numpy()
            done += len(which)
            if progress:
                progress(done, total)
        out[split] = values
    model.train(was_training)
    return out


def _device(model) -> torch.device:
    return next(model.parameters()).device


def save_reference(run: Path, values: dict[str, np.ndarray], stamp: dict):
    folder = Path(run) / REFERENCE_DIR
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, v in values.items():
        np.save(tmp / f"{split}.npy", v)
    (tmp / "stamp.json").write_text(json.dumps(stamp))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)


def load_reference(run: Path, stamp: dict) -> dict[str, np.ndarray] | None:
    """The cached reference of this run, when it was computed for the same data and block."""
    folder = Path(run) / REFERENCE_DIR
    try:
        saved = json.loads((folder / "stamp.json").read_text())
        if saved != stamp:
            return None
        return {split: np.load(folder / f"{split}.npy", allow_pickle=False) for split in ("train", "val")}
    except (OSError, ValueError):
        return None


@torch.no_grad()
def evaluate(model, data: PairData, split: str, block: int, beta: float, reference: dict | None,
             max_pairs: int, batch_size: int) -> dict[str, float]:
    """On the first max_pairs pairs of a split (the same ones every time): the DPO loss, the
    reward margin and preference accuracy (when a reference exists), the accuracy of the plain
    log-probabilities (chosen above rejected per token: meaningful before training too), the
    loss on the chosen answers (drift from plain language modelling) and the mean log-ratio to
    the reference per answer token."""
    n = min(data.pairs(split), max_pairs)
    policy, counts = [], []
    for k in range(0, n, batch_size):
        which = np.arange(k, min(n, k + batch_size))
        x, y = data.batch(split, which, block)
        logps, count = sequence_logps(model, x.to(_device(model)), y.to(_device(model)))
        b = len(which)
        policy.append(torch.stack([logps[:b], logps[b:]], 1).double().cpu())
        counts.append(torch.stack([count[:b], count[b:]], 1).cpu())
    pol, cnt = torch.cat(policy), torch.cat(counts).double().clamp(min=1)
    per_token = pol / cnt
    out = {"logp_acc": float(((per_token[:, 0] > per_token[:, 1]).double()).mean()),
           "chosen_nll": float(-pol[:, 0].sum() / cnt[:, 0].sum())}
    if reference is not None:
        ref = torch.from_numpy(reference[split][:n])
        terms = dpo_terms(torch.cat([pol[:, 0], pol[:, 1]]), torch.cat([ref[:, 0], ref[:, 1]]), beta)
        out.update({k: float(v) for k, v in terms.items()})
        out["logratio"] = float((pol - ref).sum() / cnt.sum())
    return out
