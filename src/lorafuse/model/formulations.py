"""How a task becomes model inputs, a loss and a prediction.

- `classify` (KnOTS's): sequence classification in one shared 3-way label space (contradiction, entailment,
  neutral; a binary task's `not_entailment` takes the neutral slot). Each task has its own head; a binary task
  masks the logit it does not use, in training and prediction alike.
- `chat` (the seed's): the model's chat template with premise, hypothesis and the label words; the loss covers
  only the answer tokens; prediction compares the label words' log-likelihoods at their first distinguishing
  token — all labels from one forward pass, no generation and no pass per label. Label words that tokenize to
  several tokens are fine: the tokens every label shares at the start (e.g. `not` of `not entailment` / `not
  neutral`) are appended to the prompt, and the next token, which differs between labels, is scored. Labels
  whose distinguishing tokens coincide (one label a token-prefix of another, or two of three labels sharing a
  first token) are refused with a message. Models without a chat template get a plain prompt. A pair longer
  than `max_length` loses the end of its premise; the template, the hypothesis and the question stay whole.
  The vocabulary projection runs only at the positions scored (49k-vocabulary logits dominate memory).
  Training loss (`chat_loss`): `verbalizer` (default) is the cross-entropy over the label words'
  distinguishing tokens at the answer position — exactly the decision `predict` makes; `generative` is the
  language-model loss averaged over every answer token (most of which a label word's start already decides).

The classify head reads the model's own pooling: a sentence-transformers model (a `1_Pooling/config.json` beside
its weights, e.g. all-MiniLM-L6-v2) gets the pooling it was trained with (mean over the attention mask) instead of
BERT's [CLS] pooler, which its contrastive training never used (`benchmarks/results/recipe_ablation.md`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from lorafuse.errors import ConfigError
from lorafuse.tasks.registry import Example, Task

SHARED_LABELS = ("contradiction", "entailment", "neutral")
SLOT = {"contradiction": 0, "entailment": 1, "neutral": 2, "not_entailment": 2}
FORMULATIONS = ("classify", "chat")
CHAT_LOSSES = ("verbalizer", "generative")


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor  # classify: shared slot; chat: index into the task's labels


def on_model_device(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """`inputs` with every tensor on the device of the model's weights: batches are collated on the host, and
    the Evaluator, LoraHub and the router run the model wherever it was placed (a no-op on one device)."""
    device = next(model.parameters()).device
    return {k: v.to(device) if torch.is_tensor(v) and v.device != device else v for k, v in inputs.items()}


def label_slots(task: Task) -> list[int]:
    """The shared-space slots of a task's labels; refuses tasks the 3-way space cannot express."""
    missing = [lab for lab in task.labels if lab not in SLOT]
    slots = [SLOT[lab] for lab in task.labels if lab in SLOT]
    if missing or len(set(slots)) != len(slots):
        raise ConfigError(f"task '{task.name}': labels {list(task.labels)} cannot be expressed in the classify "
                          f"formulation's shared space {SHARED_LABELS} (+ not_entailment as neutral); use chat")
    return slots


def logit_mask(task: Task) -> torch.Tensor:
    mask = torch.full((len(SHARED_LABELS),), float("-inf"))
    mask[label_slots(task)] = 0.0
    return mask


