"""This process's and this machine's memory: what the process holds and its peak, what is free
for it (its share under a launch), and handing freed memory back to the system. Read by the memory
plan (``memory_plan.py``), the trainer between phases, and the benches' trial runs."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from .distributed import processes_on_this_machine


def current_rss() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss)


def peak_rss_mb() -> float:
    """This process's own peak RSS in MB. Linux's ``ru_maxrss`` is not that: a child started by
    ``subprocess`` (vfork, then exec) starts with its parent's peak, so a trial run launched from a
    process that once held 3.5 GB reports 3.5 GB. /proc's ``VmHWM`` belongs to the process's own
    memory map; ``ru_maxrss`` stays the answer where there is no /proc (bytes on macOS, KiB elsewhere)."""
    import resource
    import sys

    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 ** 2 if sys.platform == "darwin" else peak / 1024


def return_freed_memory() -> bool:
    """Hand the pages of freed blocks that glibc's allocator still holds back to the system
    (``malloc_trim(0)``); True where that ran (Linux with glibc), False elsewhere.

    Freed tensors stay resident in the allocator's free lists, and the next phase's allocations,
    of other sizes, often do not fit them: its peak then adds to what the last phase left. Called
    between phases (before each held-out evaluation), it lowered the Llama-3.2-1B shape's 8-bit
    train peak RSS by ~0.9 GB (benchmarks/RESULTS.md)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (musl, macOS, Windows): looked up once, since finding the C
    library runs ``ldconfig``."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def available_memory(limit_gb: float | None = None, device: torch.device | None = None) -> float | None:
    """Bytes the run may grow to: on CPU this process's RSS plus its share of the machine's (or
    cgroup's) free memory; on CUDA the GPU's free memory; ``limit_gb`` when planning for another
    machine. A launch's processes on one CPU machine share it: each plans for 1/N of what is free
    (of ``limit_gb``), or N processes that each fit alone would together run out."""
    on_gpu = device is not None and device.type == "cuda"
    if limit_gb:
        return limit_gb * 1024 ** 3 / (1 if on_gpu else processes_on_this_machine())
    if on_gpu:
        return float(torch.cuda.mem_get_info(device)[0]) + torch.cuda.memory_allocated(device)
    return current_rss() + free_memory_share()


def free_memory_share() -> float:
    """This process's share of ``free_memory``: a launch's processes on this machine split it."""
    return free_memory() / processes_on_this_machine()


def free_memory() -> float:
    """Bytes free on this machine, or in this container where its own limit is the lower."""
    import psutil

    free = float(psutil.virtual_memory().available)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = float(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            free = min(free, float(limit) - used)
    except (OSError, ValueError):
        pass
    return free
