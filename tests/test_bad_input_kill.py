"""`lorafuse merge` killed with SIGKILL mid-write, mid-replacement and mid-export (--output-model): the next run
removes what the killed one left, puts back an output it had set aside, and writes complete outputs.

The merge runs in a subprocess that sends itself SIGKILL at a chosen point (after the weights file is written;
between the two renames of --overwrite; inside a shard of the merged model): a real kill -9 at a moment a timer
could not hit reliably."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_factory import dense_update, llama_modules, write_adapter
from safetensors.torch import load_file, save_file

from lorafuse.adapters.reader import LoraAdapter
from lorafuse.cli import main

MODULES = llama_modules(1, ("self_attn.q_proj", "mlp.down_proj"))
SRC = Path(__file__).parents[1] / "src"

DRIVER = """
import os, pathlib, signal, sys
import lorafuse.adapters.writer as writer

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[1] == "after-weights":  # the output's weights file is complete, its config not yet written
    write = writer.save_safetensors
    def save_then_die(*args, **kwargs):
        write(*args, **kwargs)
        kill()
    writer.save_safetensors = save_then_die
elif sys.argv[1] == "mid-model":  # --output-model: the adapter is in its temporary directory, a shard half done
    import lorafuse.adapters.export as export
    def die_in_shard(path, tensors, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half a shard")
        kill()
    export.save_safetensors = die_in_shard
else:  # "mid-swap": the previous output was set aside, the new one not yet moved into place
    rename = pathlib.Path.rename
    def rename_or_die(self, target):
        if ".tmp-" in self.name:
            kill()
        return rename(self, target)
    pathlib.Path.rename = rename_or_die
from lorafuse.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _killed_merge(point: str, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, point, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.fixture()
def inputs(tmp_path: Path) -> list[str]:
    return [str(write_adapter(tmp_path / f"a{i}", MODULES, seed=i)) for i in range(2)]


def _check_output(out: Path, inputs: list[str], weights: tuple[float, float]) -> None:
    module = "model.layers.0.mlp.down_proj"
    ref = sum(w * dense_update(Path(p), module) for w, p in zip(weights, inputs))
    got = LoraAdapter(out).update(module).dense().double()
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_kill_mid_write_then_rerun(tmp_path, inputs):
    out = tmp_path / "fused"
    args = ["merge", "--method", "linear", "--adapters", *inputs, "-o", str(out), "--quiet"]
    _killed_merge("after-weights", args)
    assert not out.exists() and _leftovers(tmp_path)  # a half-written temporary directory, no output
    assert main(args) == 0
    assert _leftovers(tmp_path) == []
    _check_output(out, inputs, (1.0, 1.0))


def test_kill_mid_overwrite_keeps_the_previous_output(tmp_path, inputs):
    out = tmp_path / "fused"
    first = ["merge", "--method", "linear", "--adapters", *inputs, "-o", str(out), "--quiet"]
    assert main(first) == 0
    previous = _digest(out)
    second = [*first, "--weights", "0.25", "0.75", "--overwrite"]
    _killed_merge("mid-swap", second)
    assert not out.exists() and len(_leftovers(tmp_path)) == 2  # the old output set aside, the new one beside it
    assert main(first) == 1  # the next run puts the previous output back, so without --overwrite it is kept
    assert _digest(out) == previous and _leftovers(tmp_path) == []
    assert main(second) == 0
    assert _leftovers(tmp_path) == []
    _check_output(out, inputs, (0.25, 0.75))


def test_kill_while_writing_the_merged_model_then_rerun(tmp_path, inputs):
    base = tmp_path / "tiny-llama"
    base.mkdir()
    save_file({f"{m}.weight": torch.zeros(*shape) for m, shape in MODULES.items()}, str(base / "model.safetensors"))
    out, model = tmp_path / "fused", tmp_path / "model"
    args = ["merge", "--method", "linear", "--adapters", *inputs, "-o", str(out), "--base-model", str(base),
            "--output-model", str(model), "--quiet"]
    _killed_merge("mid-model", args)
    assert not out.exists() and not model.exists() and len(_leftovers(tmp_path)) == 2  # neither output committed
    assert main(args) == 0
    assert _leftovers(tmp_path) == []
    _check_output(out, inputs, (1.0, 1.0))
    module = "model.layers.0.mlp.down_proj"
    ref = dense_update(Path(inputs[0]), module) + dense_update(Path(inputs[1]), module)
    assert torch.allclose(load_file(str(model / "model.safetensors"))[f"{module}.weight"].double(), ref, atol=1e-5)