class Classify:
    name = "classify"

    def __init__(self, tokenizer: Any, max_length: int = 128) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def encode(self, task: Task, examples: Sequence[Example]) -> list[dict[str, Any]]:
        label_slots(task)
        enc = self.tokenizer([e.premise for e in examples], [e.hypothesis for e in examples], truncation=True,
                             max_length=self.max_length)
        return [{**{k: v[i] for k, v in enc.items()}, "target": SLOT[e.label]} for i, e in enumerate(examples)]

    def collate(self, rows: list[dict[str, Any]]) -> Batch:
        """Right-padded to the longest row of the batch (dynamic padding), in one tensor per field: the
        tokenizer's own `pad` walks every row in Python and shows in a training profile."""
        width = max(len(r["input_ids"]) for r in rows)
        pad = {"input_ids": self.tokenizer.pad_token_id or 0}
        inputs = {key: torch.tensor([r[key] + [pad.get(key, 0)] * (width - len(r[key])) for r in rows])
                  for key in rows[0] if key not in ("target", "attention_mask")}
        # The mask from the lengths: some tokenizers return none (their own `pad` would add it).
        inputs["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                                 for r in rows])
        return Batch(inputs, torch.tensor([r["target"] for r in rows]))

    def logits(self, model: Any, batch: Batch, task: Task) -> torch.Tensor:
        logits = model(**on_model_device(model, batch.inputs)).logits.float()
        return logits + logit_mask(task).to(logits.device)

    def loss(self, model: Any, batch: Batch, task: Task) -> torch.Tensor:
        logits = self.logits(model, batch, task)
        return torch.nn.functional.cross_entropy(logits, batch.targets.to(logits.device))

    def predict(self, model: Any, batch: Batch, task: Task) -> torch.Tensor:
        """Predicted shared slots (compare with batch.targets)."""
        return self.logits(model, batch, task).argmax(-1)


class Chat:
    name = "chat"

    def __init__(self, tokenizer: Any, max_length: int = 256, loss: str = "verbalizer") -> None:
        if loss not in CHAT_LOSSES:
            raise ConfigError(f"unknown chat loss '{loss}' (valid: {', '.join(CHAT_LOSSES)})")
        self.tokenizer, self.max_length, self.loss_kind = tokenizer, max_length, loss
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    def prompt(self, task: Task, ex: Example) -> str:
        question = (f"Premise: {ex.premise}\nHypothesis: {ex.hypothesis}\n"
                    f"What is the relation of the hypothesis to the premise? Answer with one word: "
                    f"{', '.join(task.labels)}.")
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"{question}\nAnswer:"

    def answer_ids(self, task: Task) -> list[list[int]]:
        """Each label word's tokens (after a space without a chat template: `Answer: entailment`)."""
        space = "" if getattr(self.tokenizer, "chat_template", None) else " "
        return [self.tokenizer(space + lab, add_special_tokens=False)["input_ids"] for lab in task.labels]

    def scoring(self, task: Task) -> tuple[list[int], list[int]]:
        """(the tokens all labels share at the start, each label's next token): one pass scores every label."""
        ids = self.answer_ids(task)
        n = 0
        while all(len(i) > n for i in ids) and len({i[n] for i in ids}) == 1:
            n += 1
        scored = [i[n] if len(i) > n else None for i in ids]
        if None in scored or len(set(scored)) != len(scored):
            raise ConfigError(f"task '{task.name}': label words {list(task.labels)} cannot be told apart by one "
                              "token after their common start in this tokenizer (one is a prefix of another, or "
                              "two share a first token); rename the labels in a task file")
        return ids[0][:n], scored  # type: ignore[return-value]

    def encode(self, task: Task, examples: Sequence[Example]) -> list[dict[str, Any]]:
        answers = self.answer_ids(task)
        prefix, _ = self.scoring(task)
        rows = []
        for e in examples:
            target = task.labels.index(e.label)
            prompt = self.fitted_prompt(task, e, self.max_length - len(answers[target]))
            rows.append({"prompt": prompt, "prefix": prefix, "answer": answers[target], "target": target})
        return rows

    def _prompt_ids(self, task: Task, ex: Example) -> list[int]:
        # add_special_tokens=False: the chat template already holds BOS where the model wants one.
        return self.tokenizer(self.prompt(task, ex), add_special_tokens=False)["input_ids"]

    def fitted_prompt(self, task: Task, ex: Example, room: int) -> list[int]:
        """The prompt's tokens, at most `room` of them. A long pair loses the end of its premise (as a tokenizer's
        `only_first` truncation does): the template, the hypothesis and the question stay whole. Cutting the
        prompt's start instead dropped the system turn and the premise's first words (22% of RTE's training
        pairs exceed 160 tokens with SmolLM2's template)."""
        _, ids = self.fitted_example(task, ex, room)
        return ids[-room:]  # a hypothesis too long on its own: its start goes too

    def fitted_example(self, task: Task, ex: Example, room: int) -> tuple[Example, list[int]]:
        """The example as `fitted_prompt` prompts it (its premise cut to fit `room` tokens, or whole) and that
        prompt's tokens; more than `room` of them only when a hypothesis is too long on its own."""
        ids = self._prompt_ids(task, ex)
        if len(ids) <= room:
            return ex, ids
        premise = self.tokenizer(ex.premise, add_special_tokens=False)["input_ids"]
        keep = len(premise) - (len(ids) - room)
        while len(ids) > room and keep > 0:
            # a cut premise re-tokenizes in context to a token or two more or less: cut, measure, cut again
            ex = replace(ex, premise=self.tokenizer.decode(premise[:keep]).rstrip())
            ids = self._prompt_ids(task, ex)
            keep -= max(1, len(ids) - room)
        return ex, ids

    def collate(self, rows: list[dict[str, Any]], with_answer: bool = False) -> Batch:
        """Left-padded so the scored position is the last of every row: prompt + the labels' shared start for
        prediction, prompt + the whole answer for training."""
        seqs = [r["prompt"] + (r["answer"] if with_answer else r.get("prefix", [])) for r in rows]
        width = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        targets = torch.tensor([r["target"] for r in rows])
        batch = Batch({"input_ids": ids, "attention_mask": mask}, targets)
        if with_answer:
            batch.inputs["answer_lengths"] = torch.tensor([len(r["answer"]) for r in rows])
            batch.inputs["answers"] = [r["answer"] for r in rows]  # type: ignore[assignment]
        return batch

    def last_logits(self, model: Any, batch: Batch, keep: int) -> torch.Tensor:
        """Vocabulary logits of the last `keep` positions only (the model's own forward with `logits_to_keep`,
        so PEFT, DDP and FSDP wrappers all see a normal call)."""
        inputs = on_model_device(model, {k: v for k, v in batch.inputs.items()
                                         if k in ("input_ids", "attention_mask")})
        positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding
        return model(**inputs, position_ids=positions, logits_to_keep=keep).logits[:, -keep:].float()

    @property
    def trains_on_answer(self) -> bool:
        """Whether training batches hold the whole answer (generative) or stop at the scored position."""
        return self.loss_kind == "generative"

    def loss(self, model: Any, batch: Batch, task: Task) -> torch.Tensor:
        """The training loss of `self.loss_kind` (batches collated with `with_answer=self.trains_on_answer`)."""
        if self.loss_kind == "verbalizer":
            return self.verbalizer_loss(model, batch, task)
        return self.generative_loss(model, batch, task)

    def verbalizer_loss(self, model: Any, batch: Batch, task: Task) -> torch.Tensor:
        """Cross-entropy over the labels' distinguishing tokens at the scored position (a softmax over those K
        tokens only): the loss of the K-way decision `predict` makes, uniform guess = ln K."""
        _, scored = self.scoring(task)
        logits = self.last_logits(model, batch, 1)[:, -1]
        return torch.nn.functional.cross_entropy(logits[:, torch.tensor(scored, device=logits.device)],
                                                 batch.targets.to(logits.device))

    def generative_loss(self, model: Any, batch: Batch, task: Task) -> torch.Tensor:
        """Cross-entropy on the answer tokens only; the vocabulary projection runs on those positions alone."""
        answers = batch.inputs["answers"]
        keep = max(map(len, answers)) + 1
        logits = self.last_logits(model, batch, keep)
        rows, cols, labels = [], [], []
        for i, answer in enumerate(answers):
            for j, token in enumerate(answer):
                rows.append(i)
                cols.append(keep - len(answer) - 1 + j)  # the position that predicts answer token j
                labels.append(token)
        picked = logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)]
        return torch.nn.functional.cross_entropy(picked, torch.tensor(labels, device=logits.device))

    def scores(self, model: Any, batch: Batch, task: Task) -> torch.Tensor:
        """Each label's log-likelihood of its distinguishing token at the last position (batch × labels)."""
        _, scored = self.scoring(task)
        logprobs = torch.log_softmax(self.last_logits(model, batch, 1)[:, -1], dim=-1)
        return logprobs[:, torch.tensor(scored, device=logprobs.device)]

    def predict(self, model: Any, batch: Batch, task: Task) -> torch.Tensor:
        """Index of the label whose distinguishing token is most likely."""
        return self.scores(model, batch, task).argmax(-1)


