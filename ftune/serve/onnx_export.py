"""`ftune export RUN OUT --format onnx`: the run's merged model (the method folded into the base, as `ftune merge`
does) as one ONNX graph, input_ids and attention_mask (int64, [batch, sequence]) -> logits ([batch, labels] for
sequence classification, [batch, sequence, labels or vocabulary] for token classification and causal LMs: the full
sequence, no cache), both axes dynamic; in float32 whatever model.dtype the run trained in.

Nothing is kept unless onnxruntime reproduces PyTorch's logits to TOLERANCE (max absolute difference) on batches of
shapes the export never saw, one row padded. The dynamo exporter (torch.export + onnxscript, torch's supported path)
is tried first; the TorchScript exporter (deprecated since torch 2.9) only where dynamo fails to convert or to agree.
Both agree with PyTorch to 1e-7 on tiny BERT (sequence and token classification) and Llama in eval mode.

    OUT/model.onnx       (+ model.onnx.data when the weights exceed protobuf's 2 GB)
    OUT/tokenizer files  as `ftune merge` writes them
    OUT/onnx.json        inputs, outputs with their axes, label names, exporter, opset, the check's max difference
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ftune import rundir
from ftune.assemble import stored_recipe
from ftune.errors import MethodError, ModelError
from ftune.methods import method_of
from ftune.serve.export import check_fresh, make_dir, merged_model

TOLERANCE = 1e-4
INPUTS, OUTPUT, MODEL_FILE, REPORT = ("input_ids", "attention_mask"), "logits", "model.onnx", "onnx.json"
EXPORT_SHAPE = (2, 8)
CHECK_SHAPES = ((3, 13), (1, 5))
"""(batch, sequence) the check runs: neither is the export's, so a graph that fixed an axis fails it."""
EXTERNAL_DATA_BYTES = 2**31 - 2**26  # protobuf's 2 GB limit, less room for the graph itself


