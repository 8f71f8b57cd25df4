"""The self-contained report and the `relora aggregate / figures / report` commands."""

import json
import re

import pytest

import synthetic_runs as syn
from relora.cli import main
from relora.report import write_report
from relora.results import aggregate


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """results/<study> built through the command line: one size pair, two conditions, two seeds."""
    root = tmp_path_factory.mktemp("report") / "synthetic"
    syn.write_synthetic_study(root, conditions=("full", "relora"))
    config = root.parent / "study.yaml"
    import yaml

    config.write_text(yaml.safe_dump(syn.synthetic_study()))
    manifest = root.parent / "manifest.json"
    manifest.write_text(json.dumps({"files": {"train.npy": {"bytes": 1234, "sha256": "ab" * 32}},
                                    "sources": {"corpus": "synthetic <test>"}}))
    from test_plots import write_baselines  # three of six paradigms outside [0.35, 0.65]

    db = root / "study.duckdb"
    assert main(["aggregate", "--results", str(root), "--blimp-baselines", str(write_baselines(root)),
                 "--out", str(db)]) == 0
    assert main(["figures", "--db", str(db), "--out-dir", str(root / "figures"), "--formats", "png",
                 "html", "--only", "train_loss", "gap_vs_size"]) == 0
    out = root / "report.html"
    assert main(["report", "--db", str(db), "--figures", str(root / "figures"), "--config", str(config),
                 "--manifest", str(manifest), "--out", str(out)]) == 0
    return root, out


def test_report_is_self_contained(study):
    root, out = study
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"<script[^>]+src=", text)           # no external scripts at all
    assert not re.search(r"""(src|href)=["']https?://""", text)  # nothing fetched from the web
    assert not re.search(r"<link[^>]+stylesheet", text)
    images = re.findall(r'<img [^>]*src="data:image/png;base64,', text)
    assert len(images) == 2
    assert 'href="figures/gap_vs_size.html"' in text  # the interactive version beside it
    assert not list(out.parent.glob(".report.html*"))


def test_report_has_tables_config_and_manifest(study):
    _, out = study
    text = out.read_text()
    for heading in ("Final metrics", "Gap to 'full'", "Figures", "Runs", "Study config",
                    "Data manifest"):
        assert heading in text, heading
    assert "training loss (nats/token)" in text and "p (paired t)" in text
    assert "p (paper's z-test, anti-conservative)" in text  # the paper's test, labelled as such
    assert "BLiMP and word frequency" in text and "outside [0.35, 0.65] on 3 of 6 paradigms" in text
    assert "BLiMP, balanced paradigms" in text  # a headline metric
    assert "relora-paper" not in text.split("Study config")[0]  # only the study's conditions
    assert "seq_len: 128" in text                               # the YAML shown as given
    assert "ab" * 32 in text and "synthetic &lt;test&gt;" in text  # manifest table, escaped
    final = syn.final_train_loss("tiny", "full", 0), syn.final_train_loss("tiny", "full", 1)
    assert f"{sum(final) / 2:.4g}" in text


def test_report_without_figures_or_manifest(tmp_path):
    study = syn.write_synthetic_study(tmp_path, sizes=("tiny",), conditions=("full",), seeds=(0,))
    db = aggregate(tmp_path, study, tmp_path / "study.duckdb")
    out = write_report(db, out=tmp_path / "r" / "report.html")
    text = out.read_text()
    assert "No figures." in text and "No data manifest given." in text
    assert "no condition to compare" in text
    assert "reference_condition: full" in text  # the config recorded in the database
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing.duckdb", out=tmp_path / "x.html")


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["aggregate", "--results", str(tmp_path), "--out", str(tmp_path / "s.duckdb")]) == 3
    assert "no run directories" in capsys.readouterr().err
    assert not (tmp_path / "s.duckdb").exists()


def test_report_lists_adapter_entries_against_their_bound(study):
    _, out = study
    text = out.read_text()
    section = text[text.index('id="adapter_a"'):text.index('id="figures"')]
    # synthetic relora: A stays at 0.9 of its bound; one row per size and seed, none for full
    assert section.count("<td class=\"l\">relora</td>") == 4 and ">full<" not in section
    assert "0.9" in section and "of 14" in section
