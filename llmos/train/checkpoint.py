"""Training checkpoints: self-contained folders, written atomically.

A run folder holds `step-NNNNNNN/` checkpoint folders and a `LATEST` file naming the newest
complete one. A checkpoint is written into a temporary folder, fsynced, renamed into place,
and only then does `LATEST` change (write to a temporary file, then rename); older
checkpoints are removed last, each renamed out of the way before it is deleted. A step saved
again (a resumed run that stops where it started) goes to a new name, `step-NNNNNNN.K`, so the
folder `LATEST` (or `BEST`) names is never the one being replaced. Killing the process at any
moment leaves `LATEST` pointing at a complete checkpoint. A checkpoint folder loads anywhere a
model name does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

LATEST = "LATEST"
_NAME = re.compile(r"step-(\d+)(?:\.(\d+))?")


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


def checkpoint_name(run_dir: Path, step: int) -> str:
    """The folder name the next save of `step` gets: step-NNNNNNN, unless LATEST or BEST names
    that folder (the step is saved again), then step-NNNNNNN.K with the first K neither names.
    A folder of that name that neither names is left from a killed save, and is replaced."""
    pointed = set()
    for pointer in (LATEST, "BEST"):
        try:
            pointed.add((run_dir / pointer).read_text().strip())
        except OSError:
            pass
    name, k = f"step-{step:07d}", 0
    while (f"{name}.{k}" if k else name) in pointed:
        k += 1
    return f"{name}.{k}" if k else name


def _age(path: Path) -> tuple[int, int]:
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)), int(m.group(2) or 0)


def _remove(path: Path):
    """Rename out of the way, then delete: a checkpoint name never holds a half-deleted folder."""
    trash = path.with_name(f".{path.name}.old")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


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
    for leftover in (*run_dir.glob(".step-*.tmp"), *run_dir.glob(".step-*.old")):  # from a killed save
        shutil.rmtree(leftover, ignore_errors=True)
    name = checkpoint_name(run_dir, step)
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
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
        if final.exists():  # no pointer names it (see checkpoint_name)
            _remove(final)
        tmp.rename(final)
        pointer_tmp = run_dir / f".{LATEST}.tmp"
        pointer_tmp.write_text(name)
        pointer_tmp.replace(run_dir / LATEST)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    olds = sorted((p for p in run_dir.glob("step-*")
                   if _NAME.fullmatch(p.name) and p.is_dir() and p.name not in (name, protect)), key=_age)
    for old in olds[: max(0, len(olds) - (keep - 1))]:
        _remove(old)
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
