"""Weights kept in their GGUF block formats: stored as they come, multiplied as they are.

A quantized weight is one or more row groups, each a (rows, bytes per row) uint8 tensor of
GGUF blocks with its block type: a fused q/k/v projection whose parts the GGUF quantized
differently (Gemma's Q5_0 queries beside Q8_0 values) stays three groups that share one pass
over the activations. In a checkpoint, group i of weight `name` is the tensor `name.q{i}` and
the safetensors metadata entry "quantized" maps each name to its [[type, rows], ...].
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn as nn

import llmos.kernels as kernels

Groups = list[tuple[int, torch.Tensor]]  # (GGUF block type, (rows, bytes) uint8)


def type_name(block_type: int) -> str:
    return kernels.BLOCK_TYPES[block_type][0]


def row_length(groups: Groups) -> int:
    """Weights per row, from the first group's block type and bytes per row."""
    block_type, w = groups[0]
    _, block, nbytes = kernels.BLOCK_TYPES[block_type]
    return w.shape[1] // nbytes * block


def dequantize(groups: Groups, k: int) -> torch.Tensor:
    """The float32 (rows, k) matrix; without the compiled kernels, gguf's numpy decoder does it."""
    parts = []
    for block_type, w in groups:
        if kernels.available():
            parts.append(kernels.dequantize(w, block_type, k))
        else:
            from gguf import GGMLQuantizationType, quants

            parts.append(torch.from_numpy(
                quants.dequantize(w.numpy(), GGMLQuantizationType(block_type)).reshape(w.shape[0], k).astype(np.float32)))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def fuse(groups: Groups) -> Groups:
    """Adjacent groups of one block type become one (fewer, larger kernel calls)."""
    out: Groups = []
    for block_type, w in groups:
        if out and out[-1][0] == block_type:
            out[-1] = (block_type, torch.cat([out[-1][1], w]))
        else:
            out.append((block_type, w))
    return out


# From this many rows of activations on (a prompt read at once), decoding the weights to float32
# and one matrix product beat the integer kernels, whose work grows with every row.
DEQUANTIZE_ROWS = 32
DEQUANTIZE_FLOATS = 1 << 18  # weights decoded at once there (a slice of rows; 1 MiB of float32)


class QLinear(nn.Module):
    """y = x @ W^T (+ bias) for a block-quantized W."""

    def __init__(self, groups: Groups, in_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.groups, self.in_features, self.bias = groups, in_features, bias
        self.out_features = sum(w.shape[0] for _, w in groups)
        self.block_weights = [w for _, w in groups]  # what the kernels take (model.py's fused decode too)
        self.block_types = [t for t, _ in groups]

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= DEQUANTIZE_ROWS:
            # a slice of rows at a time, so that no more than ~1 MiB of float weights exists at once
            x2 = x2.float()
            y = torch.empty(x2.shape[0], self.out_features)
            col, step = 0, max(64, DEQUANTIZE_FLOATS // self.in_features)
            for t, w in self.groups:
                for start in range(0, w.shape[0], step):
                    rows = w[start : start + step]
                    y[:, col : col + len(rows)] = x2 @ kernels.dequantize(rows, t, self.in_features).T
                    col += len(rows)
        else:
            y = kernels.qmm(x2, self.block_weights, self.block_types)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self):
        kinds = "+".join(type_name(t) for t in self.block_types)
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={kinds}"


class QEmbedding(nn.Module):
    """Rows of a block-quantized embedding table, decoded on lookup."""

    def __init__(self, groups: Groups, dim: int):
        super().__init__()
        (self.block_type, self.table), = fuse(groups)
        self.embedding_dim, self.num_embeddings = dim, self.table.shape[0]

    def forward(self, idx):
        return kernels.dequantize(self.table, self.block_type, self.embedding_dim, idx.reshape(-1)).view(
            *idx.shape, self.embedding_dim)


def save_metadata(quant: dict[str, Groups]) -> dict[str, str]:
    return {"quantized": json.dumps({name: [[t, int(w.shape[0])] for t, w in groups] for name, groups in quant.items()})}


def split_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None):
    """A checkpoint's tensors -> (float tensors, {name: groups}); checks the metadata against them."""
    listing = json.loads((metadata or {}).get("quantized", "{}"))
    quant: dict[str, Groups] = {}
    for name, parts in listing.items():
        groups = []
        for i, (block_type, rows) in enumerate(parts):
            w = tensors.pop(f"{name}.q{i}", None)
            if w is None or w.dtype != torch.uint8 or w.dim() != 2 or w.shape[0] != rows:
                raise ValueError(f"quantized weight {name} group {i} is missing or malformed")
            if block_type not in kernels.BLOCK_TYPES:
                raise ValueError(f"quantized weight {name} has block type {block_type}, which is not supported")
            groups.append((int(block_type), w))
        quant[name] = groups
    return tensors, quant


def block_summary(quant: dict[str, Groups]) -> str:
    """'Q4_1 (Q8_0 embeddings)': the block types by share of bytes, for `llmos models`."""
    size: dict[int, int] = {}
    for name, groups in quant.items():
        if name == "embed.weight":
            continue
        for t, w in groups:
            size[t] = size.get(t, 0) + w.numel()
    main = "/".join(type_name(t) for t, _ in sorted(size.items(), key=lambda kv: -kv[1])) or "-"
    if "embed.weight" in quant:
        main += f" ({'/'.join(type_name(t) for t, _ in quant['embed.weight'])} embeddings)"
    return main
