"""`lorafuse export-lm-eval`: the exported prompts are lorafuse's own, and lm-evaluation-harness scoring an
adapter on them (`simple_evaluate`, model hf + peft) reproduces `lorafuse eval`'s chat accuracy example by
example (skipped where lm_eval is not installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from adapter_factory import llama_modules, write_adapter
from tiny_models import tiny_bert, tiny_llama, write_task_files

from lorafuse.cli import main
from lorafuse.model.formulations import Chat
from lorafuse.tasks import get_task, load_task_file

TASKS = {"tri": ["entailment", "neutral", "contradiction"],  # every label one token
         "bin": ["entailment", "not entailment"]}  # `not entailment`: two tokens, the first distinguishing


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama whose weights are scaled ×15 (at the usual 0.02 init every prompt gets the same answer, so
    agreement would prove little), a random q/v adapter for it, and the two tasks."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lmeval")
    base = tiny_llama(root / "llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(15.0)
    model.save_pretrained(base)
    adapter = write_adapter(root / "adapter", llama_modules(2, ("self_attn.q_proj", "self_attn.v_proj")), r=4,
                            alpha=8, seed=1, base_model=str(base))
    files = [write_task_files(root / "data", name, labels, n=48, seed=i) for i, (name, labels) in
             enumerate(TASKS.items())]
    for f in files:
        load_task_file(f)
    return {"root": root, "base": base, "adapter": adapter, "task_files": files}


def export(setup, out: Path, *extra: str) -> int:
    argv = ["export-lm-eval", "--tasks", ",".join(TASKS), "--model", str(setup["base"]), "-o", str(out), *extra]
    for f in setup["task_files"]:
        argv += ["--task-file", str(f)]
    return main(argv)


def rows(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"lorafuse_{task}.jsonl").read_text().splitlines()]


def test_exported_prompts_are_lorafuses(setup, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    assert export(setup, out, "--max-examples", "10") == 0
    assert "--include_path" in capsys.readouterr().out
    chat = Chat(AutoTokenizer.from_pretrained(setup["base"]))
    for name, labels in TASKS.items():
        task = get_task(name)
        exported = rows(out, name)
        examples = task.load("test", max_examples=10)
        assert len(exported) == 10
        for row, ex in zip(exported, examples):
            assert row["prompt"] == chat.prompt(task, ex) and row["prompt"].endswith("<|im_start|> assistant ")
            assert labels[row["target"]] == ex.label == row["label"]
        full = yaml.safe_load((out / f"lorafuse_{name}.yaml").read_text())
        token = yaml.safe_load((out / f"lorafuse_{name}_token.yaml").read_text())
        assert full["doc_to_choice"] == labels and full["target_delimiter"] == ""
        assert full["output_type"] == "multiple_choice" and full["doc_to_text"] == "prompt"
        assert full["dataset_kwargs"]["data_files"]["test"] == f"lorafuse_{name}.jsonl"  # relative: no machine path
        assert token["task"] == f"lorafuse_{name}_token"
    assert yaml.safe_load((out / "lorafuse_bin_token.yaml").read_text())["doc_to_choice"] == ["entailment", "not"]
    # an existing output is refused without --overwrite, replaced with it
    assert export(setup, out) == 1 and "output exists" in capsys.readouterr().err
    assert export(setup, out, "--overwrite") == 0 and len(rows(out, "tri")) == 24
    assert main(["export-lm-eval", "--tasks", "tri", "--model", str(tiny_bert(tmp_path / "bert")), "-o",
                 str(tmp_path / "enc")]) == 1
    assert "encoder" in capsys.readouterr().err and not (tmp_path / "enc").exists()


def test_truncation_and_plain_prompts(setup, tmp_path):
    """A --max-length that cuts premises: the exported text tokenizes to exactly the tokens lorafuse scores. A
    model without a chat template: the plain `Answer:` prompt, and choices after a space."""
    from transformers import AutoTokenizer

    out = tmp_path / "cut"
    assert export(setup, out, "--max-length", "40", "--max-examples", "6") == 0
    tokenizer = AutoTokenizer.from_pretrained(setup["base"])
    chat = Chat(tokenizer, max_length=40)
    task = get_task("tri")
    for row, ex in zip(rows(out, "tri"), task.load("test", max_examples=6)):
        room = 40 - len(chat.answer_ids(task)[row["target"]])
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert ids == chat.fitted_prompt(task, ex, room) and len(ids) <= room
        assert row["prompt"] != chat.prompt(task, ex)  # the premise was cut

    plain = tiny_llama(tmp_path / "plain", chat_template=False)
    out = tmp_path / "plain-out"
    assert main(["export-lm-eval", "--tasks", "tri", "--model", str(plain), "-o", str(out),
                 "--task-file", str(setup["task_files"][0])]) == 0
    assert rows(out, "tri")[0]["prompt"].endswith("\nAnswer:")
    assert yaml.safe_load((out / "lorafuse_tri.yaml").read_text())["doc_to_choice"] == [
        " entailment", " neutral", " contradiction"]


def test_lm_eval_reproduces_lorafuse_accuracy(setup, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from lorafuse.model.evaluation import Evaluator

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out = tmp_path / "out"
    assert export(setup, out) == 0
    ev = Evaluator(str(setup["base"]), list(TASKS), formulation="chat", dtype="float32", progress=False,
                   batch_size=8)
    ours = {}
    for name in TASKS:
        result = ev.evaluate(str(setup["adapter"]), tasks=[name])
        ours[name] = (result.accuracy[name], list(ev.last_predictions[name]))
    names = [f"lorafuse_{n}{v}" for n in TASKS for v in ("", "_token")]
    monkeypatch.chdir(out)  # the YAMLs name their data relative to the export
    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={setup['base']},peft={setup['adapter']},dtype=float32",
        tasks=names, task_manager=TaskManager(include_path=str(out), include_defaults=False), batch_size=8,
        device="cpu", log_samples=True)

    def predictions(task: str) -> list[int]:
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        return [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) for s in samples]

    accuracy, predicted = ours["tri"]
    assert len(set(predicted)) > 1  # the model's answers depend on the prompt
    for variant in ("lorafuse_tri", "lorafuse_tri_token"):  # single-token labels: both scorings are lorafuse's
        assert res["results"][variant]["acc,none"] == pytest.approx(accuracy, abs=1e-12)
        assert predictions(variant) == predicted
    accuracy, predicted = ours["bin"]  # `not entailment`: lorafuse's decision is the token variant's
    assert res["results"]["lorafuse_bin_token"]["acc,none"] == pytest.approx(accuracy, abs=1e-12)
    assert predictions("lorafuse_bin_token") == predicted
    assert res["results"]["lorafuse_bin"]["sample_len"] == 24  # the whole-word scoring: its own number