class LogitsOnly(nn.Module):
    """The exported signature: forward(input_ids, attention_mask) -> logits, without a cache or an output dict."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_onnx(run_dir: str | Path, out: str | Path, trust_remote_code: bool = False) -> tuple[Path, dict]:
    """Write `out` (a new or empty folder) as the module docstring says; returns it and the report (onnx.json).
    Refusals (a method that cannot merge, an encoder-decoder, a graph that disagrees) write nothing."""
    out = check_fresh(out)
    _refuse_unmergeable(Path(run_dir), trust_remote_code)  # before loading anything
    recipe, model, tokenizer = merged_model(run_dir, trust_remote_code)
    if model.config.is_encoder_decoder:
        raise ModelError(
            f"export --format onnx: {type(model).__name__} is an encoder-decoder, whose forward also "
            "needs decoder inputs; this export covers encoder-only and decoder-only models; use --format hf"
        )
    model = model.float().eval()
    model.config.use_cache = False  # the full sequence's logits: no key/value cache in or out of the graph
    module = LogitsOnly(model).eval()
    vocabulary = model.get_input_embeddings().num_embeddings
    external = sum(p.numel() for p in model.parameters()) * 4 > EXTERNAL_DATA_BYTES
    make_dir(out.parent)
    staging = out.with_name(f".{out.name}.onnx-partial")
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted export left
    staging.mkdir()
    try:
        failures = []
        for exporter in ("dynamo", "torchscript"):
            (staging / MODEL_FILE).unlink(missing_ok=True)
            (staging / f"{MODEL_FILE}.data").unlink(missing_ok=True)
            try:
                export_graph(exporter, module, staging / MODEL_FILE, vocabulary, external)
                difference = max_difference(staging / MODEL_FILE, module, vocabulary)
            # an exporter (or the runtime, on its graph) may fail on an architecture in ways of its own
            except Exception as e:  # noqa: BLE001
                failures.append(f"{exporter}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}")
                continue
            if difference <= TOLERANCE:
                break
            failures.append(f"{exporter}: logits differ from PyTorch's by {difference:.3g} > {TOLERANCE:g}")
        else:
            raise ModelError(
                f"export --format onnx: no exporter gives a graph that matches {type(model).__name__} "
                f"({'; '.join(failures)}); nothing written"
            )
        report = _report(staging / MODEL_FILE, recipe, run_dir, exporter, difference)
        tokenizer.save_pretrained(staging)
        rundir.write_json(staging / REPORT, report)
        staging.replace(out)  # a new or empty folder: whole, or not there at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, report


def max_difference(path: Path, module: nn.Module, vocabulary: int) -> float:
    """Max |onnxruntime logits − PyTorch logits| over CHECK_SHAPES batches of random ids, the last row of each padded
    at the end (inf for a non-finite difference)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator, worst = torch.Generator().manual_seed(0), 0.0
    for batch, length in CHECK_SHAPES:
        ids = torch.randint(0, vocabulary, (batch, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[-1, length - 2 :] = 0
        with torch.no_grad():
            expected = module(ids, mask)
        got = session.run([OUTPUT], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        difference = float((torch.from_numpy(got) - expected).abs().max())
        worst = max(worst, difference if math.isfinite(difference) else math.inf)
    return worst


def export_graph(exporter: str, module: nn.Module, path: Path, vocabulary: int, external: bool = False) -> None:
    """Write `module` to `path` with `exporter` ("dynamo" or "torchscript"), both axes of both inputs dynamic."""
    with _quiet():
        _EXPORTERS[exporter](module, path, vocabulary, external)


def _dynamo(module: nn.Module, path: Path, vocabulary: int, external: bool) -> None:
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(
        module,
        _example(vocabulary),
        str(path),
        dynamo=True,
        verbose=False,
        external_data=external,
        input_names=list(INPUTS),
        output_names=[OUTPUT],
        dynamic_shapes={name: {0: batch, 1: sequence} for name in INPUTS},
    )


def _torchscript(module: nn.Module, path: Path, vocabulary: int, external: bool) -> None:
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        module,
        _example(vocabulary),
        str(path),
        dynamo=False,
        input_names=list(INPUTS),
        output_names=[OUTPUT],
        dynamic_axes={**dict.fromkeys(INPUTS, axes), OUTPUT: axes},
        opset_version=17,
    )


_EXPORTERS = {"dynamo": _dynamo, "torchscript": _torchscript}


def _example(vocabulary: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocabulary, EXPORT_SHAPE, generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # a padded row, so no exporter may take the mask for all ones
    return ids, mask


def _report(path: Path, recipe, run_dir, exporter: str, difference: float) -> dict:
    """onnx.json: what a serving program needs to feed the graph and read its output."""
    import onnx
    import onnxruntime

    graph = onnx.load(str(path), load_external_data=False)
    axes = {
        value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        for value in [*graph.graph.input, *graph.graph.output]
    }
    return {
        "format": "onnx",
        "model": MODEL_FILE,
        "inputs": {name: axes[name] for name in INPUTS},
        "outputs": {OUTPUT: axes[OUTPUT]},
        "dtype": "float32",
        "label_names": rundir.read_record(run_dir).label_names,
        "task": recipe.task,
        "method": recipe.method.name,
        "run": str(run_dir),
        "exporter": exporter,
        "opset": _opset(graph),
        "check": {
            "max_abs_diff": difference,
            "tolerance": TOLERANCE,
            "shapes": [list(s) for s in CHECK_SHAPES],
            "runtime": f"onnxruntime {onnxruntime.__version__}",
        },
    }


def _opset(graph) -> int | None:
    return next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)


def _refuse_unmergeable(run_dir: Path, trust_remote_code: bool) -> None:
    """A method that adds modules has no merged model to export: refused with the formats that do apply."""
    method = method_of(stored_recipe(run_dir, trust_remote_code)[0].method)
    if method.merging is None:
        other = "use --format peft for an adapter dir, or" if method.saving.peft else "serve"
        raise MethodError(
            f"export --format onnx: {method.name} adds modules that cannot be folded into the base "
            f"weights, so there is no merged model to export; {other} the run dir itself "
            f"(`ftune predict {run_dir}`)"
        )


@contextlib.contextmanager
def _quiet():
    """The exporters' progress notes and warnings (torchvision missing, axis renames) are no business of the user;
    a failure still raises."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
