"""The task registry: built-in tasks, YAML task files, tasks from Python, Hub loading (mocked) and bad data."""

from __future__ import annotations

import json

import pytest

from lorafuse.errors import ConfigError
from lorafuse.tasks import DataError, Example, Task, get_task, list_tasks, load_task_file, register_task
from lorafuse.tasks.registry import load_from_hub

ROWS = [{"premise": "p1", "hypothesis": "h1", "label": "entailment"},
        {"premise": "p2", "hypothesis": "h2", "label": "neutral"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_builtin_tasks_and_their_label_words():
    assert {"mnli", "snli", "rte", "qnli", "scitail", "sick", "fever"} <= set(list_tasks())
    assert get_task("rte").labels == ("entailment", "not_entailment")
    assert get_task("scitail").labels == ("entailment", "neutral")
    assert get_task("fever").labels == ("contradiction", "entailment")
    assert get_task("mnli").labels == get_task("snli").labels == ("contradiction", "entailment", "neutral")
    assert get_task("rte").hub.dataset == "nyu-mll/glue" and get_task("rte").hub.premise == "sentence1"


def test_qnli_hub_mapping_agrees_with_the_shared_data(nli_data_dir):
    """premise = the context sentence, hypothesis = the question, from the Hub (GLUE's sentence / question) and
    from the shared files alike."""
    hub = get_task("qnli").hub
    assert (hub.premise, hub.hypothesis) == ("sentence", "question")
    examples = get_task("qnli").load("validation", nli_data_dir, 200)
    questions = sum(e.hypothesis.rstrip().endswith("?") for e in examples)
    assert questions > 0.9 * len(examples) and sum(e.premise.rstrip().endswith("?") for e in examples) < questions / 10


def test_unknown_task_lists_known_ones():
    with pytest.raises(ConfigError, match="did you mean 'mnli'.*known: .*rte"):
        get_task("mnlii")


def test_local_data_dir_in_the_shared_schema(tmp_path):
    (tmp_path / "scitail").mkdir()
    _jsonl(tmp_path / "scitail" / "test.jsonl", ROWS)
    examples = get_task("scitail").load("test", tmp_path)
    assert examples[1] == Example("p2", "h2", "neutral", "test-2")
    assert get_task("scitail").load("test", tmp_path, max_examples=1) == examples[:1]
    with pytest.raises(ConfigError, match="unknown split 'tset'"):
        get_task("scitail").load("tset", tmp_path)


def test_bad_data_files_name_file_and_line(tmp_path):
    task = Task("t", ("entailment", "neutral"), files={"train": str(tmp_path / "train.jsonl")})
    _jsonl(tmp_path / "train.jsonl", [ROWS[0], {**ROWS[0], "label": "entailed"}])
    with pytest.raises(DataError, match=r"train.jsonl:2: unknown label 'entailed' \(did you mean 'entailment'"):
        task.load("train")
    (tmp_path / "train.jsonl").write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        task.load("train")
    _jsonl(tmp_path / "train.jsonl", [{"premise": "a", "label": "neutral"}])
    with pytest.raises(DataError, match=r"train.jsonl:1: field 'hypothesis' missing"):
        task.load("train")
    (tmp_path / "train.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty data file"):
        task.load("train")
    with pytest.raises(DataError, match="no such data file"):
        Task("u", ("a", "b"), files={"test": str(tmp_path / "missing.jsonl")}).load("test")


def test_single_task_yaml_with_its_own_field_names(tmp_path):
    _jsonl(tmp_path / "dev.jsonl", [{"s1": "a", "s2": "b", "gold": "yes"}, {"s1": "c", "s2": "d", "gold": "no"}])
    (tmp_path / "mine.yaml").write_text("name: yesno_task\nlabels: [yes, no]\nfiles: {test: dev.jsonl}\n")
    with pytest.raises(ConfigError, match="quote words YAML reads otherwise"):  # YAML 1.1: yes -> True
        load_task_file(tmp_path / "mine.yaml")
    (tmp_path / "mine.yaml").write_text("name: yesno_task\nlabels: ['yes', 'no']\nfiles: {test: dev.jsonl}\n"
                                        "fields: {premise: s1, hypothesis: s2, label: gold}\n")
    (task,) = load_task_file(tmp_path / "mine.yaml")
    assert get_task("yesno_task") is task
    assert [(e.premise, e.label) for e in task.load("test")] == [("a", "yes"), ("c", "no")]


def test_task_file_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("t1: {labels: [a, b], file: {test: x.jsonl}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: task 't1': unknown field 'file' \(did you mean 'files'"):
        load_task_file(bad)
    bad.write_text("t1: {labels: [a, a], files: {test: x.jsonl}}\n")
    with pytest.raises(ConfigError, match="two distinct labels"):
        load_task_file(bad)
    bad.write_text("t1: {labels: [a, b], files: {tests: x.jsonl}}\n")
    with pytest.raises(ConfigError, match="unknown split 'tests'"):
        load_task_file(bad)
    bad.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a task"):
        load_task_file(bad)


def test_task_whose_examples_come_from_python():
    def examples(split: str) -> list[Example]:
        return [Example(f"{split} premise", "h", "b"), Example("p", "h", "a")]

    task = register_task(Task("py_task", ("a", "b")), examples=examples, replace=True)
    assert get_task("py_task") is task and task.load("validation")[0].premise == "validation premise"
    with pytest.raises(ConfigError, match="already registered"):
        register_task(Task("py_task", ("a", "b")), examples=examples)


def test_hub_source_maps_label_indices_and_skips_unmapped(monkeypatch, tmp_path):
    import datasets

    rows = [{"sentence1": "p", "sentence2": "h", "label": 0}, {"sentence1": "q", "sentence2": "i", "label": 1},
            {"sentence1": "r", "sentence2": "j", "label": -1}]
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or rows)
    examples = load_from_hub(get_task("rte").hub, "test", get_task("rte").labels)
    assert calls == [(("nyu-mll/glue", "rte"), {"split": "validation"})]  # GLUE's test has no labels
    assert [(e.premise, e.label) for e in examples] == [("p", "entailment"), ("q", "not_entailment")]
    (tmp_path / "hub.yaml").write_text("name: hubby\nlabels: [entailment, neutral]\nhub: org/set\n"
                                       "fields: {premise: a, hypothesis: b, label: c}\n")
    (task,) = load_task_file(tmp_path / "hub.yaml")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"a": "x", "b": "y", "c": "neutral"}])
    assert task.load("train")[0] == Example("x", "y", "neutral", "org/set-train-0")


