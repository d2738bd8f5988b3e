"""What the preflight tests share (tests/test_preflight*.py): a LoRA method, a fake /proc/meminfo and a disk with
no space."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

LORA = {"name": "lora", "r": 4, "alpha": 8}


def _meminfo(tmp: Path, kib: int) -> str:
    path = tmp / "meminfo"
    path.write_text(f"MemTotal:       16000000 kB\nMemFree:          1000 kB\nMemAvailable:   {kib} kB\n")
    return str(path)


def _no_space(monkeypatch, free: int = 1000) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - free, free))
