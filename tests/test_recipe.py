"""The training recipe on tiny models: the default recipe learns a task whose label is a simple function of the
input (both formulations), the adapter written is the best one seen on validation, the verbalizer loss is the
cross-entropy of the K-way decision `predict` makes, the classify head reads mean pooling where the model says so,
and the head has its own learning rate."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from fixtures_models import bert, llama, read_record  # noqa: F401
from lorafuse.model.training import TrainConfig, train_adapter
from lorafuse.tasks import get_task, load_task_file

LABELS3 = ["contradiction", "entailment", "neutral"]


@pytest.fixture(scope="module")
def keyword_task(tmp_path_factory):
    """`kw3`: the hypothesis's last word decides the label (tests/tiny_models.write_keyword_task)."""
    from tiny_models import write_keyword_task

    root = tmp_path_factory.mktemp("kw")
    load_task_file(write_keyword_task(root, "kw3", LABELS3))
    return root


@pytest.fixture(scope="module")
def sentence_bert(tmp_path_factory):
    from tiny_models import tiny_sentence_bert

    return tiny_sentence_bert(tmp_path_factory.mktemp("stbert") / "model")


# Only the budget is given: learning rates, head rate, warmup, pooling, targets and loss are the defaults.
@pytest.mark.parametrize("formulation,model_fixture,epochs", [("classify", "sentence_bert", 6),
                                                              ("chat", "llama", 12)])
def test_default_recipe_learns_a_simple_function_of_the_input(request, keyword_task, tmp_path, formulation,
                                                              model_fixture, epochs):
    from lorafuse.model.evaluation import Evaluator

    model = request.getfixturevalue(model_fixture)
    out = train_adapter(TrainConfig(task="kw3", model=str(model), formulation=formulation, output=str(tmp_path / "a"),
                                    data_dir=str(keyword_task), epochs=epochs, batch_size=8, progress=False))
    record = read_record(out)
    ev = Evaluator(str(model), ["kw3"], split="test", formulation=formulation, data_dir=keyword_task,
                   progress=False)
    assert ev.evaluate(out).accuracy["kw3"] >= 0.95, record["validation_history"]
    assert record["validation_accuracy"] >= 0.95
    assert record["hyperparameters"]["lr"] is not None and record["hyperparameters"]["warmup"] is not None
    assert record["pooling"] == ("mean" if formulation == "classify" else None)


def test_the_adapter_written_is_the_best_seen_on_validation(bert, keyword_task, tmp_path):  # noqa: F811
    from lorafuse.model.evaluation import Evaluator

    common = dict(task="kw3", model=str(bert), formulation="classify", data_dir=str(keyword_task), epochs=2,
                  batch_size=8, lr=2e-2, head_lr=5e-2, eval_steps=2, progress=False)
    best = read_record(train_adapter(TrainConfig(output=str(tmp_path / "best"), **common)))
    history = best["validation_history"]
    assert len(history) == 12 and history[-1][0] == best["train_steps"] == 24
    top = max(acc for _, acc in history)
    assert best["validation_accuracy"] == pytest.approx(top, abs=1e-4)
    assert best["best_step"] == next(step for step, acc in history if acc == top)  # ties keep the earliest
    assert best["checkpoint_rule"] == "best validation accuracy"
    ev = Evaluator(str(bert), ["kw3"], split="validation", formulation="classify", data_dir=keyword_task,
                   progress=False)
    assert ev.evaluate(tmp_path / "best").accuracy["kw3"] == pytest.approx(top, abs=1e-4)  # the written one is that step's
    last = read_record(train_adapter(TrainConfig(output=str(tmp_path / "last"), best_checkpoint=False, **common)))
    assert last["best_step"] == 24 and last["checkpoint_rule"] == "last"
    assert ev.evaluate(tmp_path / "last").accuracy["kw3"] == pytest.approx(last["validation_history"][-1][1], abs=1e-4)


