"""Where LLMOS keeps its files: one user directory, overridable with LLMOS_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def llmos_home() -> Path:
    """$LLMOS_HOME, else ~/.local/share/llmos (XDG_DATA_HOME respected)."""
    if env := os.environ.get("LLMOS_HOME"):
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "llmos"


def models_dir() -> Path:
    return llmos_home() / "models"


def books_dir() -> Path:
    """Books written over the HTTP API (`llmos write novel -o` names its own folder)."""
    return llmos_home() / "books"
