"""`accelerate launch -m lorafuse train` with 2 CPU processes (torchrun, gloo, loopback) on a tiny BERT writes one
adapter equal, up to float rounding, to a one-process run with the same global batch (2 × 4 = 8); a one-process
run with batch 4 (another global batch) is far from both, so the comparison can fail."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_bert, write_task_files

import lorafuse
from lorafuse.model.training import TRAIN_RECORD, TrainConfig, train_adapter
from lorafuse.tasks import load_task_file

pytest.importorskip("accelerate")
SRC = Path(lorafuse.__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("accelerate")
    model = tiny_bert(root / "bert")
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # dropout masks differ per process
    (model / "config.json").write_text(json.dumps(config))
    task_file = write_task_files(root / "data", "cmp", ["entailment", "contradiction", "neutral"], n=64)
    return root, model, task_file


def train_args(model: Path, task_file: Path, out: Path, batch_size: int) -> list[str]:
    return ["--task", "cmp", "--task-file", str(task_file), "--model", str(model), "--data-dir",
            str(task_file.parent), "--epochs", "1", "--dropout", "0", "--target-modules", "query", "value",
            "--rank", "4", "--lr", "1e-2", "--batch-size", str(batch_size), "--quiet", "-o", str(out)]


def single_process(model: Path, task_file: Path, out: Path, batch_size: int) -> dict[str, torch.Tensor]:
    load_task_file(task_file)
    train_adapter(TrainConfig(task="cmp", model=str(model), output=str(out), data_dir=str(task_file.parent),
                              epochs=1, dropout=0.0, target_modules=["query", "value"], rank=4, lr=1e-2,
                              batch_size=batch_size, progress=False))
    return load_file(str(out / "adapter_model.safetensors"))


def test_two_processes_match_one_with_the_same_global_batch(setup):
    root, model, task_file = setup
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # `--multi_gpu` is accelerate's torchrun launcher; without a GPU the processes form a gloo group on the CPU
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", "lorafuse", "train"]
    done = subprocess.run(launch + train_args(model, task_file, root / "ddp", 4), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # the first process reports; the second waited for the adapter
    record = json.loads((root / "ddp" / TRAIN_RECORD).read_text())
    assert record["train_steps"] == 64 // 8  # global batch 2 × 4

    ddp = load_file(str(root / "ddp" / "adapter_model.safetensors"))
    same = single_process(model, task_file, root / "single8", 8)
    other = single_process(model, task_file, root / "single4", 4)
    assert ddp.keys() == same.keys() and len(ddp) == 10  # 2 layers × query, value × A, B + the head
    for key in ddp:
        assert torch.allclose(ddp[key], same[key], atol=1e-6, rtol=0), key
    assert max(float((other[k] - same[k]).abs().max()) for k in same) > 1e-2
