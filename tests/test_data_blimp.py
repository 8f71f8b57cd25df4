import json
import sys

import pytest

from relora.data.blimp import BlimpError, build_blimp, load_local, load_paradigm_file, subset
from relora.data.generate_blimp import (PARADIGMS, STRONG_PL, STRONG_SG, WEAK_PL, WEAK_SG, GenerationError,
                                        generate, word_counts)
from relora.data.lexicon import NAMES, NOUNS, VERBS

NOUN_FORMS = {**{n.sg: (n, False) for n in NOUNS}, **{n.pl: (n, True) for n in NOUNS}}
VERB_FORMS = {}
for _v in VERBS:
    for _f in (_v.base, _v.s, _v.past, _v.pp):
        VERB_FORMS.setdefault(_f, []).append(_v)


def quiet(_):
    pass


def study(source, n=None, **extra):
    blimp = {"source": source, "pairs_per_paradigm": n, "paradigms": None, "seed": 0,
             "min_word_count": 0, "reference": None, **extra}
    return {"evaluation": {"blimp": blimp}}


# --- real BLiMP from ../shared/data/blimp ---------------------------------------------------

def test_local_blimp_folder(blimp_dir, tmp_path):
    paradigms = load_local(blimp_dir)
    assert len(paradigms) == 67 and all(len(p) == 1000 for p in paradigms.values())
    assert len({p[0]["linguistics_term"] for p in paradigms.values()}) == 13
    info = build_blimp(study(str(blimp_dir), 50), tmp_path / "data" / "blimp", log=quiet)
    files = sorted((tmp_path / "data" / "blimp").glob("*.jsonl"))
    assert len(files) == 67 and set(info["paradigms"].values()) == {50}
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(rows) == 50 and rows[0]["source"].startswith("local:")
    original = {p["pairID"]: p for p in paradigms[files[0].stem]}
    assert all(original[r["pairID"]]["sentence_good"] == r["sentence_good"] for r in rows)
    # deterministic, seeded, in pairID order
    again = subset(paradigms["adjunct_island"], 50, 0)
    assert again == subset(paradigms["adjunct_island"], 50, 0) != subset(paradigms["adjunct_island"], 50, 1)
    assert [int(p["pairID"]) for p in again] == sorted(int(p["pairID"]) for p in again)


def test_local_blimp_paradigm_selection(blimp_dir, tmp_path):
    info = build_blimp(study(str(blimp_dir), 10, paradigms=["anaphor_gender_agreement"]),
                       tmp_path / "blimp", log=quiet)
    assert info["paradigms"] == {"anaphor_gender_agreement": 10}
    with pytest.raises(BlimpError, match="no file for paradigm"):
        load_local(blimp_dir, ["no_such_paradigm"])


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


PAIR = {"sentence_good": "A cat sleeps.", "sentence_bad": "A cat sleep.", "field": "morphology",
        "linguistics_term": "subject_verb_agreement", "UID": "demo", "pairID": "0"}


def test_malformed_blimp_files(tmp_path):
    with pytest.raises(BlimpError, match=r"demo.jsonl:2: missing field\(s\) sentence_bad"):
        load_paradigm_file(_write(tmp_path / "demo.jsonl", [PAIR, {k: v for k, v in PAIR.items() if k != "sentence_bad"}]))
    with pytest.raises(BlimpError, match=r"demo.jsonl: no pairs"):
        load_paradigm_file(_write(tmp_path / "demo.jsonl", []))
    with pytest.raises(BlimpError, match=r"demo.jsonl:2: UID 'other' differs"):
        load_paradigm_file(_write(tmp_path / "demo.jsonl", [PAIR, {**PAIR, "UID": "other"}]))
    with pytest.raises(BlimpError, match=r"demo.jsonl:1: not valid JSON"):
        load_paradigm_file(_write(tmp_path / "demo.jsonl", ["{oops"]))
    with pytest.raises(BlimpError, match=r"named wrong.jsonl"):
        load_paradigm_file(_write(tmp_path / "wrong.jsonl", [PAIR]))
    with pytest.raises(BlimpError, match=r"sentence_good is empty"):
        load_paradigm_file(_write(tmp_path / "demo.jsonl", [{**PAIR, "sentence_good": " "}]))
    with pytest.raises(BlimpError, match="not a folder"):
        build_blimp(study(str(tmp_path / "missing")), tmp_path / "out", log=quiet)


def test_hf_blimp_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(BlimpError, match="needs the `datasets` package"):
        build_blimp(study("nyu-mll/blimp"), tmp_path / "blimp", log=quiet)


# --- generated pairs ------------------------------------------------------------------------

def words(s):
    return s.rstrip(".").split(" ")


def one_diff(good, bad):
    g, b = words(good), words(bad)
    assert len(g) == len(b), (good, bad)
    diff = [i for i in range(len(g)) if g[i] != b[i]]
    assert len(diff) == 1, (good, bad)
    return diff[0], g, b


def plural_of_subject(tokens):
    noun, plural = NOUN_FORMS[tokens[1]]
    return plural


