import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# The tests use tiny tensors: per-op overhead dominates, and intra-op threads only add barriers
# (10x slower on a loaded 2-core machine). One thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)
