"""Training checkpoints: self-contained folders, written atomically.

A run folder holds `step-NNNNNNN/` checkpoint folders and a `LATEST` file naming the newest
complete one. A checkpoint is written into a temporary folder, fsynced, renamed into place,
and only then does `LATEST` change (write to a temporary file, then rename); older
checkpoints are removed last. Killing the process at any moment leaves `LATEST` pointing at a
complete checkpoint. A checkpoint folder loads anywhere a model name does.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

LATEST = "LATEST"


class CheckpointError(ValueError):
    pass


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / pointer.read_text().strip()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete; remove {pointer} to start over")
    return path


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model_state: dict, config: dict, tokenizer_file: Path,
                    train_state: dict, keep: int = 1, weights_file: str = "model.safetensors",
                    protect: str | None = None, extra: dict[str, dict] | None = None) -> Path:
    """weights_file: "adapter.safetensors" for a LoRA run (model_state then holds only the
    adapter). protect: a checkpoint kept whatever `keep` says (the best one, under early stopping).
    extra: more safetensors files, name -> tensors (the multi-task heads)."""
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        # Tied weights are stored once (safetensors refuses shared tensors).
        state = {k: v.detach().contiguous() for k, v in model_state.items()
                 if not (k == "lm_head.weight" and config["model"].get("tie_embeddings"))}
        save_file(state, str(tmp / weights_file), metadata={"format": "pt"})
        for file, tensors in (extra or {}).items():
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / file), metadata={"format": "pt"})
        torch.save(train_state, tmp / "train_state.pt")
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        pointer_tmp = run_dir / f".{LATEST}.tmp"
        pointer_tmp.write_text(name)
        pointer_tmp.replace(run_dir / LATEST)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    olds = sorted(p for p in run_dir.glob("step-*") if p.is_dir() and p.name not in (name, protect))
    for old in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def mark_best(run_dir: Path, checkpoint: Path):
    """BEST names the checkpoint with the lowest validation loss; a run folder used as a model
    name loads it (written atomically, like LATEST)."""
    tmp = run_dir / ".BEST.tmp"
    tmp.write_text(checkpoint.name)
    tmp.replace(run_dir / "BEST")


def load_train_state(checkpoint: Path) -> dict:
    """Optimizer, RNG and data position; weights_only loading executes nothing from the file."""
    return torch.load(checkpoint / "train_state.pt", weights_only=True)