def check(uid, pair):
    good, bad = pair["sentence_good"], pair["sentence_bad"]
    assert good[0].isupper() and good.endswith(".") and bad.endswith(".")
    i, g, b = one_diff(good, bad)
    if uid.startswith("gen_determiner_noun_agreement"):
        (ng, pg), (nb, pb) = NOUN_FORMS[g[i]], NOUN_FORMS[b[i]]
        assert ng == nb and pg != pb and i == len(g) - 1
        assert g[i - 1] in (("these", "those") if pg else ("this", "that"))
        if uid.endswith("irregular"):
            assert ng.irregular
    elif uid == "gen_subject_verb_agreement":
        assert i == 2 and g[0] == "The"
        verbs = VERB_FORMS[g[i]]
        assert any(v.base == b[i] or v.s == b[i] for v in verbs)
        assert (g[i] in {v.base for v in verbs}) == plural_of_subject(g)
    elif uid.startswith("gen_distractor_agreement"):
        assert g[i] in ("is", "are", "was", "were")
        plural = plural_of_subject(g)
        assert (g[i] in ("are", "were")) == plural and (b[i] in ("are", "were")) != plural
        # the distractor: the last noun before the verb has the other number
        distractor = [t for t in g[2:i] if t in NOUN_FORMS][-1]
        assert NOUN_FORMS[distractor][1] != plural
    elif uid == "gen_anaphor_number_agreement":
        assert i == len(g) - 1
        noun, plural = NOUN_FORMS[g[1]]
        assert (g[i] == "themselves") == plural and (b[i] == "themselves") != plural
        assert {g[i], b[i]} - {"themselves"} == {"himself" if noun.gender == "m" else "herself"}
    elif uid == "gen_anaphor_gender_agreement":
        assert i == len(g) - 1 and {g[i], b[i]} == {"himself", "herself"}
        gender = NAMES[g[0]] if g[0] in NAMES else NOUN_FORMS[g[1]][0].gender
        assert g[i] == ("himself" if gender == "m" else "herself")
    elif uid == "gen_irregular_past_tense":
        assert i == 1 and any(v.past == g[i] and v.pp == b[i] and v.past != v.pp for v in VERBS)
    elif uid == "gen_irregular_past_participle":
        assert i == 2 and g[1] in ("has", "had")
        assert any(v.pp == g[i] and v.past == b[i] and v.past != v.pp for v in VERBS)
    elif uid == "gen_npi_negation_ever":
        assert (g[i], b[i]) == ("not", "probably") and g[i + 1] == "ever"
    elif uid == "gen_npi_no_ever":
        assert i == 0 and (g[i], b[i]) == ("No", "The") and "ever" in g
    elif uid == "gen_existential_there_quantifiers":
        assert i == 2 and g[0] == "There"
        plural = g[1] in ("are", "were")
        assert NOUN_FORMS[g[3]][1] == plural
        weak = WEAK_PL if plural else WEAK_SG + ("an",)
        assert g[i] in weak and b[i] in (STRONG_PL if plural else STRONG_SG)
    else:
        raise AssertionError(f"no rule for {uid}")


def test_generated_pairs_follow_their_rules():
    paradigms, info = generate(pairs_per_paradigm=120, seed=0)
    assert set(paradigms) == set(PARADIGMS) and len(paradigms) >= 12
    terms = {p[0]["linguistics_term"] for p in paradigms.values()}
    assert {"determiner_noun_agreement", "subject_verb_agreement", "anaphor_agreement", "irregular_forms",
            "npi_licensing", "quantifiers"} <= terms
    for uid, pairs in paradigms.items():
        assert len(pairs) == 120 and len({(p["sentence_good"], p["sentence_bad"]) for p in pairs}) == 120
        assert [p["pairID"] for p in pairs] == [str(k) for k in range(120)]
        for pair in pairs:
            assert pair["UID"] == uid and pair["source"] == "generated"
            check(uid, pair)


def test_generation_is_seeded():
    a, _ = generate(100, seed=3, paradigms=["gen_npi_no_ever"])
    b, _ = generate(100, seed=3, paradigms=["gen_npi_no_ever"])
    c, _ = generate(100, seed=4, paradigms=["gen_npi_no_ever"])
    assert a == b != c
    with pytest.raises(GenerationError, match="unknown generated paradigms"):
        generate(10, paradigms=["adjunct_island"])


def test_generation_uses_frequent_words():
    text = ("the dog and the dogs saw this cat and these cats . John saw Mary . the man and the men "
            "the woman and the women , the boy and boys , the girl and the girls ")
    counts = word_counts([text * 3])
    paradigms, info = generate(50, seed=0, counts=counts, min_count=2,
                               paradigms=["gen_determiner_noun_agreement", "gen_anaphor_gender_agreement"])
    used = {w.lower() for p in paradigms["gen_anaphor_gender_agreement"] for w in words(p["sentence_good"])}
    assert {"john", "mary"} >= used & {n.lower() for n in NAMES}
    det_nouns = {words(p["sentence_good"])[-1] for p in paradigms["gen_determiner_noun_agreement"]}
    animals = {f for n in NOUNS if "animal" in n.kinds for f in (n.sg, n.pl)}
    assert det_nouns & animals == {"dog", "dogs", "cat", "cats"}
    # pools the filter would empty (no food word in the text) fall back to the lexicon, and say so
    assert "nouns:food:False:None" in info["relaxed"]


def test_build_generated_blimp_writes_jsonl(tmp_path):
    info = build_blimp(study("generated", 100), tmp_path / "data" / "blimp", log=quiet)
    assert len(info["paradigms"]) == len(PARADIGMS)
    pairs = load_local(tmp_path / "data" / "blimp")
    assert all(len(p) == 100 for p in pairs.values())
    stage = json.loads((tmp_path / "data" / "stages" / "blimp.json").read_text())
    assert stage["info"]["source"] == "generated" and len(stage["files"]) == len(PARADIGMS)