def test_verbalizer_loss_is_the_cross_entropy_of_the_k_way_decision(llama, keyword_task):  # noqa: F811
    from lorafuse.model.formulations import load_model, make_formulation

    model, tokenizer = load_model(str(llama), "chat")
    task = get_task("kw3")
    chat = make_formulation("chat", tokenizer)
    examples = task.load("train", keyword_task)[:6]
    batch = chat.collate(chat.encode(task, examples))
    with torch.no_grad():
        ours = float(chat.loss(model, batch, task))
    # Independent reference: each example alone, unpadded, the full forward, the label words' first tokens.
    label_tokens = [tokenizer(lab, add_special_tokens=False)["input_ids"][0] for lab in task.labels]
    losses = []
    for e in examples:
        ids = tokenizer(chat.prompt(task, e), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        losses.append(-torch.log_softmax(logits[label_tokens], -1)[task.labels.index(e.label)])
    assert ours == pytest.approx(float(torch.stack(losses).mean()), rel=1e-4)
    assert chat.loss_kind == "verbalizer" and not chat.trains_on_answer
    generative = make_formulation("chat", tokenizer, chat_loss="generative")
    with torch.no_grad():  # the option is kept: the answer tokens' loss over the whole vocabulary
        g = float(generative.loss(model, generative.collate(generative.encode(task, examples), with_answer=True),
                                  task))
    assert g > math.log(len(task.labels))  # a random model over 60 words: well above the 3-way uniform loss
    with pytest.raises(Exception, match="unknown chat loss 'lm'"):
        make_formulation("chat", tokenizer, chat_loss="lm")


def test_generative_chat_loss_still_trains(llama, keyword_task, tmp_path):  # noqa: F811
    out = train_adapter(TrainConfig(task="kw3", model=str(llama), formulation="chat", output=str(tmp_path / "g"),
                                    data_dir=str(keyword_task), epochs=1, batch_size=8, chat_loss="generative",
                                    logging_steps=1, progress=False))
    record = read_record(out)
    assert record["hyperparameters"]["chat_loss"] == "generative" and record["loss_history"][0] > math.log(3)


def test_mean_pooling_where_the_model_says_so(bert, tmp_path):  # noqa: F811
    """A sentence-transformers pooling config makes the head read the masked mean of the last hidden states
    (padding-invariant); without it, the architecture's own [CLS] pooler."""
    import shutil

    from lorafuse.model.formulations import load_model, make_formulation, model_pooling

    assert model_pooling(str(bert)) == "model"
    st = tmp_path / "st"
    shutil.copytree(bert, st)
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert model_pooling(str(st)) == "mean"
    model, tokenizer = load_model(str(st), "classify")
    model.eval()
    classify = make_formulation("classify", tokenizer)
    task = get_task("mnli")
    from lorafuse.tasks import Example

    short, long = Example("the a", "is 1", "entailment"), Example("the a has more than all", "some are 2 3",
                                                                    "neutral")
    batch = classify.collate(classify.encode(task, [short, long]))
    alone = classify.collate(classify.encode(task, [short]))
    assert batch.inputs["attention_mask"][0].sum() < batch.inputs["attention_mask"].shape[1]  # really padded
    with torch.no_grad():
        both = model(**batch.inputs).logits
        hidden = model.bert(**alone.inputs).last_hidden_state[0]  # independent: mean of the unpadded row
        reference = model.classifier(hidden.mean(0))
        assert torch.allclose(both[0], model(**alone.inputs).logits[0], atol=1e-5)
    assert torch.allclose(both[0], reference, atol=1e-5)
    plain, _ = load_model(str(bert), "classify")
    assert type(plain.bert.pooler).__name__ == "BertPooler"


def test_the_head_learns_at_its_own_rate(bert, keyword_task, tmp_path):  # noqa: F811
    import lorafuse.model.training as training
    from lorafuse.model.formulations import load_model, make_formulation
    from lorafuse.model.models import resolve_model, resolve_targets

    cfg = training.resolve_recipe(TrainConfig(task="kw3", model=str(bert), lr=1e-3, head_lr=3e-2, batch_size=4,
                                              target_modules=["query"], progress=False), {})
    assert cfg.warmup == training.DEFAULT_RECIPE["warmup"]
    model, tokenizer = load_model(str(bert), "classify")
    peft_model = training._wrap(model, cfg, "classify", resolve_targets(resolve_model(str(bert)), ["query"]))
    formulation = make_formulation("classify", tokenizer)
    rows = formulation.encode(get_task("kw3"), get_task("kw3").load("train", keyword_task))
    trainer = training._trainer(peft_model, formulation, get_task("kw3"), rows, cfg, tmp_path / "ck")
    groups = trainer.create_optimizer().param_groups
    assert [g["lr"] for g in groups] == [1e-3, 3e-2]
    names = {id(p): n for n, p in peft_model.named_parameters()}
    assert all("lora_" in names[id(p)] for p in groups[0]["params"])
    assert all("classifier" in names[id(p)] for p in groups[1]["params"]) and groups[1]["params"]
    grouped = _padding(trainer)  # length-grouped batches, padded to their own longest row
    shuffled = _padding(training._trainer(peft_model, formulation, get_task("kw3"), rows,
                                          dataclasses.replace(cfg, group_by_length=False), tmp_path / "ck2"))
    assert grouped[1] == shuffled[1] == len(rows) and grouped[0] < shuffled[0] / 2, (grouped, shuffled)


def _padding(trainer) -> tuple[int, int]:
    """Padding tokens and rows over one epoch of the trainer's own dataloader."""
    batches = list(trainer.get_train_dataloader())
    return sum(int((b["attention_mask"] == 0).sum()) for b in batches), sum(len(b["targets"]) for b in batches)
