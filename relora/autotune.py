"""Which of the model's own kernels a run uses, chosen by measurement on the machine at hand.

The model has its own path beside PyTorch's at a few points (relora.model.KERNEL_CHOICES: the
small-head attention beside PyTorch's fused kernel, the complex and real forms of RoPE, the LM
head's chunk size). Which is faster depends on the CPU, the torch build, the shape and the dtype,
so before a run trains, `choose_kernels` times the candidates at the run's shape (forward and
backward, interleaved, best of a few rounds) and keeps the fastest. The choice is cached on disk
per (device, CPU model, torch version, thread count, shape, dtype); it never chooses a thread count
(the workflow assigns each job its threads). The cache is a JSON file written
atomically: $RELORA_AUTOTUNE_CACHE, else $RELORA_CACHE_DIR/autotune.json, else
~/.cache/relora-study/autotune.json. `training.kernels` in the config fixes any of them instead of `auto`.

The trainer records the choice in the resume state and in run.json: a resumed run keeps the
choice it started with, whatever the cache says later, so it stays bitwise equal to an
uninterrupted run. The candidates compute the same function; the results differ only by
floating-point rounding (tests/test_model.py compares them).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path

from .io import atomic_write_text

log = logging.getLogger(__name__)

CACHE_FILE_ENV = "RELORA_AUTOTUNE_CACHE"  # the file itself (tests point it at a temporary one)
CACHE_ENV = "RELORA_CACHE_DIR"  # the project's download cache folder
CACHE_FILE = "autotune.json"
CACHE_VERSION = 1
ROUNDS = 3  # timed rounds per candidate, interleaved; the best counts


def cache_path() -> Path:
    if os.environ.get(CACHE_FILE_ENV):
        return Path(os.environ[CACHE_FILE_ENV])
    folder = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "relora-study"
    return Path(folder) / CACHE_FILE


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), e.g. `AMD EPYC 9R14 96-Core Processor`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted=("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")) -> dict[str, bool]:
    """Which of the instruction-set flags that decide matmul speed the CPU reports."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {flag: flag in flags for flag in wanted}


def shape_key(model: dict, micro_batch: int, seq_len: int, precision: str, device: str) -> str:
    """The cache key: what the timings depend on. The thread count is part of it (the threads a
    job gets are the workflow's to assign, not the autotune's; the fastest kernel at 1 thread
    need not be at 2: small-head attention at head size 32 in bf16 measured faster than
    PyTorch's kernel on 1 thread of a loaded Zen 4 and slower on 2)."""
    import torch

    parts = {"device": device, "cpu": cpu_model() if device == "cpu" else torch.cuda.get_device_name(),
             "torch": torch.__version__, "threads": torch.get_num_threads(), "precision": precision, "micro_batch": micro_batch, "seq_len": seq_len,
             **{k: model[k] for k in ("d_model", "n_heads", "n_kv_heads", "vocab_size")}}
    return json.dumps(parts, sort_keys=True, separators=(",", ":"))


def read_cache(path: Path) -> dict:
    """The cached choices by key; an unreadable or foreign file counts as empty (it is re-measured)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable autotune cache (%s); measuring again", path, e)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("choices"), dict):
        log.warning("%s: not an autotune cache of version %d; measuring again", path, CACHE_VERSION)
        return {}
    return data["choices"]


def write_cache(path: Path, key: str, entry: dict) -> None:
    """Add one key's choice (read again just before: jobs measuring other shapes may have written)."""
    choices = read_cache(path)
    choices[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"version": CACHE_VERSION, "choices": choices}, indent=1, sort_keys=True))


def _best_of(candidates: dict, rounds: int, sync) -> dict[str, float]:
    """Seconds of each candidate (a function of no arguments), best of `rounds`, the candidates
    interleaved within each round so that they share the machine's load; one warm-up call each."""
    best = {}
    for name, fn in candidates.items():
        fn()
    sync()
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


