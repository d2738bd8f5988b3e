"""Two processes through accelerate (gloo, CPU): `ftune train --nproc 2` with batch 4 per process ends where one
process with batch 8 ends, writes the same run directory, resumes bitwise after SIGKILL, trains AdapterDrop (whose
parameters may go unused in a step), and stops on every process when one sees a NaN.

Models here have no dropout: a process draws masks for its own rows, which one process for all rows does not.
Each launch costs seconds of start-up, so the cases are few and small.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from conftest import recipe_doc, write_recipe

REPO = Path(__file__).resolve().parents[1]
METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "full": {"name": "full"},
    "prompt_tuning": {"name": "prompt_tuning", "n_tokens": 4},
    "adapter": {"name": "adapter", "bottleneck": 4},
}


@pytest.fixture(scope="module")
def still_bert(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT with every dropout at 0."""
    folder = tmp_path_factory.mktemp("still-bert") / "bert"
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _ftune(*args, env: dict | None = None, wait: bool = True, **popen):
    command = [sys.executable, "-m", "ftune", *map(str, args)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    environment |= env or {}
    if not wait:
        return subprocess.Popen(
            command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **popen
        )
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600, check=False)


def _recipe(tmp_path: Path, name: str, model: Path, data: Path, method: dict, **train) -> Path:
    doc = recipe_doc("cls", model, data, tmp_path / name, method, **({"max_steps": 6, "eval_every": 3} | train))
    return write_recipe(tmp_path / f"{name}.yaml", doc)