def test_generated_suite_is_deterministic_and_disjoint():
    task = get_task("syn_numbers")
    a, b = task.load("test"), task.load("test")
    assert a == b
    train = {(e.premise, e.hypothesis) for e in task.load("train")}
    assert not train & {(e.premise, e.hypothesis) for e in a}


def test_hub_validation_is_held_out_of_train_never_the_test_split(monkeypatch):
    """GLUE's RTE has no labelled test split, so test is GLUE's validation and validation is a seeded 10% of train
    (the rest is train): the three splits are disjoint and the same on every call."""
    import datasets

    train = [{"sentence1": f"p{i}", "sentence2": f"h{i}", "label": i % 2} for i in range(100)]
    dev = [{"sentence1": f"d{i}", "sentence2": "x", "label": 0} for i in range(10)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, split, **k: train if split == "train" else dev)
    task = get_task("rte")
    splits = {s: [(e.premise, e.hypothesis) for e in load_from_hub(task.hub, s, task.labels)]
              for s in ("train", "validation", "test")}
    assert len(splits["validation"]) == 10 and len(splits["train"]) == 90 and len(splits["test"]) == 10
    assert not set(splits["train"]) & set(splits["validation"])
    assert not (set(splits["train"]) | set(splits["validation"])) & set(splits["test"])
    assert splits["validation"] == [(e.premise, e.hypothesis) for e in load_from_hub(task.hub, "validation", task.labels)]


def test_every_builtin_hub_task_keeps_validation_apart_from_test():
    for name in ("mnli", "snli", "rte", "qnli", "scitail", "sick", "fever"):
        hub = get_task(name).hub
        if hub is not None:
            assert hub.heldout is not None or hub.splits.get("validation", "validation") != hub.splits.get("test", "test")


def test_a_hub_task_whose_validation_is_its_test_split_is_refused(tmp_path):
    (tmp_path / "leak.yaml").write_text("name: leaky\nlabels: [entailment, neutral]\n"
                                        "hub: {dataset: org/set, splits: {validation: dev, test: dev}}\n")
    with pytest.raises(ConfigError, match="validation and test are the same Hub split 'dev'.*heldout"):
        load_task_file(tmp_path / "leak.yaml")
    (tmp_path / "bad.yaml").write_text("name: bad\nlabels: [entailment, neutral]\n"
                                       "hub: {dataset: org/set, heldout: {fraction: 2}}\n")
    with pytest.raises(ConfigError, match="heldout: fraction must be in"):
        load_task_file(tmp_path / "bad.yaml")


def test_an_experiment_whose_validation_is_its_test_split_is_refused(tmp_path, capsys):
    from lorafuse.experiment.validate import check_data

    (tmp_path / "ovl").mkdir()
    rows = [json.dumps({"premise": f"p{i}", "hypothesis": "h", "label": "entailment"}) for i in range(4)]
    for split, lines in (("train", rows), ("validation", rows[:2]), ("test", rows[:2])):
        (tmp_path / "ovl" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "ovl.yaml").write_text("name: ovl\nlabels: [entailment, neutral]\n")
    load_task_file(tmp_path / "ovl.yaml")
    with pytest.raises(ConfigError, match="task 'ovl': every test example is also in its validation split"):
        check_data(["ovl"], str(tmp_path), ["validation", "test"])
    (tmp_path / "ovl" / "test.jsonl").write_text("\n".join(rows[1:]) + "\n")
    check_data(["ovl"], str(tmp_path), ["validation", "test"])  # one shared pair of three: a warning only
    assert "1 of 3 test pairs also occur" in capsys.readouterr().err
