import os
from pathlib import Path

import pytest
import torch

# tests are small: one thread keeps them fast and leaves the second core to a parallel job
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
SHARED_BLIMP = Path(os.environ.get("RELORA_BLIMP_DIR", REPO.parent / "shared" / "data" / "blimp"))


@pytest.fixture
def repo():
    return REPO


@pytest.fixture
def blimp_dir():
    if not SHARED_BLIMP.is_dir():
        pytest.skip(f"real BLiMP data not found at {SHARED_BLIMP}")
    return SHARED_BLIMP
