"""Where a training process runs: the device, the process group under torchrun, and how the C
allocator keeps freed memory."""

from __future__ import annotations

import os
import threading

import torch
import torch.distributed as dist


def distributed_setup(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank)
    return torch.device(name)


def retain_freed_memory() -> bool:
    """Keep freed memory in the process (glibc only; True when applied).

    glibc serves blocks of 32 MiB or more (the logits, their gradient) with mmap and unmaps them
    when freed, so every step faults them back in page by page, zeroed by the kernel; keeping
    them (no mmap for large blocks, no trimming of the heap) saved about 15% of a CPU training
    step (benchmarks/run.py measures it). Equivalent to MALLOC_MMAP_MAX_=0 and
    MALLOC_TRIM_THRESHOLD_=-1 in the environment; the process's peak memory is unchanged.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False


def threading_is_main() -> bool:
    """Signal handlers can be installed only from the main thread."""
    return threading.current_thread() is threading.main_thread()
