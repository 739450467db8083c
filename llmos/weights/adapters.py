"""Adapters on disk: a LoRA run stores only its low-rank factors (adapter.safetensors) and names
its base model by name and hash; loading merges them into the base weights, so an adapted
model runs exactly like a plain one (packed to fp16 at the same speed). See train/lora.py for
training them."""

from __future__ import annotations

import torch


class AdapterError(ValueError):
    """An adapter that does not fit its base model, or a bad LoRA setting."""


def adapter_deltas(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Adapter tensors (as saved) -> the weight updates to add, keyed by the base weights' names
    ("blocks.0.attn.wqkv.weight"), for merging into a plain model."""
    deltas = {}
    for name, a in state.items():
        if name.endswith(".lora_a"):
            prefix = name[: -len(".lora_a")]
            b = state.get(prefix + ".lora_b")
            if b is None:
                raise AdapterError(f"the adapter has {name} but no {prefix}.lora_b")
            deltas[prefix + ".weight"] = (b.float() @ a.float()) * scale
    return deltas


def merge_into(state: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]):
    """Add the adapter's updates to a base model's state dict, in place."""
    for name, delta in deltas.items():
        if name not in state:
            raise AdapterError(f"the adapter updates {name}, which the base model does not have")
        if state[name].shape != delta.shape:
            raise AdapterError(f"the adapter's update of {name} is {tuple(delta.shape)}, the weight is {tuple(state[name].shape)}")
        state[name] = (state[name].float() + delta).to(state[name].dtype)