def _weights(run: Path) -> dict:
    return load_file(str(run / "method.safetensors"))


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_of_batch_4_equal_one_of_batch_8(method, still_bert, cls_data, tmp_path):
    one = _ftune("train", _recipe(tmp_path, "one", still_bert, cls_data, METHODS[method], batch_size=8))
    assert one.returncode == 0, one.stderr
    two = _ftune("train", _recipe(tmp_path, "two", still_bert, cls_data, METHODS[method], batch_size=4), "--nproc", 2)
    assert two.returncode == 0, two.stderr
    assert _max_difference(_weights(tmp_path / "one"), _weights(tmp_path / "two")) <= 1e-5
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert (record["world_size"], record["batch_per_device"], record["global_batch"]) == (2, 4, 8)
    assert record["distributed"] == "multi_cpu"
    if method == "lora":  # the run directory is what one process writes, and its evaluations agree
        listing = {p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*")}
        assert listing == {p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*")}
        logs = [
            [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("one", "two")
        ]
        assert [sorted(e) for e in logs[0]] == [sorted(e) for e in logs[1]]
        for a, b in zip(*logs):
            if "validation" in a:
                assert a["validation"]["accuracy"] == b["validation"]["accuracy"]
                assert a["validation"]["examples"] == b["validation"]["examples"] == 16  # every row, once
                assert a["validation"]["loss"] == pytest.approx(b["validation"]["loss"], abs=1e-5)
            else:
                assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["lr"] == b["lr"]
        assert json.loads(two.stdout)["step"] == 6  # the result is printed once, by the main process


def test_global_batch_scope(still_bert, cls_data, tmp_path):
    """batch_scope: global splits batch_size over the processes: batch 8 global on 2 is 4 per process."""
    recipe = _recipe(
        tmp_path, "run", still_bert, cls_data, METHODS["lora"], batch_size=8, batch_scope="global", max_steps=1
    )
    result = _ftune("train", recipe, "--nproc", 2)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (record["batch_per_device"], record["global_batch"]) == (4, 8)


def test_adapter_drop_trains_on_two_processes(tiny_bert, cls_data, tmp_path):
    """Robust AdapterDrop skips a random number of blocks' adapters per batch: DDP is told some parameters may go
    unused, else the second step fails ("Expected to have finished reduction")."""
    method = {"name": "adapter_drop", "bottleneck": 4, "drop_first": 1, "robust": True}
    result = _ftune("train", _recipe(tmp_path, "run", tiny_bert, cls_data, method, batch_size=4), "--nproc", 2)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["step"] == 6


def test_a_nan_on_one_process_stops_both(tiny_bert, cls_data, tmp_path):
    """Process 1 alone gets NaN logits at its third training forward; both processes stop at step 3 with the same
    one-line error, and nothing of that step is saved."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import ftune.assemble as assemble\n"
        "    real, calls = assemble.build_model, [0]\n"
        "    def build(*args, **kwargs):\n"
        "        model = real(*args, **kwargs)\n"
        "        def hook(module, inputs, output):\n"
        "            if module.training:\n"
        "                calls[0] += 1\n"
        "                if calls[0] == 3:\n"
        "                    output.logits = output.logits * float('nan')\n"
        "            return output\n"
        "        model.register_forward_hook(hook)\n"
        "        return model\n"
        "    assemble.build_model = build\n"
    )
    recipe = _recipe(tmp_path, "run", tiny_bert, cls_data, METHODS["lora"], batch_size=4, save_every=1)
    result = _ftune("train", recipe, "--nproc", 2, env={"PYTHONPATH": f"{shim}{os.pathsep}{REPO}"})
    assert result.returncode != 0
    # every process takes the same decision (the launcher may stop one before it prints: at least one line)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and len(set(errors)) == 1, result.stderr
    assert errors[0].startswith("error: step 3 of 6: non-finite loss"), errors
    assert "Traceback" not in result.stderr
    done = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert done == ["step-00000002"]


def test_killed_two_process_run_resumes_bitwise(still_bert, cls_data, tmp_path):
    """SIGKILL to both processes after the step-3 checkpoint; `--resume` on two processes ends bitwise equal to an
    uninterrupted two-process run (weights and logged losses)."""
    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1}  # dropout: each process's random stream must resume
    reference = _recipe(
        tmp_path, "reference", still_bert, cls_data, method, batch_size=4, save_every=1, keep_checkpoints=10
    )
    assert _ftune("train", reference, "--nproc", 2).returncode == 0
    killed = _recipe(tmp_path, "killed", still_bert, cls_data, method, batch_size=4, save_every=1, keep_checkpoints=10)
    process = _ftune("train", killed, "--nproc", 2, wait=False)
    target = tmp_path / "killed" / "checkpoints" / "step-00000003" / "state.json"
    deadline = time.time() + 300
    while not target.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert target.is_file() and not (tmp_path / "killed" / "metrics.json").is_file(), "killed too late"
    resumed = _ftune("train", killed, "--nproc", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "reference"), _weights(tmp_path / "killed")
    assert all((a[k] == b[k]).all() for k in a)
    logs = [
        [
            {k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
            for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
        ]
        for r in ("reference", "killed")
    ]
    assert logs[0] == logs[1]
    record = yaml.safe_load((tmp_path / "killed" / "run.json").read_text())
    assert record["resumes"] and record["world_size"] == 2


# accelerate 1.15 shards only on GPUs and trains CPU processes as plain DDP; this shim (test only, on the launched
# processes' PYTHONPATH) forces its state to FSDP so that ftune's sharded path (FSDP2: gathered weights and optimizer
# state, restored shards) runs over gloo here. On GPUs accelerate does the same by itself.
FSDP_ON_CPU = """
import os
if os.environ.get("RANK") is not None:
    import ftune.run.fsdp as fsdp
    import ftune.run.setup as setup
    fsdp.gpus_shard = lambda: True
    real = setup.accelerator_for
    def forced(recipe, *args, **kwargs):
        acc = real(recipe, *args, **kwargs)
        if recipe.train.distributed == "fsdp":
            from accelerate import FullyShardedDataParallelPlugin
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            acc.state.distributed_type = DistributedType.FSDP
            acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
                reshard_after_forward=True)
        return acc
    setup.accelerator_for = forced
"""


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_equals_one_process_and_resumes(method, still_bert, cls_data, tmp_path):
    """FSDP2 over two processes (batch 4 each) ends where one process of batch 8 ends; a run resumed from its
    step-3 checkpoint (weights and optimizer state gathered whole, handed back as shards) ends bitwise where the
    uninterrupted FSDP run ends."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(FSDP_ON_CPU)
    env = {"PYTHONPATH": f"{shim}{os.pathsep}{REPO}"}
    one = _ftune("train", _recipe(tmp_path, "one", still_bert, cls_data, METHODS[method], batch_size=8))
    assert one.returncode == 0, one.stderr
    settings = {"batch_size": 4, "distributed": "fsdp", "save_every": 1, "keep_checkpoints": 10}
    sharded = _ftune(
        "train", _recipe(tmp_path, "fsdp", still_bert, cls_data, METHODS[method], **settings), "--nproc", 2, env=env
    )
    assert sharded.returncode == 0, sharded.stderr
    assert json.loads((tmp_path / "fsdp" / "run.json").read_text())["distributed"] == "fsdp"
    assert _max_difference(_weights(tmp_path / "one"), _weights(tmp_path / "fsdp")) <= 1e-5
    # resume: a copy of the run cut back to its step-3 checkpoint, as a kill after that save leaves it
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "fsdp", again)
    for later in [p for p in (again / "checkpoints").glob("step-*") if int(p.name.split("-")[1]) > 3]:
        shutil.rmtree(later)
    for name in ("metrics.json", "method.safetensors", "method.json"):
        (again / name).unlink()
    doc = yaml.safe_load((again / "recipe.yaml").read_text()) | {"output_dir": str(again)}
    recipe = write_recipe(tmp_path / "again.yaml", doc)
    (again / "recipe.yaml").write_text((tmp_path / "again.yaml").read_text())
    resumed = _ftune("train", recipe, "--nproc", 2, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((again / "run.json").read_text())["resumes"][0]["from"] == "checkpoints/step-00000003"
    a, b = _weights(tmp_path / "fsdp"), _weights(again)
    assert all((a[k] == b[k]).all() for k in a)


def test_fsdp_without_gpus_is_refused_in_one_line(still_bert, cls_data, tmp_path):
    recipe = _recipe(tmp_path, "run", still_bert, cls_data, METHODS["lora"], batch_size=4, distributed="fsdp")
    result = _ftune("train", recipe, "--nproc", 2)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("train.distributed: fsdp shards over CUDA GPUs" in e for e in errors), result.stderr
    assert not (tmp_path / "run").exists()


def test_bad_input_is_one_line_on_every_process(still_bert, cls_data, tmp_path):
    recipe = _recipe(tmp_path, "run", still_bert, cls_data, METHODS["lora"], batch_size=4, max_steps=1)
    assert _ftune("train", recipe, "--nproc", 2).returncode == 0
    again = _ftune("train", recipe, "--nproc", 2)  # output_dir holds a run now
    assert again.returncode != 0
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("output_dir" in e and "--overwrite" in e for e in errors), again.stderr
    assert "Traceback" not in again.stderr
