"""The built wheel is self-contained: installed without the source tree beside it, `relora`
finds its schema and its published BLiMP table."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from relora import __version__
from relora.config import load_study

# what a build reads: the package, the schema it copies in, the build configuration
BUILD_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "relora",
               "workflow/schemas/config.schema.yaml")


def run(command, cwd, env):
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_version_flag(capsys):
    from relora.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"relora {__version__}\n"


def test_the_source_tree_reads_the_one_schema(repo):
    from relora.config import SCHEMA_PATH

    # the wheel's copy (relora/config.schema.yaml) is made at build time and never read here
    assert SCHEMA_PATH == repo / "workflow" / "schemas" / "config.schema.yaml"


@pytest.mark.slow
def test_wheel_runs_describe_outside_the_source_tree(repo, tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    for name in BUILD_FILES:
        if (repo / name).is_dir():
            shutil.copytree(repo / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no source tree on the path

    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
         str(source)], tmp_path, env)
    wheel, = wheels.glob("relora_study-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read("relora/config.schema.yaml") == (repo / "workflow/schemas/config.schema.yaml").read_bytes()
        assert "relora/data/blimp_reference.csv" in names
        assert not any(n.startswith(("workflow/", "tests/")) for n in names)

    # a venv made from this (virtual) environment sees the base interpreter's packages, not this
    # environment's: a .pth adds them (torch, numpy, ...). An editable relora installed here is
    # not reachable through it: .pth files in an added folder are not processed.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    tmp_path, env).strip())
    (site / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
         str(wheel)], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy2(repo / "config.yaml", elsewhere / "config.yaml")
    where = json.loads(run([str(python), "-c", "import json, relora, relora.config; print(json.dumps("
                            "[relora.__file__, str(relora.config.SCHEMA_PATH)]))"], elsewhere, env))
    package = site / "relora"
    assert Path(where[0]).parent == package and Path(where[1]) == package / "config.schema.yaml"

    relora = str(venv / "bin" / "relora")
    assert run([relora, "--version"], elsewhere, env).strip() == f"relora {__version__}"
    installed = run([relora, "describe", "--json", "--config", "config.yaml"], elsewhere, env)
    from_source = run([sys.executable, "-m", "relora", "describe", "--json", "--config", "config.yaml"],
                      elsewhere, {**env, "PYTHONPATH": str(repo)})
    rows = json.loads(installed)
    assert rows == json.loads(from_source)
    study = load_study(repo / "config.yaml")
    assert {(r["size"], r["condition"]) for r in rows} == {(s, c) for s in study["sizes"]
                                                           for c in study["conditions"]}
