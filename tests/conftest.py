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


@pytest.fixture(scope="session")
def e2e_study(tmp_path_factory):
    """The shrunk study (tests/workflow_helpers.py: tiny_study), run once per test session by the
    real `snakemake --cores 2`; every end-to-end test reads it, none writes into it (copy
    `e2e_study.workdir` first to change anything)."""
    from workflow_helpers import missing_stage_commands, run_tiny_study

    missing = missing_stage_commands()
    if missing:
        pytest.skip(f"relora subcommands not built yet: {', '.join(missing)}")
    return run_tiny_study(tmp_path_factory.mktemp("e2e_study"))
