"""Float16-packed linear layers for fast CPU inference, on FBGEMM's fp16 GEMM.

Weights are stored as float16 in FBGEMM's blocked layout; activations stay float32, so the only
rounding is of the weights (~1e-3 relative; the bundled GGUF weights are 4-8 bit values to
begin with). Decoding a token reads every weight once, so halving the bytes read is what makes
small-batch decoding fast on a CPU. Measured against float32 and bfloat16 in
docs/benchmarks.md.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn

# FBGEMM packs large matrices far more slowly per element than small ones (14 M weights/s for
# Gemma's 262144-row output head, 55 M/s for 8192-row blocks), so big layers are packed, and
# run, as row blocks.
PACK_ROWS = 8192


class PackedLinear(nn.Module):
    def __init__(self, blocks: list, in_features: int, out_features: int):
        super().__init__()
        self.blocks, self.in_features, self.out_features = blocks, in_features, out_features

    def forward(self, x):
        x = x.float()
        if len(self.blocks) == 1:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.blocks[0])
        return torch.cat([torch.ops.quantized.linear_dynamic_fp16(x, b) for b in self.blocks], dim=-1)


def _pack(weight: torch.Tensor):
    return torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), None)


def pack_linears(model: nn.Module, threads: int | None = None) -> nn.Module:
    """Replace every bias-free nn.Linear of `model` (a tied output head too) in place.

    Packing dominates load time; the op releases the GIL, so row blocks are packed in threads.
    """
    layers = [
        (module, name, child)
        for module in model.modules()
        for name, child in module.named_children()
        if isinstance(child, nn.Linear) and child.bias is None
    ]
    jobs = [(i, w) for i, (_, _, c) in enumerate(layers) for w in c.weight.split(PACK_ROWS)]
    with ThreadPoolExecutor(threads or torch.get_num_threads()) as pool:
        packed = list(pool.map(lambda job: _pack(job[1]), jobs))
    blocks: dict[int, list] = {}
    for (i, _), p in zip(jobs, packed):
        blocks.setdefault(i, []).append(p)
    for i, (module, name, child) in enumerate(layers):
        setattr(module, name, PackedLinear(blocks[i], child.in_features, child.out_features))
    return model
