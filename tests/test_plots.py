"""Altair figures from the study database: files, contents of the specs, placeholders."""

import json

import duckdb
import pytest

import synthetic_runs as syn
from relora import plots
from relora.results import aggregate, published_blimp_reference


@pytest.fixture(scope="module")
def db(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("plots") / "synthetic"
    study = syn.write_synthetic_study(root)
    study["evaluation"]["blimp"] = {"reference": "published"}  # the package's table
    return aggregate(root, study, root / "study.duckdb", blimp_baselines=write_baselines(root))


# unigram scorer accuracies of the synthetic paradigms: three inside [0.35, 0.65], three outside
UNIGRAM = dict(zip((p[0] for p in syn.PARADIGMS), (0.5, 0.9, 0.2, 0.45, 0.6, 0.0)))


def write_baselines(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / "blimp_unigram.parquet"
    pq.write_table(pa.table({"uid": list(UNIGRAM), "baseline": ["unigram"] * len(UNIGRAM),
                             "accuracy": list(UNIGRAM.values()), "pairs": [syn.PAIRS] * len(UNIGRAM)}), path)
    return path


@pytest.fixture(scope="module")
def figures(db, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    return out, plots.write_figures(db, out, formats=["png", "svg"], scale=1)


def specs(db, **settings):
    con = duckdb.connect(str(db), read_only=True)
    try:
        ctx = plots.Context(con, settings)
        return {name: plots.chart_spec(function(ctx), ctx) for name, (function, _) in plots.FIGURES.items()}
    finally:
        con.close()


def rows(spec):
    return [r for values in spec.get("datasets", {}).values() for r in values]


def test_every_figure_is_written_as_png_and_svg(figures):
    out, manifest = figures
    assert [m["name"] for m in manifest] == list(plots.FIGURES)
    for name in plots.FIGURES:
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, name
        assert (out / f"{name}.svg").read_text().lstrip().startswith("<svg"), name
    listing = json.loads((out / "figures.json").read_text())
    assert listing == manifest and all(m["title"] and m["caption"] for m in listing)
    assert not list(out.glob(".*tmp"))


def test_interactive_html_is_offline(db, tmp_path):
    plots.write_figures(db, tmp_path, formats=["html"], names=["gap_vs_size"])
    text = (tmp_path / "gap_vs_size.html").read_text()
    assert "<script" in text and "vegaEmbed" in text
    assert 'src="http' not in text and "src='http" not in text  # scripts inlined, no CDN
    listing = json.loads((tmp_path / "figures.json").read_text())
    assert [m["name"] for m in listing] == ["gap_vs_size"]


def test_specs_carry_the_data_they_should(db):
    s = specs(db)
    loss = rows(s["train_loss"])
    merges = {r["step"] for r in loss if r["kind"] == "merge"}
    assert merges == {101, 201}
    assert {r["condition"] for r in loss if r["kind"] == "loss"} == set(syn.CONDITIONS)
    assert "merge" in json.dumps(s["train_loss"]["title"])
    gap = rows(s["gap_vs_size"])
    assert {r["metric"] for r in gap} == set(plots.DEFAULT_HEADLINE)
    assert "n_seeds = 2" in json.dumps(s["gap_vs_size"]["title"])
    assert "ci_low" in json.dumps(s["gap_vs_size"])
    caps = [r for r in rows(s["per_adapter"]) if r.get("kind") == "cap"]
    assert caps and all(0 < r["value"] <= 1 for r in caps)
    bpb_domains = {r["domain"] for r in rows(s["heldout_bpb"])}
    assert bpb_domains == {"all domains", *syn.DOMAINS}
    # sizes ordered by parameters, labelled with them
    assert json.dumps(s["train_loss"]).index("tiny (") < json.dumps(s["train_loss"]).index("small (")


def test_blimp_reference_lines_join_by_uid(db):
    s = specs(db)
    refs = [r for r in rows(s["blimp_overall"]) if r["kind"] == "reference"]
    assert {r["model"] for r in refs} == {"5-gram", "LSTM", "Transformer-XL", "GPT-2", "Human agreement"}
    # averaged over the study's paradigms only (6 UIDs), not BLiMP's published overall
    gpt2 = [r for r in published_blimp_reference() if r["model"] == "gpt2"]
    ours = {p[0] for p in syn.PARADIGMS}
    expected = sum(r["accuracy"] for r in gpt2 if r["uid"] in ours) / len(ours)
    assert next(r for r in refs if r["model"] == "GPT-2")["accuracy"] == pytest.approx(expected)
    # per phenomenon: grouped by the data's phenomenon (animate_subject_passive -> s-selection)
    per = [r for r in rows(s["blimp_phenomena"]) if r["kind"] == "reference"]
    assert {r["phenomenon"] for r in per} == {p[1] for p in syn.PARADIGMS}


def test_blimp_figures_show_the_unigram_and_untrained_baselines(db):
    s = specs(db)
    overall = rows(s["blimp_overall"])
    balanced = {u for u, a in UNIGRAM.items() if 0.35 <= a <= 0.65}
    runs = [r for r in overall if r["kind"] == "run" and r["step"] == syn.STEPS]
    assert {r["panel"] for r in runs} == {"all paradigms", "frequency-balanced paradigms"}
    r = next(r for r in runs if r["size"].startswith("tiny") and r["condition"] == "full" and r["seed"] == 0
             and r["panel"] == "frequency-balanced paradigms")
    expected = [syn.blimp_accuracy("tiny", "full", 0, syn.STEPS, i) for i, p in enumerate(syn.PARADIGMS)
                if p[0] in balanced]
    assert r["paradigms"] == 3 and r["accuracy"] == pytest.approx(sum(expected) / 3)
    base = {(r["panel"], r["model"]): r["accuracy"] for r in overall
            if r["kind"] == "baseline" and r["size"].startswith("tiny")}
    assert base[("all paradigms", "unigram")] == pytest.approx(sum(UNIGRAM.values()) / 6)
    assert base[("frequency-balanced paradigms", "unigram")] == pytest.approx(
        sum(UNIGRAM[u] for u in balanced) / 3)
    step0 = [syn.blimp_accuracy("tiny", c, seed, 0, i) for c in syn.CONDITIONS for seed in syn.SEEDS
             for i in range(len(syn.PARADIGMS))]
    assert base[("all paradigms", "untrained (step 0)")] == pytest.approx(sum(step0) / len(step0))
    per = rows(s["blimp_paradigms"])
    assert {r["uid"]: r["accuracy"] for r in per if r["kind"] == "unigram"} == UNIGRAM
    assert {r["who"] for r in per if r["kind"] == "run"} == set(syn.CONDITIONS)
    assert len([r for r in per if r["kind"] == "untrained"]) == len(syn.SIZES) * len(syn.PARADIGMS)
    assert "3 of 6 paradigms lie outside" in json.dumps(s["blimp_paradigms"]["title"])


def test_one_seed_study_says_so_and_missing_data_gives_notes(tmp_path):
    missing = {(s, c, 0): ["blimp", "dynamics"] for s in ("tiny", "small") for c in ("full", "relora")}
    study = syn.write_synthetic_study(tmp_path, conditions=("full", "relora"), seeds=(0,), missing=missing)
    db = aggregate(tmp_path, study, tmp_path / "study.duckdb")
    s = specs(db)
    title = json.dumps(s["gap_vs_size"]["title"])
    assert "n_seeds = 1" in title and "no confidence intervals" in title
    assert '"y2"' not in json.dumps(s["gap_vs_size"])  # no interval bars
    for name in ("blimp_overall", "blimp_phenomena", "blimp_paradigms", "per_weight", "cka_to_final"):
        assert "no " in json.dumps(s[name]), name
    out = plots.write_figures(db, tmp_path / "figures", formats=["png"], names=["cka_to_final"], scale=1)
    assert (tmp_path / "figures" / "cka_to_final.png").stat().st_size > 1000 and len(out) == 1


def test_long_runs_are_thinned(db):
    s = specs(db, max_points=50)
    steps = [r for r in rows(s["train_loss"]) if r["kind"] == "loss"]
    assert len(steps) == 12 * 50  # 300 steps in bins of 6


def test_bad_arguments(db, tmp_path):
    with pytest.raises(ValueError, match="unknown figure"):
        plots.write_figures(db, tmp_path, names=["nope"])
    with pytest.raises(ValueError, match="format"):
        plots.write_figures(db, tmp_path, formats=["gif"])
    with pytest.raises(FileNotFoundError):
        plots.write_figures(tmp_path / "none.duckdb", tmp_path)


def test_one_seed_blimp_gaps_have_intervals_over_paradigms(tmp_path):
    study = syn.write_synthetic_study(tmp_path, conditions=("full", "relora"), seeds=(0,))
    s = specs(aggregate(tmp_path, study, tmp_path / "study.duckdb"))
    title = json.dumps(s["gap_vs_size"]["title"])
    assert "no confidence intervals over seeds" in title and "t-intervals over paradigms" in title
    gap = rows(s["gap_vs_size"])
    assert all((r["ci_low"] is not None) == (r["metric"] == "blimp") for r in gap)
    assert '"y2"' in json.dumps(s["gap_vs_size"])


def test_around_merge_and_adapter_a_figures_carry_their_data(db):
    s = specs(db)
    around = rows(s["rank_around_merges"])
    assert {r["target"] for r in around if r["kind"] == "run"} == {"base", "weight"}
    assert {r["step"] for r in around if r["kind"] == "merge"} == {101, 201}
    # a merge rule in both panels of every ReLoRA size and condition
    assert len([r for r in around if r["kind"] == "merge"]) == 2 * 2 * 2 * 2
    by = {(r["condition"], r["target"], r["seed"], r["size"].split()[0], r["step"]): r["value"]
          for r in around if r["kind"] == "run"}
    # synthetic data: ReLoRA's frozen base lags its weight by 0.01; full-rank's base is its weight
    assert by[("relora", "weight", 0, "tiny", 300)] - by[("relora", "base", 0, "tiny", 300)] == pytest.approx(0.01)
    assert by[("full", "weight", 0, "tiny", 300)] == by[("full", "base", 0, "tiny", 300)]
    outliers = rows(s["adapter_a_outliers"])
    runs = [r for r in outliers if r["kind"] == "run"]
    assert {r["condition"] for r in runs} == {"relora", "relora-paper"}
    assert max(r["value"] for r in runs if r["condition"] == "relora-paper") == pytest.approx(50 + 300 / 2)
    assert max(r["value"] for r in runs if r["condition"] == "relora") == pytest.approx(0.9)
    # entries above 3x, summed over the adapters of a step: (1 + 2) layers-weighted x 7 modules
    assert {r["entries_over_3x"] for r in runs if r["condition"] == "relora-paper" and r["step"] > 100} == {21}
    assert sorted(r["value"] for r in outliers if r["kind"] == "bound") == [1.0, 1.0, 3.0, 3.0]  # per size


def test_the_reference_is_dark_and_the_other_conditions_take_the_palette_in_order():
    from relora import plots

    ctx = plots.Context.__new__(plots.Context)  # only the colour scale: no database needed
    ctx.reference = "full"
    ctx.conditions = ["full", "relora-paper", "relora", *[f"c{i}" for i in range(len(plots.PALETTE))]]
    scale = ctx.color().to_dict()["scale"]
    assert scale["domain"] == ctx.conditions
    colors = scale["range"]
    assert colors[0] == plots.REFERENCE_COLOR
    assert colors[1:3] == plots.PALETTE[:2]  # the two conditions the default study compares: blue, orange
    assert colors[1:len(plots.PALETTE) + 1] == plots.PALETTE  # every colour once before any repeats
    assert plots.REFERENCE_COLOR not in colors[1:]


def test_cka_rows_show_each_size_with_exactly_the_conditions_it_ran(tmp_path):
    """A condition run at one size only (an ablation) must not shift the other size's cells: a
    row x column facet did, in the renderer, so each size is its own row of its conditions."""
    import shutil

    root = tmp_path / "synthetic"
    study = syn.write_synthetic_study(root)
    shutil.rmtree(root / "runs" / "size=small" / "condition=relora-paper")
    spec = specs(aggregate(root, study, root / "study.duckdb"))["cka_to_final"]
    assert "vconcat" in spec and "row" not in json.dumps(spec.get("facet", {}))
    datasets = spec["datasets"]
    for row, size, conditions in zip(spec["vconcat"], ("tiny", "small"),
                                     (["full", "relora", "relora-paper"], ["full", "relora"])):
        assert row["title"]["text"].startswith(size)
        assert row["facet"]["column"]["sort"] == conditions
        cells = datasets[row["data"]["name"]]
        assert {r["condition"] for r in cells} == set(conditions) and {r["size"] for r in cells} == {size}
