"""What the end-to-end CPU benchmarks share (bench_sst2_cpu.py, bench_sft_cpu.py): each side runs in its own child
process of this interpreter, timed from outside (wall and CPU seconds, peak RSS from the kernel's accounting of that
child alone), and reports what it measured inside as one JSON line on stdout. Dev-only: ftune never imports this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run_side(script: Path, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `script --side ...` in a child; its JSON line plus wall_s, cpu_s and rss_mib (peak resident memory)."""
    start, load = time.perf_counter(), os.getloadavg()[0]
    child = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        text=True,
    )
    out, err = child.communicate()  # reads both pipes to the end: the child never blocks on a full pipe
    wall = time.perf_counter() - start
    # peak RSS and CPU time come from the child itself (self_usage): RUSAGE_CHILDREN would mix every child reaped
    if child.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({child.returncode}):\n{err[-3000:]}")
    line = next(text for text in reversed(out.strip().splitlines()) if text.startswith("{"))
    return {**json.loads(line), "wall_s": wall, "load_at_start": load}


def self_usage() -> dict:
    """This process's peak RSS (MiB) and CPU seconds so far (user + system), for a side to report at its end."""
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return {"rss_mib": use.ru_maxrss / 1024, "cpu_s": use.ru_utime + use.ru_stime}


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table: `columns` are (header, key, format)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[key], fmt) if row.get(key) is not None else "" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    import platform

    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f} at the end"
    )
