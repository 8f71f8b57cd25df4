"""Running the real `snakemake` on this repository's Snakefile from tests.

Every run works in its own folder (`--directory`), so results, logs and `.snakemake/` never land
in the checkout; the Snakefile, the rules and the `relora` package come from the checkout.
"""

from __future__ import annotations

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
    """`size=/condition=/seed=` keys of the jobs of `rule` that a (dry) run lists."""
    text = output_of(result)
    keys = set()
    for block in re.split(r"\n(?=\[.*\]\n(?:local)?rule )", text):
        if re.search(rf"^(?:local)?rule {rule}:", block, flags=re.M):
            keys.update(re.findall(r"runs/(size=[^/]+/condition=[^/]+/seed=\d+)/", block))
    return keys


def write_study(path: Path, study: dict) -> Path:
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())
