"""Shared test setup: keep CPU use small (the machine is shared with a Rust build)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
except ImportError:
    pass
except RuntimeError:
    pass
