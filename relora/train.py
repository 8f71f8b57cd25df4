"""The training loop: one run (size x condition x seed), resumable, bitwise reproducible.

Step semantics (docs/design.md, What a step is): "step k" means k optimizer updates are done; update
k runs with learning rate `lr * f(k - 1)`; ReLoRA merges right after update k for k in the
resolver's merge steps; checkpoint `step_k` is the state after update k and any merge at k.

Everything a run produces lives in its resume directory until the run ends: `state.pt` (model,
optimizer, RNG, metric rows; the data position is the step, since batches are a pure function
of (seed, step)), and the checkpoints written so far. A restarted run whose training trajectory
is the same (relora.config.run_config_hash) continues from `state.pt`; another discards it. At
the end the checkpoints, `train_metrics.parquet` and `run.json` (the run's completion marker)
are built beside the run directory and swapped in for it whole, and the resume directory is
deleted.

What a run may delete: the resume directory carries `.relora-resume` (the run's identity) from
its creation and the run directory `.relora-run`; a folder at either path that is neither
empty nor marked is the user's, and the run stops before writing anything, naming it. The run
holds an exclusive lock on `<resume dir>/.lock` (host and pid inside) for its whole life, so a
second writer of the same run fails at once. `state.pt` is loaded with `weights_only=True`: a
received results folder cannot run code.

The loop lives here; the batches in `relora.data.batches`, the device and process group in
`relora.runtime`, the resume directory in `relora.resume`, publishing in `relora.publish`.
"""

from __future__ import annotations

import logging
import math
import platform
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import __version__
from .autotune import choose_kernels, requested_kernels
from .checkpoint import build_model, save_checkpoint
from .config import micro_batch_and_accumulation, run_config_hash
from .data.batches import training_batches
from .lora import merge_and_reinit, wrap_with_lora
from .model import count_parameters, set_kernels
from .optim import build_optimizer, lr_factor, reset_optimizer_state
from .publish import check_run_dir, publish_run
from .resume import (STATE, ForeignStateError, claim_resume_dir, clear_resume_dir, read_state, remove_resume_dir,
                     rng_state, save_state, set_rng_state)
from .runtime import distributed_setup, resolve_device, retain_freed_memory, threading_is_main