def check_formulation(name: str, tasks: Sequence[Task]) -> None:
    """Refuse an unknown formulation, or tasks it cannot express, before any model is loaded."""
    if name not in FORMULATIONS:
        raise ConfigError(f"unknown formulation '{name}' (valid: {', '.join(FORMULATIONS)})")
    if name == "classify":
        for task in tasks:
            label_slots(task)


def make_formulation(name: str, tokenizer: Any, max_length: int | None = None,
                     chat_loss: str = "verbalizer") -> Classify | Chat:
    """The formulation object that encodes, scores and predicts for a tokenizer."""
    if name == "classify":
        return Classify(tokenizer, max_length or 128)
    if name == "chat":
        return Chat(tokenizer, max_length or 256, chat_loss)
    raise ConfigError(f"unknown formulation '{name}' (valid: {', '.join(FORMULATIONS)})")


def load_model(path: str, formulation: str, dtype: torch.dtype | None = None,
               pooling: str | None = None) -> tuple[Any, Any]:
    """The model class each formulation needs, and its tokenizer. A classify model's head reads `pooling`
    (`mean` or `model`: its own pooler), by default the model's own (`model_pooling`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    tokenizer = AutoTokenizer.from_pretrained(path)
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # the fresh classifier head is expected: each task's adapter brings its own
    logging.disable_progress_bar()  # a bar per load is noise when the Evaluator and trainer load several times
    try:
        if formulation == "classify":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(SHARED_LABELS),
                                                                       dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()
    if formulation == "classify" and (pooling or model_pooling(path)) == "mean":
        install_mean_pooling(model)
    return model, tokenizer


POOLINGS = ("model", "mean")


def model_pooling(path: str) -> str:
    """The pooling a model was trained to be read with: `mean` for a sentence-transformers model whose
    `1_Pooling/config.json` says mean tokens, `model` (the architecture's own pooler, BERT's [CLS]) otherwise."""
    import json
    from pathlib import Path

    config = Path(path) / "1_Pooling" / "config.json"
    try:
        mean = config.is_file() and bool(json.loads(config.read_text()).get("pooling_mode_mean_tokens"))
    except (OSError, ValueError):
        mean = False
    return "mean" if mean else "model"


class MeanPooler(torch.nn.Module):
    """Masked mean of the last hidden states, in place of BERT's [CLS] pooler (sentence-transformers' `Pooling`
    with `pooling_mode_mean_tokens`; no normalization: the head is linear and learns its own scale). The
    backbone's pooler is called with the hidden states only, so a forward pre-hook on the backbone hands the
    attention mask over."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.mask if self.mask is not None else torch.ones(hidden.shape[:2], device=hidden.device)
        mask = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def install_mean_pooling(model: Any) -> None:
    """Replace the backbone's pooler (`model.<backbone>.pooler`) by a `MeanPooler`; refuses architectures
    without one (their classification heads pool by themselves)."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if backbone is None or not hasattr(backbone, "pooler"):
        raise ConfigError(f"mean pooling needs a backbone with a `pooler` (BERT-like); "
                          f"{type(model).__name__} has none: use pooling 'model'")
    pooler = MeanPooler()
    backbone.pooler = pooler

    def keep_mask(module: Any, args: tuple, kwargs: dict) -> None:
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    backbone.register_forward_pre_hook(keep_mask, with_kwargs=True)
