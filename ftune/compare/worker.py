"""One method of `ftune compare`, in its own process: train (or resume) the recipe, then measure what the table needs
besides the run's own files, into `<output_dir>/compare.json`:

    peak_memory_bytes  the most memory training held: torch's peak allocation on a CUDA device; on a CPU the
                       process's peak resident set (ru_maxrss: weights, optimizer state, activations, and the
                       interpreter and libraries, ~0.5 GB of it the same for every method)
    wall_seconds       the `train` call: data and model loading, calibration, training and evaluations
    forward            the cost of one forward on the first ROWS validation rows (data order), the trained model (its
                       method merged into the base weights where it merges) against the base model alone: the
                       fastest of `repeats` timed forwards of each, interleaved (other work on the machine only
                       ever adds time, so the fastest is the closest to the model's own cost)

A process of its own gives each method a clean peak (a process's peak memory never falls) and keeps one method's
failure from stopping the others. Usage: python -m ftune.compare.worker RECIPE.yaml [--resume | --overwrite]
[--measure-only]; an FtuneError is one line on stderr and the exit code it carries.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ftune.errors import FtuneError, MethodError
from ftune.rundir import COMPARE as RESULT

REFUSED = 3
"""Exit code when the method does not apply to the model: it refused before the run directory was written."""
REPEATS = 5
ROWS = 16  # rows of the timed batch: enough to be a real batch, few enough to time on a CPU


def peak_memory() -> int:
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def forward_cost(run_dir: Path, trust_remote_code: bool, repeats: int = REPEATS) -> dict[str, Any]:
    """Fastest seconds of a forward of the trained model and of the base model on the first ROWS validation rows
    (`trust_remote_code`: the comparison's own recipe's)."""
    import torch

    from ftune import assemble, models, rundir
    from ftune.data.loader import collate
    from ftune.methods import method_of
    from ftune.methods.base import unwrap_merged
    from ftune.models.precision import autocast
    from ftune.serve.score import trained_precision
    from ftune.tasks import TASKS

    recipe, model, tokenizer = assemble.load_run(run_dir, trust_remote_code)
    method = method_of(recipe.method)
    merged = method.merging is not None and not recipe.model.quantization
    if merged:  # what a deployment of a mergeable method runs: plain weights, no wrapper left
        method.merging.merge(model)
        model = unwrap_merged(model)
    names = rundir.read_record(run_dir).label_names
    spec = recipe.model
    source = models.resolve_model(spec.name, spec.gguf_file, spec.revision)
    base, _ = models.load_model(
        TASKS[recipe.task],
        source,
        spec.dtype,
        label_names=names,
        pad_token_id=tokenizer.pad_token_id,
        trust_remote_code=spec.trust_remote_code,
        revision=spec.revision,
        quantization=spec.quantization,
    )
    encoded = assemble.encode_rows(recipe, assemble.read_split(recipe, "validation"), tokenizer, names)
    # the first rows in data order (evaluation batches run longest first, which would time only the longest rows)
    batch = collate(tokenizer.pad_token_id)(encoded.examples[:ROWS])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = {k: v[:ROWS].to(device) for k, v in batch.items() if k != "labels"}
    model, base = model.to(device).eval(), base.to(device).eval()
    precision = trained_precision(run_dir)

    @torch.no_grad()
    def seconds(m) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(precision, device):
            m(**batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    try:
        for _ in range(2):  # warm-up: first-call allocations and kernel choices
            seconds(base), seconds(model)
    except (TypeError, ValueError, RuntimeError) as e:  # a task whose batches are not the model's inputs alone
        return {"error": f"not measured: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
    base_times, method_times = [], []
    for _ in range(repeats):
        base_times.append(seconds(base))
        method_times.append(seconds(model))
    base_s, method_s = min(base_times), min(method_times)
    return {
        "base_ms": 1000 * base_s,
        "method_ms": 1000 * method_s,
        "relative": method_s / base_s,
        "merged": merged,
        "rows": int(next(iter(batch.values())).shape[0]),
        "repeats": repeats,
        "device": device.type,
    }


def run(recipe_path: Path, resume: bool, overwrite: bool, measure_only: bool) -> dict[str, Any]:
    from rich.console import Console

    from ftune import rundir
    from ftune.recipe import load_recipe
    from ftune.run.train import train

    recipe = load_recipe(recipe_path)
    out = Path(recipe.output_dir)
    result = rundir.read_json(out, RESULT) if (out / RESULT).is_file() else {}
    if not measure_only:
        start = time.perf_counter()
        try:
            train(recipe, resume=resume, overwrite=overwrite, console=Console(stderr=True))
        except MethodError as e:
            if (out / rundir.RECORD).exists():
                raise
            raise Refused(str(e)) from None
        result = {
            "wall_seconds": time.perf_counter() - start,
            "peak_memory_bytes": peak_memory(),
            "memory": "cuda max allocated" if _cuda() else "process peak RSS",
            "resumed": resume,
        }
        rundir.write_json(out / RESULT, result)  # before the forward timing, which loads the model again
    result["forward"] = forward_cost(out, recipe.model.trust_remote_code)
    rundir.write_json(out / RESULT, result)
    return result


class Refused(FtuneError):
    """The method does not apply to this model (e.g. BitFit on a model without biases); nothing was written."""

    exit_code = REFUSED


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str]) -> int:
    from ftune.launch import quiet_libraries

    flags = {a for a in argv if a.startswith("--")}
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) != 1 or flags - {"--resume", "--overwrite", "--measure-only"}:
        print(__doc__.split("Usage: ")[1].split(";")[0], file=sys.stderr)
        return 2
    quiet_libraries()
    try:
        run(Path(paths[0]), "--resume" in flags, "--overwrite" in flags, "--measure-only" in flags)
    except FtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
