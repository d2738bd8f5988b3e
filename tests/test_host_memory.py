"""CPU runs map large tensors (ftune/run/host_memory.py): freed, they leave the process instead of staying resident
in a fragmented heap. Checked in fresh interpreters, since the setting holds for the whole process."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
import torch
from ftune.run import host_memory

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

if sys.argv[1] == "mapped":
    assert host_memory.map_large_tensors()
warm = torch.ones(24 << 18)
del warm  # a freed 24 MiB mapping: glibc raises its threshold to 24 MiB
start = rss_mib()
big, small = [], []
for _ in range(50):
    big.append(torch.ones(6 << 18))  # 6 MiB each
    small.append(torch.ones(16))  # heap blocks between them, so the freed big ones cannot merge away
del big
print(round(rss_mib() - start))
"""


def _retained_mib(mode: str, **env) -> int:
    import os

    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_activations_leave_the_process():
    if _retained_mib("default") < 200:
        pytest.skip("this C library does not keep freed 6 MiB blocks resident; nothing to show")
    assert _retained_mib("mapped") < 30  # against 300 MiB of freed tensors kept by default


def test_the_users_own_threshold_is_left_alone(monkeypatch):
    from ftune.run import host_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert host_memory.map_large_tensors() is False
