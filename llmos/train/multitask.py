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
    """The model and its heads as one module, so one optimizer and one DDP wrapper hold both.
    forward returns the final hidden states; the losses take it from there."""

    def __init__(self, model: nn.Module, heads: Heads):
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, return_hidden=True)


def mean_pool(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, C) hidden states, (B,) real lengths -> (B, C): the mean over each row's tokens."""
    mask = (torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]).to(hidden.dtype)
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def info_nce(z: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """z: (B, P) normalised, rows in pairs [a0, b0, a1, b1, ...]. (loss, accuracy): accuracy is
    the share of rows whose nearest other row is their pair (in-batch recall@1)."""
    B = z.shape[0]
    sim = (z @ z.T) / tau
    sim = sim.masked_fill(torch.eye(B, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.arange(B, device=z.device) ^ 1  # 0<->1, 2<->3, ...
    return F.cross_entropy(sim, partner), (sim.argmax(1) == partner).float().mean()


def multitask_losses(net: nn.Module, heads: Heads, x, y, lengths, labels, lambdas: tuple[float, float, float],
                     tau: float, lm_loss) -> dict[str, torch.Tensor]:
    """The weighted total and each term. `net` maps ids to hidden states (the DDP-wrapped
    MultitaskNet in training); `lm_loss(logits, targets)` is the trainer's token loss."""
    hidden = net(x)
    model = heads_owner(net).model
    out = {}
    lam_lm, lam_cl, lam_task = lambdas
    out["lm_loss"] = lm_loss(model.lm_head(hidden).float(), y)
    pooled = mean_pool(hidden.float(), lengths)
    out["cl_loss"], out["cl_acc"] = info_nce(heads.embed(pooled), tau)
    total = lam_lm * out["lm_loss"] + lam_cl * out["cl_loss"]
    if heads.classify is not None and bool((labels >= 0).any()):
        logits = heads.classify(pooled)
        out["task_loss"] = F.cross_entropy(logits, labels, ignore_index=-1)
        known = labels >= 0
        out["task_acc"] = (logits.argmax(1)[known] == labels[known]).float().mean()
        total = total + lam_task * out["task_loss"]
    out["loss"] = total
    return out


def heads_owner(net: nn.Module) -> MultitaskNet:
    return net.module if hasattr(net, "module") else net


@torch.no_grad()
def corpus_centroid(net: MultitaskNet, data, block: int, rows: int = 16, seed: int = 0) -> torch.Tensor:
    """The mean style embedding of `rows` passages of the training split (normalised)."""
    gen = torch.Generator().manual_seed(seed)
    x, _, lengths, _, _ = data.pair_batch("train", rows, block, gen)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    z = net.heads.embed(mean_pool(net(x.to(device)).float(), lengths.to(device)))
    net.train(was_training)
    return F.normalize(z.mean(0), dim=-1)


def recall_at_1(vectors: torch.Tensor, groups: list[int]) -> float:
    """The share of passages whose nearest other passage (cosine) comes from the same group."""
    v = F.normalize(vectors.float(), dim=-1)
    sim = v @ v.T
    sim.fill_diagonal_(float("-inf"))
    nearest = sim.argmax(1).tolist()
    return sum(groups[i] == groups[j] for i, j in enumerate(nearest)) / max(len(groups), 1)
