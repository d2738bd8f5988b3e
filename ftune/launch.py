"""How an ftune process starts: the libraries it drives kept quiet (every command, and each `ftune compare` worker),
and `ftune train --nproc N`, the same command again under accelerate's launcher, its output less the launcher's own
noise. Several processes always go through accelerate, never a launcher of ftune's own."""

from __future__ import annotations

import os
from pathlib import Path


def launch(nproc: int, recipe: Path, overrides: list[str], flags: dict[str, bool]) -> int:
    """`ftune train --nproc N`: the same command under accelerate's launcher (its exit code is ours). Several machines
    are accelerate's own options: `accelerate launch --num_machines M --machine_rank R --main_process_ip HOST
    --num_processes TOTAL --multi_gpu -m ftune train RECIPE` on each machine."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port: two runs on one machine must not share a rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        "-m",
        "ftune",
        "train",
        str(recipe),
        *(a for o in overrides for a in ("--set", o)),
        *(f"--{flag.replace('_', '-')}" for flag, on in flags.items() if on),
    ]  # --resume, --overwrite, ...
    launcher = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, bufsize=1)
    for line in without_launcher_noise(launcher.stderr):
        sys.stderr.write(line)
    return launcher.wait()


def without_launcher_noise(lines):
    """The processes' stderr, less what torch's launcher adds when one fails: its log lines and the traceback of its
    own ChildFailedError (each process has already printed its one-line error). Any other traceback passes."""
    import re

    held: list[str] = []
    for line in lines:
        if os.environ.get("FTUNE_DEBUG") == "1":
            yield line
        elif held:
            held.append(line)
            if not line[:1].isspace():  # the exception line closes the traceback
                if "ChildFailedError" in line:
                    return  # the launcher's own failure report, to the end of its output
                yield from held
                held = []
        elif line.startswith("Traceback (most recent call last):"):
            held = [line]
        elif not re.match(r"[WEI]\d{4} \d\d:\d\d:\d\d", line):
            yield line
    yield from held


def quiet_libraries() -> None:
    """transformers and datasets print no progress bars or warnings; their errors reach ftune as exceptions."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its load errors reach us as exceptions: one line