log = logging.getLogger("relora.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


class Preempted(RuntimeError):
    """SIGTERM or SIGUSR1 arrived: state was saved, the run should be requeued."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"received signal {signal.Signals(signum).name} at step {step}: state saved, exiting")
        self.exit_code = 128 + signum


# --- the run's randomness ------------------------------------------------------------------

def event_generator(seed: int, step: int, salt: int) -> torch.Generator:
    """A generator for one event (adapter init, merge at a step), identical on every rank."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + salt)


# --- the run ----------------------------------------------------------------------------------

class Trainer:
    def __init__(self, run: dict, data_dir: Path, out_dir: Path, resume_dir: Path,
                 threads: int | None = None, progress: bool | None = None):
        self.run, self.training, self.method = run, run["training"], run["method"]
        self.out_dir, self.resume_dir = Path(out_dir), Path(resume_dir)
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(self.training["device"])
        if self.device.type == "cpu":
            retain_freed_memory()
        self.rank, self.world = distributed_setup(self.device)
        self.is_main = self.rank == 0
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.hash = run_config_hash(run)
        self.seed = run["run_seed"]
        batch = self.training["batch_size"]
        self.micro_batch, self.accum = micro_batch_and_accumulation(self.training, self.world)
        self.batches = training_batches(Path(data_dir), run["data"]["seq_len"], batch, self.seed,
                                        run["data"]["vocab_size"])
        self.steps = run["steps"]
        self.merge_steps = set(self.steps["merge"])
        self.checkpoint_steps = set(self.steps["checkpoint"])
        self.is_relora = self.method["name"] == "relora"
        self.attach_step = self.method.get("warm_start_steps", 0) if self.is_relora else None

        # Same seed -> same initial weights for every condition: the base model is built from
        # the run seed before (and independently of) any adapter.
        torch.manual_seed(self.seed)
        self.model = build_model(run["model"], {"name": "full"}).to(self.device)
        self.model.activation_checkpointing = self.training["activation_checkpointing"]
        self.optimizer = None
        self.step = 0
        self.rows: list[dict] = []
        self.devices = [self.device.type]  # every device type the run has trained on, in order
        self.lock = None
        self.kernels = None  # the model's kernels (relora.autotune): recorded, or chosen before training
        if self.attach_step == 0:
            self._attach_adapters()
        self._build_optimizer()

    # adapters and optimizer ------------------------------------------------------------------
    def _attach_adapters(self):
        m = self.method
        wrap_with_lora(self.model, m["rank"], m["alpha"], m["dropout"], m["targets"], m["dropout_mask"],
                       m["lora_init"], generator=event_generator(self.seed, self.step, 1))
        self.model.to(self.device)

    def _adapters_attached(self) -> bool:
        return self.is_relora and self.step >= self.attach_step

    def _build_optimizer(self):
        previous = self.optimizer
        self.optimizer = build_optimizer(self.model, self.training)
        if previous is not None:  # keep the moments of parameters that stay trainable
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p in previous.state:
                        self.optimizer.state[p] = previous.state[p]
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.ddp_model = self.model
        if self.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.forward_model = torch.compile(self.ddp_model) if self.training["compile"] else self.ddp_model

    def method_meta(self) -> dict:
        meta = dict(self.method)
        meta["attached"] = self._adapters_attached()
        return meta

    # state ---------------------------------------------------------------------------------
    def save_state(self):
        if not self.is_main:
            return
        save_state(self.resume_dir / STATE, {  # tensors and plain values only: loads with weights_only
            "run_config_hash": self.hash, "step": self.step, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "rng": rng_state(self.device), "metrics": self.rows,
            "devices": self.devices, "kernels": self.kernels,
        })

    def try_resume(self) -> bool:
        path = self.resume_dir / STATE
        if not path.is_file():
            return False
        try:
            state = read_state(path, self.device)
        except ForeignStateError:  # never run what a file asks for
            raise
        except Exception as e:  # a torn or corrupt file: start over, loudly
            log.warning("%s: unreadable resume state (%s); starting from step 0", path, e)
            return False
        if state.get("run_config_hash") != self.hash:
            log.warning("%s: saved under another run config (%s, now %s); discarding it",
                        path, state.get("run_config_hash"), self.hash)
            return False
        missing = [k for k in sorted(self.checkpoint_steps) if k <= state["step"]
                   and not (self.resume_dir / "checkpoints" / f"step_{k}" / "config.json").is_file()]
        if missing:  # e.g. a publish killed while deleting the folder: never publish a gap
            log.warning("%s: checkpoint(s) %s of the saved state are missing; starting from step 0",
                        path, missing)
            return False
        self.step = state["step"]
        if self.is_relora and not self.attach_step == 0 and self._adapters_attached():
            self._attach_adapters()
            self._build_optimizer()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], self.device)
        self.rows = state["metrics"]
        self.devices = list(state.get("devices", []))
        self.kernels = state.get("kernels")  # the run keeps the kernels it started with
        if self.device.type not in self.devices[-1:]:
            self.devices.append(self.device.type)
            if len(self.devices) > 1:
                log.warning("resuming on %s a run trained so far on %s: it will not be bitwise "
                            "reproducible (run.json records both)", self.device.type, self.devices[-2])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def identity(self) -> dict:
        return {k: self.run[k] for k in ("study", "size", "condition", "seed")}

    def claim_folders(self):
        """Refuse folders that are not this run's, then create and lock the resume directory.

        The run directory must be absent, empty or a published run; the resume directory absent,
        empty or this run's (its marker). Nothing is written before both are checked."""
        check_run_dir(self.out_dir, self.resume_dir)
        self.lock = claim_resume_dir(self.resume_dir, self.identity())

    def release(self):
        if self.lock is not None:
            self.lock.close()  # closing the file releases the flock
            self.lock = None

    def prepare_resume_dir(self):
        """Claim and lock the folders (rank 0: the other ranks are part of the same run), then
        resume from the saved state when it matches this run's trajectory; else start clean."""
        error = None
        if self.is_main:
            try:
                self.claim_folders()
            except ValueError as e:
                error = str(e)
        if self.world > 1:  # every rank stops when rank 0 refuses
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise ValueError(error)
        resumed = self.try_resume()
        if self.world > 1:
            dist.barrier()  # every rank has read the state before rank 0 may clear it
        if self.is_main and not resumed:
            clear_resume_dir(self.resume_dir)
        if self.world > 1:
            dist.barrier()

    def use_kernels(self):
        """The kernels this run computes with: those recorded in its resume state (a resumed run
        keeps its choice, whatever the autotune cache or the config say now), else the config's
        fixed ones and the rest measured or cached by relora.autotune; rank 0 decides for all."""
        if self.kernels is not None:
            fixed = {k: v for k, v in requested_kernels(self.training).items() if v != "auto"}
            if any(self.kernels.get(k) != v for k, v in fixed.items()):
                log.warning("training.kernels %s differs from the kernels this run started with %s: keeping "
                            "those (bitwise reproducible resume)", fixed, self.kernels)
        else:
            kernels = [choose_kernels(self.run, self.micro_batch, self.device.type) if self.is_main else None]
            if self.world > 1:
                dist.broadcast_object_list(kernels, src=0)
            self.kernels = kernels[0]
        set_kernels(self.kernels)
        log.info("kernels: %s", self.kernels)

    def checkpoint(self):
        if self.is_main and self.step in self.checkpoint_steps:
            save_checkpoint(self.model, self.resume_dir / "checkpoints" / f"step_{self.step}",
                            self.run["model"], self.method_meta(), self.step,
                            {"run_config_hash": self.hash, "size": self.run["size"],
                             "condition": self.run["condition"], "seed": self.run["seed"]})

    # one update ------------------------------------------------------------------------------
    def train_step(self) -> dict:
        k = self.step + 1
        lr = self.training["lr"] * lr_factor(k - 1, self.training["schedule"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.accum
        rows = slice(self.rank * accum * self.micro_batch, (self.rank + 1) * accum * self.micro_batch)
        tokens = self.batches.batch(k, rows).to(self.device, non_blocking=True)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                    if self.training["precision"] == "bf16" else nullcontext())
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            chunk = tokens[micro * self.micro_batch:(micro + 1) * self.micro_batch]
            sync = nullcontext() if (self.world == 1 or micro == accum - 1) else self.ddp_model.no_sync()
            with sync, autocast:
                # the model's fused LM head + cross-entropy: no (tokens, vocab) logits in memory
                loss = self.forward_model(chunk[:, :-1], targets=chunk[:, 1:])
            (loss / accum).backward()
            loss_sum += loss.detach()
        loss_value = loss_sum / accum
        if self.world > 1:
            dist.all_reduce(loss_value, op=dist.ReduceOp.AVG)
        loss_value = loss_value.item()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss is {loss_value} at step {k} (update {k} with lr {lr:.3g}); the last good state "
                f"and checkpoints are in {self.resume_dir}")
        clip = self.training["clip"]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip if clip else float("inf"))
        grad_norm = float(grad_norm)  # (the metrics row needs the value anyway)
        if not math.isfinite(grad_norm):  # a finite loss can still back-propagate inf/nan: stop
            raise TrainingDiverged(  # before the update writes it into the weights
                f"gradient norm is {grad_norm} at step {k} (update {k} with lr {lr:.3g}, loss "
                f"{loss_value:.4g}); the last good state and checkpoints are in {self.resume_dir}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = k
        merged = self.is_relora and k in self.merge_steps and self._adapters_attached()
        if merged:
            adapters = merge_and_reinit(self.model, self.method["merge_scale"], event_generator(self.seed, k, 2))
            reset = self.method["optimizer_reset"]
            reset_optimizer_state(self.optimizer, adapters, reset["mode"], reset["ratio"],
                                  event_generator(self.seed, k, 3), reset["masks"])
        if self.is_relora and k == self.attach_step:  # full-rank warm start ends here
            self._attach_adapters()
            self._build_optimizer()
        elapsed = time.perf_counter() - started
        n_tokens = self.training["batch_size"] * self.run["data"]["seq_len"]
        return {"step": k, "tokens": k * n_tokens, "loss": loss_value, "lr": lr,
                "grad_norm": float(grad_norm), "tokens_per_s": n_tokens / elapsed, "merged": merged}

    # the loop ------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict:
        """Train to the last step (or `stop_after` steps, for tests) and publish the run."""
        try:
            return self._fit(stop_after)
        finally:
            self.release()

    def _fit(self, stop_after: int | None) -> dict:
        self.prepare_resume_dir()
        self.use_kernels()
        if self.step == 0:
            self.checkpoint()
        stop = self._install_signal_handlers()
        last = self.training["steps"]
        bar = _progress_bar(self.step, last) if (self.progress and self.is_main) else None
        try:
            while self.step < last:
                row = self.train_step()
                self.rows.append(row)
                self.checkpoint()
                if self.step % self.training["save_state_every"] == 0 or self.step == last:
                    self.save_state()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                elif self.is_main and (self.step % self.training["log_every"] == 0 or self.step == last):
                    log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f%s", self.step, last,
                             row["loss"], row["lr"], row["grad_norm"], row["tokens_per_s"],
                             " merged" if row["merged"] else "")
                if stop["signum"] is not None:
                    self.save_state()
                    raise Preempted(stop["signum"], self.step)
                if stop_after is not None and self.step >= stop_after:
                    self.save_state()
                    return {"stopped_at": self.step}
        finally:
            if bar is not None:
                bar.close()
            self._restore_signal_handlers()
        return self.publish()

    def _install_signal_handlers(self) -> dict:
        stop = {"signum": None}
        self._previous_handlers = {}

        def handler(signum, frame):
            stop["signum"] = signum

        if threading_is_main():
            for signum in (signal.SIGTERM, signal.SIGUSR1):
                self._previous_handlers[signum] = signal.signal(signum, handler)
        return stop

    def _restore_signal_handlers(self):
        for signum, previous in getattr(self, "_previous_handlers", {}).items():
            signal.signal(signum, previous)

    def run_record(self) -> dict:
        total, trainable = count_parameters(self.model)
        opt_bytes = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                        for t in s.values() if torch.is_tensor(t))
        return {**self.run, "run_config_hash": self.hash, "params_total": total,
                "params_trainable": trainable, "optimizer_state_bytes": opt_bytes,
                "device": str(self.device), "devices": self.devices,
                "bitwise_reproducible": len(self.devices) == 1, "world_size": self.world,
                "kernels": self.kernels,
                "versions": {"relora": __version__, "torch": torch.__version__,
                             "python": platform.python_version(), "numpy": np.__version__}}

    def publish(self) -> dict:
        """Build the run directory beside its place from the resume directory, swap it in for
        the old one whole (no checkpoint of an earlier run stays beside the new run.json), then
        delete the resume directory."""
        record = self.run_record()
        if not self.is_main:
            return record
        publish_run(self.resume_dir, self.out_dir, self.identity(), record,
                    lambda folder: write_metrics(self.rows, self.run, folder / "train_metrics.parquet"))
        remove_resume_dir(self.resume_dir, self.release)
        return record


def _progress_bar(start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def write_metrics(rows: list[dict], run: dict, path: Path) -> None:
    """train_metrics.parquet: one row per optimizer step (relora.tables.TRAIN_METRICS), written
    atomically."""
    from .tables import TRAIN_METRICS, write_table

    keys = {"size": run["size"], "condition": run["condition"], "seed": run["seed"]}
    write_table(TRAIN_METRICS, [{**keys, **row} for row in rows], path)


def train(run: dict, data_dir, out_dir, resume_dir, threads=None, progress=None, stop_after=None) -> dict:
    """Train one resolved run (relora.config.resolve_run) and publish it into out_dir."""
    trainer = Trainer(run, Path(data_dir), Path(out_dir), Path(resume_dir), threads, progress)
    try:
        return trainer.fit(stop_after=stop_after)
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
