"""Running the real `snakemake` on this repository's Snakefile from tests.

Every run works in its own folder (`--directory`), so results, logs and `.snakemake/` never land
in the checkout; the Snakefile, the rules and the `relora` package come from the checkout.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SNAKEFILE = REPO / "Snakefile"
STUDIES = [REPO / "config.yaml", *sorted((REPO / "workflow" / "studies").glob("*.yaml"))]


def snakemake(workdir: Path, *args: str, env: dict | None = None, timeout: float = 600,
              runner: list[str] | None = None) -> subprocess.CompletedProcess:
    """`snakemake -s REPO/Snakefile --directory WORKDIR ARGS`, output captured as text."""
    command = (runner or [sys.executable, "-m", "snakemake"]) + [
        "--snakefile", str(SNAKEFILE), "--directory", str(workdir), *args]
    environment = {**os.environ, **(env or {})}
    # jobs run `python -m relora`: the interpreter running the tests, even from an unactivated venv
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment["PATH"]])
    environment.pop("SNAKEMAKE_PROFILE", None)
    return subprocess.run(command, cwd=workdir, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def output_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def job_counts(result: subprocess.CompletedProcess) -> dict[str, int]:
    """The `Job stats` table of a (dry) run: {rule: count}."""
    text = output_of(result)
    table = text[text.index("Job stats:"):].splitlines()[3:]
    counts = {}
    for line in table:
        match = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not match or match.group(1) == "total":
            break
        counts[match.group(1)] = int(match.group(2))
    return counts


def planned_runs(result: subprocess.CompletedProcess, rule: str = "train") -> set[str]:
    """`size=/condition=/seed=` keys of the jobs of `rule` that a (dry) run lists (the runs/
    folders they read or write; for `run_config`, the config/<stage>/ file it writes)."""
    text = output_of(result)
    keys = set()
    for block in re.split(r"\n(?=\[.*\]\n(?:local)?rule )", text):
        if re.search(rf"^(?:local)?rule {rule}:", block, flags=re.M):
            keys.update(re.findall(r"(?:runs|config/\w+)/(size=[^/]+/condition=[^/]+/seed=\d+)[/.]", block))
    return keys


def tree_listing(root: Path, skip=(".snakemake", ".git")) -> dict[str, tuple]:
    """{relative path: (size, mtime_ns)} of every file and folder under root, but the folders
    Snakemake and git keep for themselves."""
    listing = {}
    for path in sorted(Path(root).rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] in skip:
            continue
        stat = path.lstat()
        listing[str(relative)] = (stat.st_size if path.is_file() else None, stat.st_mtime_ns)
    return listing


def write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


# --- the shrunk end-to-end study ---------------------------------------------------------------

def tiny_study(root: Path, name: str = "e2e", seeds=(0, 1),
               conditions=("full", "relora-paper", "relora"), device: str = "cpu") -> dict:
    """The shrunk study of the end-to-end tests: the paper's comparison (full, relora-paper,
    relora) on a synthetic two-domain corpus, one 2-layer d=24 model, 12 steps, evaluated at
    steps 0, 6 and 12 and analysed there and around the merges (after updates 5 and 9): steps 4,
    6, 8 and 10 as well. Seconds per job; the jobs' start-up dominates."""
    from data_helpers import write_domain_files

    source = root / "corpus_source"
    source.mkdir(parents=True, exist_ok=True)
    files = write_domain_files(source, domains=("alpha", "beta"), docs=80)
    relora = {"method": "relora", "rank": 4, "alpha": 8, "dropout": 0.1, "reset_every": 4,
              "restart_warmup": 1, "optimizer_reset": {"mode": "random", "ratio": 0.999},
              "training": {"schedule": {"name": "jagged_cosine", "warmup": 4, "min_ratio": 0.1}}}
    all_conditions = {
        "full": {"method": "full"},
        "relora-paper": {**copy.deepcopy(relora), "lora_init": "paper", "merge_scale": "paper"},
        "relora": {**copy.deepcopy(relora), "lora_init": "standard", "merge_scale": "correct",
                   "optimizer_reset": {"mode": "random", "ratio": 0.999, "masks": "shared"}},
    }
    return {
        "study": name,
        "data": {"seq_len": 64, "probe_batch": 4,
                 "tokenizer": {"vocab_size": 320, "min_frequency": 1},
                 "corpus": {"source": "files", "files": files, "heldout_fraction": 0.2,
                            "max_chars_per_domain": None},
                 "eval": {"min_docs_per_domain": 2, "max_tokens_per_domain": 2000}},
        "sizes": {"mini": {"d_model": 24, "n_layers": 2, "n_heads": 6, "n_kv_heads": 2}},
        "training": {"steps": 12, "batch_size": 4, "lr": 3.0e-3,
                     "schedule": {"name": "linear", "warmup": 2},
                     "checkpoint_every": 6, "save_state_every": 4, "log_every": 1,
                     "device": device, "seed_base": 0},
        "conditions": {c: all_conditions[c] for c in conditions},
        "seeds": list(seeds),
        "evaluation": {"every": 6,
                       "blimp": {"source": "generated", "pairs_per_paradigm": 4,
                                 "min_word_count": 0}},
        "analysis": {"every": 6, "around_merges": [-1, 1]},
        "workflow": {"threads": {"data": 1, "train": 1, "evaluate": 1, "dynamics": 1,
                                 "results": 1}},
    }


class StudyRun:
    """A completed run of the workflow: its folder, study file and Snakemake output."""

    def __init__(self, workdir: Path, study_file: Path, result: subprocess.CompletedProcess):
        self.workdir, self.study_file, self.result = workdir, study_file, result
        self.study = load_yaml(study_file)
        self.results = workdir / "results" / self.study["study"]

    def run_dirs(self) -> list[Path]:
        from relora.config import load_study, runs

        return [self.results / f"runs/size={s}/condition={c}/seed={n}"
                for s, c, n in runs(load_study(self.study_file))]


def run_tiny_study(root: Path, cores: int = 2, **study_options) -> StudyRun:
    """Run the whole workflow once on `tiny_study` in root/work; raise with the logs if it fails."""
    workdir = root / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    study_file = write_study(root / "study.yaml", tiny_study(root, **study_options))
    result = snakemake(workdir, "--cores", str(cores), "--configfile", str(study_file),
                       timeout=1800)
    if result.returncode != 0:
        raise RuntimeError("the shrunk study failed:\n" + output_of(result)[-6000:]
                           + failed_logs(workdir))
    return StudyRun(workdir, study_file, result)


def failed_logs(workdir: Path, tail: int = 3000) -> str:
    """The ends of the non-empty job logs, to see why a job failed."""
    parts = []
    for log in sorted(workdir.glob("results/*/logs/**/*.log")):
        text = log.read_text(errors="replace")
        if "Traceback" in text or "error" in text.lower():
            parts.append(f"\n--- {log.relative_to(workdir)}\n{text[-tail:]}")
    return "".join(parts)
