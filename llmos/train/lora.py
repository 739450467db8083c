"""LoRA (Hu et al., 2021): train a low-rank update B·A beside frozen weights, W' = W + (α/r)·B·A.

Written here rather than taken from PEFT: the Transformer fuses q/k/v and gate/up into one
matrix each, an adapter here is four small modules, and what the rest of LLMOS needs is exactly
this file's three operations: wrap the target linears, save only the adapter's tensors, and
merge them into the base weights at load (so an adapted model decodes at its base's speed,
packed to fp16 like any other). Targets name the Transformer's linears: `wqkv` (attention
q, k, v), `wo` (attention output), `w13` (MLP gate and up), `w2` (MLP down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from llmos.weights.adapters import AdapterError

TARGETS = ("wqkv", "wo", "w13", "w2")


@dataclass
class LoRAConfig:
    rank: int
    alpha: float | None = None  # None: 2 * rank
    dropout: float = 0.0  # on the adapter's input; a Bernoulli mask per linear costs ~10% of a CPU step
    targets: list[str] = field(default_factory=lambda: list(TARGETS))

    def __post_init__(self):
        if self.rank < 1:
            raise AdapterError(f"--lora takes a rank of at least 1, got {self.rank}")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise AdapterError(f"--lora-targets names no module; choose from {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


class LoRALinear(nn.Module):
    """A frozen linear layer plus its trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # zero: training starts at the base model
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        # the scale goes on the (rank, out) factor, not on the (batch, time, out) product
        return self.base(x) + (self.dropout(x) @ self.lora_a.T) @ (self.lora_b.T * self.scale)

    def delta(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scale  # (out, in), what merging adds to the weight


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze the model and wrap every target linear of its blocks; the wrapped modules' names.
    A target that matches no module is an error."""
    unknown = sorted(set(cfg.targets) - set(TARGETS))
    if unknown:
        raise AdapterError(f"unknown LoRA target(s) {', '.join(unknown)}; the Transformer's linears are {', '.join(TARGETS)}")
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in cfg.targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, cfg.rank, cfg.scale, cfg.dropout))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    missing = [t for t in cfg.targets if not any(w.endswith("." + t) or w == t for w in wrapped)]
    if missing:
        raise AdapterError(f"LoRA target(s) {', '.join(missing)} match no module of this model")
    return wrapped


def adapter_state(state: dict[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors (of a model, or of its state dict): what an adapter checkpoint stores."""
    items = state.named_parameters() if isinstance(state, nn.Module) else state.items()
    return {name: p.detach() for name, p in items if ".lora_" in name}
