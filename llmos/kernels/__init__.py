"""Quantized matrix kernels: GGUF blocks multiplied as they are stored (see qmatmul.cpp).

The C++ library is compiled once for this machine (`make install` does it; otherwise the first
use does, in about a minute) into `build/` beside these sources, or the user's cache folder when
the package folder is read-only. It registers `torch.ops.llmos.qmm` and `torch.ops.llmos.dequantize`.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / "qmatmul.cpp"]
DEPENDS = [HERE / "qmatmul_simd.inc"]

# GGUF block types the kernels compute with: type id -> (name, weights per block, bytes per block)
BLOCK_TYPES = {
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
}
PATHS = {0: "reference C++", 1: "AVX2", 2: "AVX-512 VNNI"}

_loaded: bool | None = None
_error: str | None = None


class KernelError(RuntimeError):
    """The kernels cannot be built here (no C++ compiler, most often)."""


def _build_dir() -> Path:
    digest = hashlib.sha256()
    for path in SOURCES + DEPENDS:
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    tag = digest.hexdigest()[:12]
    for root in (HERE / "build", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmos" / "kernels"):
        folder = root / tag
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".writable"
            probe.touch()
            return folder
        except OSError:
            continue
    raise KernelError("no writable folder to build the quantized kernels in")


def load(verbose: bool = False) -> None:
    """Compile (once) and load the library; KernelError says why it cannot be."""
    global _loaded, _error
    if _loaded:
        return
    if _error is not None:
        raise KernelError(_error)
    from torch.utils import cpp_extension

    folder = _build_dir()
    # torch's loader runs `ninja` from PATH; the ninja package puts it beside this interpreter.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    built = folder / "llmos_qkernels.so"
    try:
        if built.exists():
            torch.ops.load_library(str(built))
        else:
            if not verbose:
                print("Compiling the quantized kernels for this CPU (once, about a minute)...", file=sys.stderr)
            cpp_extension.load(
                name="llmos_qkernels", sources=[str(s) for s in SOURCES], build_directory=str(folder),
                extra_cflags=["-O3", "-std=c++17", "-fopenmp"], extra_ldflags=["-fopenmp"],
                is_python_module=False, verbose=verbose,
            )
    except Exception as e:  # compiler missing or failing: a message, not a traceback
        _error = (f"the quantized kernels cannot be built ({type(e).__name__}: {str(e).strip()[-400:]}); "
                  f"install a C++ compiler (g++) or load the model with --precision fp16")
        raise KernelError(_error) from None
    _loaded = True


def ready() -> bool:
    """Loaded in this process (the model's inference fast paths check this, never building)."""
    return bool(_loaded)


def available() -> bool:
    try:
        load()
    except KernelError:
        return False
    return True


def path_name() -> str:
    """Which code path the kernels run on this CPU."""
    load()
    return PATHS[torch.ops.llmos.kernel_path()]


def qmm(x: torch.Tensor, weights: list[torch.Tensor], types: list[int]) -> torch.Tensor:
    """x (M, K) float -> (M, sum of rows) float32: x times each weight group's rows, side by side."""
    return torch.ops.llmos.qmm(x, weights, types)


def dequantize(w: torch.Tensor, block_type: int, k: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `ids` (all rows when None) of a block-quantized (rows, bytes) matrix, as float32 (n, k)."""
    return torch.ops.llmos.dequantize(w, block_type, k, ids)
