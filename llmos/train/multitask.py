"""The multi-task objective (`--objective multitask`):

    L = lambda_lm * L_LM + lambda_cl * L_CL + lambda_task * L_task

on rows that come in pairs, two passages of one source (`TokenData.pair_batch`).

- L_LM: next-token cross-entropy over every row, as in pretraining.
- L_CL: InfoNCE. A passage's embedding h is the mean of the model's final hidden states over its
  tokens, put through a projection head and L2-normalised; for each row i, with i+ its pair,
  -log(exp(sim(h_i, h_i+)/tau) / sum over j != i of exp(sim(h_i, h_j)/tau)): the other rows of
  the batch are the negatives.
- L_task: cross-entropy of a linear head over the pooled state against the document's label
  (rows without one do not count); absent when the data has no labels.

The heads are saved beside the weights (`heads.safetensors`, described under "heads" in the
checkpoint's config.json), with the centroid of the training corpus's embeddings: `llmos embed
-m RUN` returns the projected embedding, and `llmos write --rank style:RUN` scores candidates by
their closeness to that centroid.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

HEADS_FILE = "heads.safetensors"


class Heads(nn.Module):
    def __init__(self, d_model: int, projection_dim: int, labels: list[str]):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, projection_dim))
        self.classify = nn.Linear(d_model, len(labels)) if labels else None
        self.labels = list(labels)
        self.register_buffer("centroid", torch.zeros(projection_dim))

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(pooled.float()), dim=-1)

    def describe(self) -> dict:
        return {"pooling": "mean", "projection_dim": int(self.project[-1].out_features), "labels": self.labels,
                "file": HEADS_FILE}

    @classmethod
    def from_state(cls, d_model: int, info: dict, state: dict[str, torch.Tensor]) -> Heads:
        heads = cls(d_model, int(info["projection_dim"]), list(info.get("labels") or []))
        heads.load_state_dict(state)
        return heads.eval()


class MultitaskNet(nn.Module):
    """The model and its heads as one module, so one optimizer and one DDP or FSDP wrapper hold
    both, and every parameter is used inside forward."""

    def __init__(self, model: nn.Module, heads: Heads):
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        """(next-token logits, style embeddings, label logits or None) of rows x with real lengths."""
        hidden = self.model(x, return_hidden=True)
        pooled = mean_pool(hidden.float(), lengths)
        labels = self.heads.classify(pooled) if self.heads.classify is not None else None
        return self.model.lm_head(hidden).float(), self.heads.embed(pooled), labels


def mean_pool(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, C) hidden states, (B,) real lengths -> (B, C): the mean over each row's tokens."""
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def info_nce(z: torch.Tensor, tau: float, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z: (B, P) normalised, rows in pairs [a0, b0, a1, b1, ...]. (loss, accuracy): accuracy is
    the share of rows whose nearest other row is their pair (in-batch recall@1). groups (B,):
    other rows of a row's own source (a batch with more pairs than sources) are left out of its
    negatives rather than counted as wrong."""
    B = z.shape[0]
    sim = (z @ z.T) / tau
    partner = torch.arange(B, device=z.device) ^ 1  # 0<->1, 2<->3, ...
    drop = torch.eye(B, dtype=torch.bool, device=z.device)
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        same[torch.arange(B, device=z.device), partner] = False
        drop |= same
    sim = sim.masked_fill(drop, float("-inf"))
    return F.cross_entropy(sim, partner), (sim.argmax(1) == partner).float().mean()


def multitask_losses(net: nn.Module, x, y, lengths, labels, groups, lambdas: tuple[float, float, float],
                     tau: float, lm_loss, distributed: bool = False) -> dict[str, torch.Tensor]:
    """The weighted total and each term. `net`: the MultitaskNet (DDP- or FSDP-wrapped in
    training); `lm_loss(logits, targets)` is the trainer's token loss. distributed: every
    process's embeddings are gathered (with their gradients), so each row's negatives are the
    whole global batch, as in one process; the gradient averaging across processes then gives
    exactly one process's gradient. The LM and label terms are each process's mean, averaged
    across processes as in data-parallel training. The label terms are always there when the
    model has a label head (0 for a batch without labels), so every process reports the same keys."""
    logits, z, label_logits = net(x, lengths)
    out = {}
    lam_lm, lam_cl, lam_task = lambdas
    out["lm_loss"] = lm_loss(logits, y)
    if distributed:
        from torch.distributed.nn.functional import all_gather

        import torch.distributed as dist

        z = torch.cat(all_gather(z), 0)
        every = [torch.empty_like(groups) for _ in range(dist.get_world_size())]
        dist.all_gather(every, groups)
        groups = torch.cat(every)
    out["cl_loss"], out["cl_acc"] = info_nce(z, tau, groups)
    total = lam_lm * out["lm_loss"] + lam_cl * out["cl_loss"]
    if label_logits is not None:
        known = labels >= 0
        count = known.sum().clamp(min=1)
        out["task_loss"] = F.cross_entropy(label_logits, labels.clamp(min=0), reduction="none")[known].sum() / count
        out["task_acc"] = (label_logits.argmax(1) == labels)[known].float().sum() / count
        total = total + lam_task * out["task_loss"]
    out["loss"] = total
    return out


@torch.no_grad()
def corpus_centroid(net: MultitaskNet, data, block: int, batches: int = 4, rows: int = 16, seed: int = 0) -> torch.Tensor:
    """The mean style embedding of batches x rows passages of the training split (normalised)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    total = 0
    for _ in range(batches):
        x, _, lengths, _, _ = data.pair_batch("train", rows, block, gen)
        total = total + net(x.to(device), lengths.to(device))[1].sum(0)
    net.train(was_training)
    return F.normalize(total, dim=-1)


def recall_at_1(vectors: torch.Tensor, groups: list[int]) -> float:
    """The share of passages whose nearest other passage (cosine) comes from the same group."""
    v = F.normalize(vectors.float(), dim=-1)
    sim = v @ v.T
    sim.fill_diagonal_(float("-inf"))
    nearest = sim.argmax(1).tolist()
    return sum(groups[i] == groups[j] for i, j in enumerate(nearest)) / max(len(groups), 1)
