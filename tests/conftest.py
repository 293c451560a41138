import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch

if not torch.cuda.is_available():
    # Where Triton is installed (the Makefile installs it beside the CPU torch), its kernels run in Triton's
    # interpreter on CPU tensors (tests/zo/test_fused_interpret.py, test_fused_encode.py). Set before zo2tier
    # is imported: @triton.jit reads it when each kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests use tiny tensors: per-op overhead dominates, and intra-op threads only add barriers
# (10x slower on a loaded 2-core machine). One thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)
