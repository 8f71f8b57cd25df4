"""envs/*.yaml (for --software-deployment-method conda) pin pyproject.toml's dependencies: one
exact version per package (the one CI installs with pip), within pyproject.toml's range."""

import re

import pytest
import yaml

from workflow_helpers import REPO

tomllib = pytest.importorskip("tomllib")

# conda-forge names of the PyPI packages whose names differ
CONDA_NAMES = {"torch": "pytorch", "duckdb": "python-duckdb"}
# Snakemake runs the workflow; the jobs' environments do not need it
NOT_IN_ENVS = {"snakemake"}
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*$")


def requirements(lines) -> dict[str, str]:
    """{name: version spec} of requirement strings like 'numpy>=1.26'."""
    parsed = {}
    for line in lines:
        name, spec = REQUIREMENT.match(line).groups()
        parsed[name.lower()] = spec.replace(" ", "")
    return parsed


def pyproject_dependencies() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = requirements(project["dependencies"])
    return {CONDA_NAMES.get(n, n): s for n, s in deps.items() if n not in NOT_IN_ENVS}


def env_dependencies(path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    assert "conda-forge" in env["channels"], path
    listed = [d for d in env["dependencies"] if isinstance(d, str)]
    return {n: s for n, s in requirements(listed).items() if n not in ("python", "pip")}


ENVS = sorted((REPO / "envs").glob("*.yaml"))


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_pins_a_version_within_pyprojects_range(path):
    from packaging.specifiers import SpecifierSet

    wanted = pyproject_dependencies()
    for name, spec in env_dependencies(path).items():
        assert name in wanted, f"{path.name}: {name} is not a dependency in pyproject.toml"
        assert re.fullmatch(r"==[0-9][0-9A-Za-z.]*", spec), f"{path.name}: {name}{spec} is not an exact pin"
        version = spec.removeprefix("==")
        assert version in SpecifierSet(wanted[name]), \
            f"{path.name}: {name}{spec} is outside pyproject.toml's {name}{wanted[name]}"


def test_a_package_has_one_pin_across_envs():
    pins: dict[str, set] = {}
    for path in ENVS:
        for name, spec in env_dependencies(path).items():
            pins.setdefault(name, set()).add(spec)
    assert {n: v for n, v in pins.items() if len(v) > 1} == {}


def test_envs_cover_every_dependency():
    covered = set().union(*(env_dependencies(p) for p in ENVS))
    missing = set(pyproject_dependencies()) - covered
    assert not missing, f"in pyproject.toml but in no envs/*.yaml: {sorted(missing)}"


def test_python_versions_agree():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for path in ENVS:
        env = yaml.safe_load(path.read_text())
        assert f"python{project['requires-python']}" in env["dependencies"], path.name


def test_every_rule_names_an_existing_env():
    rules = sorted((REPO / "workflow/rules").glob("*.smk"))
    named = set()
    for rule_file in rules:
        named.update(re.findall(r'conda:\s*\n\s*"([^"]+)"', rule_file.read_text()))
    assert named, "no rule has a conda environment"
    for env in named:
        assert (REPO / "workflow/rules" / env).resolve().is_file(), env


def test_base_install_can_build_the_snakemake_report():
    """`snakemake --report` needs Snakemake's `reports` extra (pygments); the README's install
    (`pip install -e .`) must bring it, not only the test extra."""
    from importlib.metadata import requires

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    if any(re.match(r"^snakemake\[[^\]]*\breports\b", d.replace(" ", "")) for d in base):
        return
    extra = [r.split(";")[0].strip() for r in requires("snakemake") or [] if 'extra == "reports"' in r]
    assert extra, "snakemake declares no reports extra"
    names = set(requirements(base))
    missing = [r for r in requirements(extra) if r not in names]
    assert not missing, f"the base install lacks Snakemake's report dependencies {missing}"


def test_catalog_usage_says_what_the_workflow_has():
    """.snakemake-workflow-catalog.yml: conda only where every rule that runs a command names an
    environment; no container claimed while no rule names one (README, Software environments)."""
    usage = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    deployment = usage["software-stack-deployment"]
    rules = "".join(p.read_text() for p in sorted((REPO / "workflow/rules").glob("*.smk")))
    rules += (REPO / "Snakefile").read_text()
    n_commands = len(re.findall(r"^\s+shell:\s*$", rules, flags=re.M))
    n_envs = len(re.findall(r"^\s+conda:\s*$", rules, flags=re.M))
    assert deployment["conda"] == (n_commands > 0 and n_envs == n_commands), (n_commands, n_envs)
    has_container = bool(re.search(r"^\s*container:", rules, flags=re.M))
    assert deployment["apptainer"] == has_container
    assert deployment["apptainer+conda"] == (has_container and deployment["conda"])
    assert deployment["report"] is True  # tests/test_workflow_e2e.py builds the report zip
    assert "## Software environments" in (REPO / "README.md").read_text()


def commands_by_env() -> dict[str, set[str]]:
    """{env file name: the `relora` subcommands its rules run}, read from workflow/rules/*.smk."""
    found: dict[str, set[str]] = {}
    for rule_file in sorted((REPO / "workflow/rules").glob("*.smk")):
        for rule in re.split(r"\n(?=rule \w+:)", rule_file.read_text()):
            env = re.search(r'conda:\s*\n\s*"[^"]*?([\w.-]+\.yaml)"', rule)
            if env:
                found.setdefault(env.group(1), set()).update(re.findall(r"python -m relora (\w+)", rule))
    return found


# what the tests below run with torch hidden
TORCH_FREE_COMMANDS = {"corpus", "tokenizer", "tokenize", "probe", "blimp", "manifest",
                       "aggregate", "figures", "report"}


def test_envs_without_pytorch_run_only_torch_free_commands():
    by_env = commands_by_env()
    assert by_env.get("data.yaml") and by_env.get("results.yaml"), by_env
    for path in ENVS:
        if "pytorch" not in env_dependencies(path):
            needing_torch = by_env.get(path.name, set()) - TORCH_FREE_COMMANDS
            assert not needing_torch, f"{path.name} has no pytorch but its rules run relora {sorted(needing_torch)}"


def relora_without_torch(env: dict, cwd, *args: str) -> str:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "relora", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"relora {args[0]} without torch:\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result.stderr


def test_data_commands_run_without_torch(tmp_path, torch_hidden_env):
    """Every command of the data rules, on the end-to-end tests' shrunk study, with torch hidden."""
    from workflow_helpers import tiny_study, write_study

    study = write_study(tmp_path / "study.yaml", tiny_study(tmp_path))
    data = tmp_path / "data"
    for args in (("corpus", "--out", data / "corpus"),
                 ("tokenizer", "--corpus", data / "corpus", "--out", data / "tokenizer.json"),
                 ("tokenize", "--corpus", data / "corpus", "--tokenizer", data / "tokenizer.json", "--out", data),
                 ("probe", "--eval", data / "eval", "--tokenizer", data / "tokenizer.json", "--out", data / "probe.npy"),
                 ("blimp", "--corpus", data / "corpus", "--tokenizer", data / "tokenizer.json", "--out", data / "blimp")):
        relora_without_torch(torch_hidden_env, tmp_path, args[0], "--config", str(study), *map(str, args[1:]))
    relora_without_torch(torch_hidden_env, tmp_path, "manifest", "--data", str(data))
    relora_without_torch(torch_hidden_env, tmp_path, "manifest", "--data", str(data), "--verify")
    assert (data / "train.npy").is_file() and (data / "probe.npy").is_file() and any((data / "blimp").iterdir())


@pytest.mark.slow
def test_results_commands_run_without_torch(e2e_study, tmp_path, torch_hidden_env):
    """aggregate, figures and report on the shrunk study's runs, with torch hidden."""
    data = e2e_study.results / "data"
    db, figures = tmp_path / "study.duckdb", tmp_path / "figures"
    relora_without_torch(torch_hidden_env, tmp_path, "aggregate", "--config", str(e2e_study.study_file),
                         "--runs", *map(str, e2e_study.run_dirs()),
                         "--blimp-baselines", str(data / "blimp_unigram.parquet"), "--out", str(db))
    relora_without_torch(torch_hidden_env, tmp_path, "figures", "--db", str(db), "--out-dir", str(figures),
                         "--formats", "svg")
    relora_without_torch(torch_hidden_env, tmp_path, "report", "--config", str(e2e_study.study_file), "--db", str(db),
                         "--figures", str(figures), "--manifest", str(data / "manifest.json"),
                         "--out", str(tmp_path / "report.html"))
    assert db.is_file() and any(figures.glob("*.svg")) and (tmp_path / "report.html").is_file()