def measure(model: dict, micro_batch: int, seq_len: int, precision: str, device: str,
            kernels=None, rounds: int = ROUNDS) -> dict:
    """Time every candidate of each kernel in `kernels` (default: all) at the run's shape;
    returns {"kernels": {name: fastest}, "seconds": {name: {candidate: seconds}}}. Draws its
    inputs from its own generator: the caller's RNG state is untouched."""
    import torch

    from . import model as model_module
    from .model import KERNEL_CHOICES, LMHeadCrossEntropy, apply_rope, causal_attention, rope_tables, set_kernels

    kernels = list(KERNEL_CHOICES) if kernels is None else list(kernels)
    dev = torch.device(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    generator = torch.Generator(device=dev).manual_seed(0)
    B, T, C, V = micro_batch, seq_len, model["d_model"], model["vocab_size"]
    nh, nkv = model["n_heads"], model["n_kv_heads"]
    hs = C // nh

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=generator, device=dev, dtype=dtype).requires_grad_()

    q, k, v = randn(B, nh, T, hs), randn(B, nkv, T, hs), randn(B, nkv, T, hs)
    grad_y = torch.randn(B, T, C, generator=generator, device=dev, dtype=dtype)
    cos, sin = (t.to(dev) for t in rope_tables(hs, T, model.get("rope_theta", 10000.0)))
    h = torch.randn(B * T, C, generator=generator, device=dev, dtype=dtype)
    weight = torch.randn(V, C, generator=generator, device=dev) / C**0.5
    targets = torch.randint(0, V, (B * T,), generator=generator, device=dev)

    def attention(kernel):
        return lambda: causal_attention(q, k, v, kernel).backward(grad_y)

    def rope(form):
        def run():
            set_kernels({"rope": form})
            apply_rope(q, cos, sin).backward(q.detach())
        return run

    def lm_head(logits):
        def run():
            set_kernels({"lm_head_chunk_logits": logits})
            autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")
            with autocast:
                LMHeadCrossEntropy.apply(h, weight, targets, True)
        return run

    builders = {"attention": attention, "rope": rope, "lm_head_chunk_logits": lm_head}
    previous = dict(model_module.KERNELS)
    chosen, seconds = {}, {}
    try:
        for name in kernels:
            candidates = list(KERNEL_CHOICES[name])
            if name == "attention" and (dev.type != "cpu" or T > model_module.SMALL_HEAD_MAX_SEQ):
                candidates = ["sdpa"]  # the small-head path is for CPU and short sequences only
            if name == "lm_head_chunk_logits":  # sizes giving the same rows per chunk are one candidate
                rows = {min(B * T, max(1, c // V)): c for c in sorted(candidates, reverse=True)}
                candidates = sorted(rows.values())
            if len(candidates) == 1:
                chosen[name] = candidates[0]
                continue
            timed = _best_of({str(c): builders[name](c) for c in candidates}, rounds, sync)
            seconds[name] = timed
            chosen[name] = next(c for c in candidates if str(c) == min(timed, key=timed.get))
    finally:
        model_module.KERNELS.update(previous)
    return {"kernels": chosen, "seconds": seconds}


def requested_kernels(training: dict) -> dict:
    """training.kernels of the config, each `auto` or a fixed choice (missing keys: auto)."""
    from .model import KERNEL_CHOICES

    requested = {name: "auto" for name in KERNEL_CHOICES}
    requested.update(training.get("kernels") or {})
    return requested


def choose_kernels(run: dict, micro_batch: int, device: str) -> dict:
    """The kernels a run uses: the config's fixed choices, the rest from the cache or measured
    now (and cached). Plain strings and integers: the resume state and run.json hold them."""
    requested = requested_kernels(run["training"])
    auto = [name for name, value in requested.items() if value == "auto"]
    chosen = {name: value for name, value in requested.items() if value != "auto"}
    if not auto:
        return chosen
    key = shape_key(run["model"], micro_batch, run["data"]["seq_len"], run["training"]["precision"], device)
    path = cache_path()
    from .model import KERNEL_CHOICES

    cached = read_cache(path).get(key, {}).get("kernels", {})
    cached = {k: v for k, v in cached.items() if v in KERNEL_CHOICES.get(k, ())}  # a stale or edited file
    missing = [name for name in auto if name not in cached]
    if missing:
        started = time.perf_counter()
        result = measure(run["model"], micro_batch, run["data"]["seq_len"], run["training"]["precision"],
                         device, missing)
        log.info("autotune: measured %s in %.1f s: %s", ", ".join(missing), time.perf_counter() - started,
                 result["kernels"])
        cached = {**cached, **result["kernels"]}
        try:
            write_cache(path, key, {"kernels": cached, "seconds": result["seconds"]})
        except OSError as e:  # a read-only home: the choice still holds for this run
            log.warning("%s: could not cache the autotune choice (%s)", path, e)
    return {**{name: cached[name] for name in auto}, **chosen}
