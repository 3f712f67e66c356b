"""Accounting of a quantization run: wall time by stage, peak host memory and peak device memory.

Peak host RSS is the kernel's high-water mark (``VmHWM`` in ``/proc/self/status``). Resetting it is a
change to the whole process (anyone else measuring its peak loses theirs), so only the owner of the
process asks for it (the CLI: ``reset_host_peak``); then each block reports its own peak, where Linux
allows the reset (``/proc/self/clear_refs``; :attr:`Meter.rss_resets` says whether it happened).
Otherwise a block's figure is the process's peak so far. Peak device memory is ``torch.cuda.max_memory_allocated`` (``None`` on a CPU).
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .placement import peak_device_mib, reset_peak_device

STAGES = ("load", "calibrate", "code", "tune", "forward", "write")


def peak_rss_mib() -> float:
    """Peak resident memory of this process (since the last reset, on Linux), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux); ``False`` where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def trim_host_memory() -> None:
    """Give freed heap memory back to the system (glibc ``malloc_trim``; nothing elsewhere).

    A block's work allocates and frees gigabytes of mid-sized tensors; without this, the C allocator keeps
    much of that freed memory mapped, and the resident size creeps up from block to block (measured:
    +40 MiB per TinyLlama-width block without it, flat with it)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Meter:
    """Times the stages of one unit of work (a block, distillation) and its peak memories.

    ``with meter.stage("code"): ...`` adds the wall time to ``seconds["code"]``; :meth:`result` gives
    ``{"seconds": {stage: s}, "total_seconds", "peak_rss_mib", "peak_device_mib"}``.
    """

    def __init__(self, device: torch.device, reset_host_peak: bool = False) -> None:
        self.device = device
        self.rss_resets = reset_peak_rss() if reset_host_peak else False
        reset_peak_device(device)
        self.start = time.perf_counter()
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.current: str | None = None

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        self.current = name
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def result(self) -> dict:
        dev = peak_device_mib(self.device)
        return {"seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "total_seconds": round(time.perf_counter() - self.start, 3),
                "peak_rss_mib": round(peak_rss_mib(), 1),
                "peak_device_mib": None if dev is None else round(dev, 1)}
