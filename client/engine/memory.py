"""Process memory as the benchmarks and the budget see it: resident set size.

`tracemalloc` does not see torch's allocator, so we read the kernel's counters:
VmRSS (now) and VmHWM (peak) from /proc/self/status, falling back to getrusage.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

MB = 1024 * 1024


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru / MB if sys.platform == "darwin" else ru / 1024
    return kb / 1024


def current_rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else peak_rss_mb()


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise and RSS stays high)."""
    import gc

    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """glibc's malloc_trim alone: free pages anywhere in the heap go back, no garbage collection."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SavedActivations:
    """Bytes of tensors autograd saves for backward while active (distinct storages)."""

    def __init__(self, exclude: torch.nn.Module | None = None) -> None:
        self.bytes = 0
        # weights saved for backward are not activations: they exist anyway
        self._seen: set[int] = {p.untyped_storage().data_ptr() for p in exclude.parameters()} if exclude else set()

    def _pack(self, t: torch.Tensor):
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            key = id(t)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes()
        # detached: returning `t` itself would tie a node's saved output back to the node,
        # a cycle that keeps the whole graph (and its activations) alive after the loss is dropped
        return t.detach()

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 * MB
# With the int8 cache (quant_forward.py) the engine trades memory for speed: on the shipped
# emulator (SmolLM2, 26 int3 blocks, batch 4 x 256, one thread) every activation above 1 MiB
# is mapped and page-faulted afresh, 364 tokens per CPU-s at a 609 MB peak; at 4 MiB the
# activations are reused from the heap, 437 tokens per CPU-s at 644 MB.
FAST_MMAP_THRESHOLD_BYTES = 4 * MB
FAST_MODE_SLACK_MB = 40.0  # what the 4 MiB threshold costs in peak RSS (above), left free in the budget


def set_malloc_policy(mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations >= `mmap_threshold` with their own mappings, returned on free.

    Why 1 MiB (measured with bench.client_train's sparse mode, 2 threads, SmolLM2 int4 2-8-2):
    glibc's default (a dynamic threshold up to 32 MiB) keeps freed activation buffers in a
    fragmented heap (peak 541 MB); mapping everything above 64 KiB returns it all but
    page-faults every fresh buffer (0.95 s a step instead of 0.5 s); 1 MiB keeps the small
    per-step buffers in the heap for reuse and maps the large ones (506 MB peak, 1210
    tokens/s; 2 MiB: 524 MB, 1410 tokens/s). An explicit MALLOC_MMAP_THRESHOLD_ in the
    environment wins. Returns whether the policy was applied (glibc only)."""
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
    except (OSError, AttributeError):
        return False
