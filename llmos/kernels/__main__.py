"""`python -m llmos.kernels [-v]`: build the quantized kernels now (`make install` runs this)."""

import sys

import torch

from llmos.kernels import load, path_name

load(verbose="-v" in sys.argv)
print(f"quantized kernels ready: {path_name()} path, {torch.get_num_threads()} threads")
