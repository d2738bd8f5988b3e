"""Host memory of a CPU run: large tensors in their own mappings, returned to the system when freed.

PyTorch's CPU allocator keeps no cache: every tensor is a malloc. glibc serves a request above its mmap threshold
with a mapping of its own, unmapped on free, but raises that threshold (up to 32 MiB) each time such a mapping is
freed, so from the second step on a training run's activations (megabytes each) come from the heap, where freed
blocks stay resident and fragment. SmolLM2 SFT (4 steps of 8 x 512-token rows, ungrouped) peaked at 17.4 GB of RSS,
13 to 17 GB of it still held between steps; with the threshold fixed at LARGE (4 MiB) it peaked at 11.7 GB, holding
2.1 to 3.4 GB between steps (at 1 MiB: 10.2 GB and 1.4 GB, but SST-2's smaller batches then page-fault more).
Smaller tensors stay on the heap, whose reuse is fast.

MALLOC_MMAP_THRESHOLD_ in the environment is the user's choice and is left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
LARGE = 4 << 20


def map_large_tensors() -> bool:
    """Fix this process's glibc mmap threshold at LARGE bytes; False where it is not changed (not glibc, or
    MALLOC_MMAP_THRESHOLD_ set)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library; musl has no mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, LARGE))
