"""Model cards (README.md) for what lorafuse writes: a trained adapter's and the classify loading snippet a fused
adapter's card shares. The snippets are plain transformers + PEFT (no lorafuse import) and compute exactly the
model `lorafuse eval` evaluates: the 3-slot shared head, the task's label mask and, for sentence-transformers
encoders, mean pooling in place of BERT's [CLS] pooler (tests execute them as written)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

SLOTS = {"contradiction": 0, "entailment": 1, "neutral": 2, "not_entailment": 2}  # formulations.SLOT (no torch)
SHARED_SLOTS = 3
DEFAULT_MAX_LENGTH = 128  # formulations.Classify's


def slot_labels(labels: Sequence[str] | None) -> dict[int, str]:
    """A task's labels by their slot of the shared head; unknown labels (an adapter trained elsewhere): every
    slot, named as transformers names them."""
    if labels and all(lab in SLOTS for lab in labels):
        return {SLOTS[lab]: lab for lab in labels}
    return {i: f"LABEL_{i}" for i in range(SHARED_SLOTS)}


MEAN_POOLING = '''
# A sentence-transformers encoder is read as it was trained (its 1_Pooling/config.json): the mean of the last
# hidden states over the attention mask, in place of BERT's [CLS] pooler, which lorafuse never uses for it.
class MeanPooler(torch.nn.Module):
    mask = None

    def forward(self, hidden):
        mask = hidden.new_ones(hidden.shape[:2]) if self.mask is None else self.mask.to(hidden.dtype)
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)


backbone = (model.get_base_model() if hasattr(model, "get_base_model") else model).base_model  # the BertModel
pooler = backbone.pooler = MeanPooler()
backbone.register_forward_pre_hook(  # the pooler sees the hidden states only: hand it the attention mask
    lambda module, args, kwargs: setattr(pooler, "mask", kwargs.get("attention_mask", args[1] if len(args) > 1
                                                                    else None)), with_kwargs=True)
'''

PREDICT = '''

def predict(premises, hypotheses):
    """Each pair's label, as `lorafuse eval` predicts it: the slots the task does not use are masked."""
    enc = tokenizer(premises, hypotheses, truncation=True, max_length={max_length}, padding=True,
                    return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits.float()
    logits[:, [s for s in range(logits.shape[-1]) if s not in LABELS[task]]] = float("-inf")
    return [LABELS[task][s] for s in logits.argmax(-1).tolist()]
'''


def classify_snippet(base: str, labels: Mapping[str, Mapping[int, str]], task: str, pooling: str | None,
                     heads_dir: str | None = None, max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """The card's Python block: load the base with the shared 3-slot head, apply the adapter (and, for a fused
    adapter, `heads_dir/<task>.safetensors`), install mean pooling where lorafuse reads the model with it, and
    `predict(premises, hypotheses)` with the task's label mask."""
    table = "{\n" + "".join(f"    {name!r}: {dict(sorted(slots.items()))!r},\n" for name, slots in labels.items()) + "}"
    head = (f'\nhead = load_file(f"{{adapter}}/{heads_dir}/{{task}}.safetensors")  # this task\'s own head\n'
            "missing, unexpected = model.load_state_dict(head, strict=False)\n"
            "assert not unexpected and not set(head) & set(missing)\n") if heads_dir else ""
    imports = "from safetensors.torch import load_file\n" if heads_dir else ""
    return f"""```python
import torch
from peft import PeftModel
{imports}from transformers import AutoModelForSequenceClassification, AutoTokenizer

adapter = "."  # a local copy of this directory
base_id = {base!r}  # the base model: its Hub id, or a local copy of it
task = {task!r}{"  # or any task listed above" if len(labels) > 1 else ""}
LABELS = {table}  # each task's labels by slot of the shared 3-way head (a binary task uses two)
tokenizer = AutoTokenizer.from_pretrained(base_id)
base = AutoModelForSequenceClassification.from_pretrained(base_id, num_labels={SHARED_SLOTS})
model = PeftModel.from_pretrained(base, adapter).merge_and_unload()  # a plain transformers model with the update
{head}model.eval()
{MEAN_POOLING if pooling == "mean" else ""}{PREDICT.format(max_length=max_length)}```
"""


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "n/a"


def _accuracy_line(record: Mapping[str, Any]) -> str:
    from lorafuse.stats import wilson_interval

    accuracy, n = record.get("validation_accuracy"), record.get("validation_examples") or 0
    if not isinstance(accuracy, (int, float)) or not n:
        return "- validation accuracy: not measured (the task has no validation split)"
    low, high = wilson_interval(accuracy * n, int(n))
    step = f", best of {len(record.get('validation_history') or [])} validations (step {record.get('best_step')})" \
        if record.get("best_step") is not None else ""
    return (f"- validation accuracy: {_percent(accuracy)} on {n} examples (95% Wilson interval "
            f"{_percent(low)}–{_percent(high)}){step}")


def train_card(record: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    """A trained adapter's README.md: task, data (sha256), recipe, validation accuracy and how to load it."""
    params = record.get("hyperparameters") or {}
    base = str(config.get("base_model_name_or_path") or record.get("model_path") or "")
    data = "\n".join(f"- {split}: `{digest}`" for split, digest in (record.get("data_sha256") or {}).items())
    recipe = {k: params.get(k) for k in ("rank", "alpha", "dropout", "lr", "head_lr", "warmup", "epochs",
                                         "batch_size", "grad_accum", "max_examples", "max_length", "seed",
                                         "chat_loss", "pooling")}
    formulation = record.get("formulation")
    task = str(record.get("task"))
    return f"""---
library_name: peft
base_model: {base}
tags: [lora, lorafuse, {formulation}]
---
# LoRA adapter for `{task}` ({formulation})

Trained by lorafuse on {base}: task `{task}`, labels {list(record.get("labels") or [])}, formulation
`{formulation}`{", pooling `" + str(record.get("pooling")) + "`" if record.get("pooling") else ""}.

## Data

{record.get("train_examples")} training examples; sha256 of the data files:
{data}

## Recipe

`{json.dumps(recipe)}`; target modules `{json.dumps(config.get("target_modules"))}`; {record.get("train_steps")}
steps, final training loss {record.get("train_loss")}. Everything else: `lorafuse_train.json`.

## Accuracy

{_accuracy_line(record)}
- test accuracy: not measured at training; `lorafuse eval --model {base} --adapter . --tasks {task}` measures it

## Loading

{_loading(record, config, base)}"""


def _loading(record: Mapping[str, Any], config: Mapping[str, Any], base: str) -> str:
    task = str(record.get("task"))
    if record.get("formulation") == "classify":
        pooling = record.get("pooling")
        length = (record.get("hyperparameters") or {}).get("max_length") or DEFAULT_MAX_LENGTH
        return (f"With transformers and PEFT alone (the same predictions as `lorafuse eval`):\n\n"
                f"{classify_snippet(base, {task: slot_labels(record.get('labels'))}, task, pooling, None, length)}\n"
                "`AutoPeftModelForSequenceClassification.from_pretrained(\".\", num_labels=3)` loads the same model "
                "(`num_labels=3`: the head has the shared space's 3 slots"
                + ("; then install the mean pooling above" if pooling == "mean" else "")
                + " and mask the unused slots as `predict` does).\n")
    return ("```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained(\".\")  # base: {base}\n"
            f"tokenizer = AutoTokenizer.from_pretrained({base!r})\n```\n\n"
            "lorafuse prompts with the chat template (premise, hypothesis, then `What is the relation of the "
            f"hypothesis to the premise? Answer with one word: {', '.join(record.get('labels') or [])}.`) and "
            "picks the label word whose first distinguishing token is most likely.\n")
