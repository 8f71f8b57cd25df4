"""`relora dynamics`: the analysis stage (docs/design.md, Metrics): spectra of weights, gradients,
updates and adapters, adapter entries and CKA at the study's analysis steps of a run.

Reads the run and its checkpoints as `relora evaluate` does (relora/commands/evaluate.py), and
writes RUN_DIR/dynamics.parquet with relora.tables.write_table.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import add_command
from .evaluate import add_run_options, progress, setup_run, snapshot_loader

log = logging.getLogger("relora.commands.dynamics")


def register(subparsers) -> None:
    p = add_command(subparsers, "dynamics", run_dynamics,
                    "rank metrics of weights, gradients, updates, adapters and CKA",
                    "Analyse a run's checkpoints at the study's analysis steps: spectrum metrics "
                    "(proportional effective rank, numerical rank, condition numbers, ...) of every linear "
                    "module's weight, probe-batch gradient, cumulative update and ReLoRA adapter (and, "
                    "as analysis.targets asks, the attention OV circuits), the adapters' largest entries "
                    "and whether A was re-drawn since the previous analysed step, and CKA to the final "
                    "step (analysis.cka: block outputs on the probe batch, or the paper's last-token "
                    "features over the evaluation documents) (dynamics.parquet).")
    add_run_options(p)
    p.add_argument("--out-dir", type=Path, default=None, help="where the table goes (default: the run directory)")


def eval_rows(data: Path, context: int, vocab: int) -> list:
    """CKA rows `eval`: every evaluation document (domains in name order), its first `context`
    tokens; empty documents are skipped."""
    import torch

    from ..evaluate import read_eval_domains

    rows = []
    for domain, (docs, _) in sorted(read_eval_domains(data / "eval").items()):
        for doc in docs:
            if len(doc) and (max(doc) >= vocab or min(doc) < 0):
                raise ValueError(f"{data / 'eval' / (domain + '.parquet')}: token ids outside the run's "
                                 f"vocabulary of {vocab}")
            if len(doc):
                rows.append(torch.tensor(doc[:context], dtype=torch.long))
    if not rows:
        raise ValueError(f"{data / 'eval'}: no non-empty evaluation document for CKA rows `eval`")
    return rows


def run_dynamics(args) -> int:
    from ..config import cka_settings
    from ..data.manifest import verify_inputs
    from ..dynamics import TARGETS, analyse_checkpoints, load_probe
    from ..tables import DYNAMICS, write_table

    study, run, steps, device = setup_run(args, "analysis")
    analysis = study.get("analysis", {})
    targets = tuple(analysis.get("targets", TARGETS))
    settings = cka_settings(analysis)
    cka = settings["enabled"]
    on_probe = "gradient" in targets or (cka and settings["rows"] == "probe")
    loaders = {step: snapshot_loader(args, run, step) for step in steps}
    if on_probe:
        verify_inputs(args.data, ["probe.npy"])  # against the data manifest
    cka_rows = None
    if cka and settings["rows"] == "eval":
        verify_inputs(args.data, ["eval/"])
        cka_rows = eval_rows(args.data, run["model"]["max_seq_len"], run["model"]["vocab_size"])
    probe = load_probe(args.data / "probe.npy") if on_probe else None
    if probe is not None:
        context, vocab = run["model"]["max_seq_len"], run["model"]["vocab_size"]
        if probe.shape[1] - 1 > context or int(probe.max()) >= vocab or int(probe.min()) < 0:
            raise ValueError(f"{args.data / 'probe.npy'}: windows of {probe.shape[1] - 1} tokens with ids in "
                             f"[{int(probe.min())}, {int(probe.max())}] do not fit the run's context {context} "
                             f"and vocabulary {vocab}")
    rows = analyse_checkpoints(loaders, probe, targets, cka, analysis.get("probe_micro_batch"), device,
                               progress=progress("relora dynamics", len(steps)),
                               cka_features=settings["features"], cka_rows=cka_rows)
    keys = {"size": run["size"], "condition": run["condition"], "seed": run["seed"]}
    rows = [{**keys, **row} for row in rows]
    out = args.out_dir or args.run
    write_table(DYNAMICS, rows, out / "dynamics.parquet")
    log.info("wrote %s (%d rows)", out / "dynamics.parquet", len(rows))
    return 0
