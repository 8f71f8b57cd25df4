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
