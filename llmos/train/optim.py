"""Optimizers: AdamW, or Muon for the hidden matrices with AdamW for everything else.

Muon (Keller Jordan, 2024, https://kellerjordan.github.io/posts/muon/) takes SGD momentum and
replaces each matrix's update by the nearest semi-orthogonal matrix, computed with a few
Newton-Schulz iterations. Every direction of the update then moves by the same amount, which
lets small models learn more per step than with AdamW. Embeddings, the output head and the
norm gains are not hidden matrices and stay with AdamW, as in the original recipe.

PyTorch ships a Muon too, but it orthogonalizes in bfloat16, which is several times slower than
float32 on CPUs without AMX/AVX-512 BF16; this one uses float32 on CPU, bfloat16 on GPU.
"""

from __future__ import annotations

import torch

# Quintic Newton-Schulz coefficients from the Muon reference implementation: they push
# singular values towards [0.7, 1.2] in 5 steps rather than converging exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of g = U S V^T, for a batch of matrices (..., m, n)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalized per matrix, with decoupled weight decay.

    A parameter that stacks several matrices along its rows (a fused q/k/v projection) has
    their row counts in `splits` ({parameter: [rows, ...]}), and each is orthogonalized on
    its own. The step is scaled by 0.2 * sqrt(max(rows, cols)), which gives
    updates the root-mean-square size of AdamW's, so AdamW's learning rate carries over
    (Liu et al. 2025, "Muon is Scalable for LLM Training").
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5, splits: dict | None = None):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        self.splits = {id(p): rows for p, rows in (splits or {}).items()}
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon optimizes matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu)  # Nesterov
                parts = update.split(self.splits.get(id(p), [p.shape[0]]))
                if len({t.shape for t in parts}) == 1:
                    update = orthogonalize(torch.stack(parts), group["ns_steps"]).flatten(0, 1)
                else:
                    update = torch.cat([orthogonalize(t, group["ns_steps"]) for t in parts])
                scale = 0.2 * max(parts[0].shape) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)
        return loss


class Optimizers:
    """Several optimizers stepped, zeroed and saved as one; the trainer's schedule sets the
    same lr in every group of each."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict):
        saved = state.get("optimizers")
        if saved is None or len(saved) != len(self.optimizers):
            raise ValueError("the checkpoint's optimizer state belongs to another --optimizer")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)
