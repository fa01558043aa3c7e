"""Training one LoRA adapter per task: PEFT on the Hugging Face Trainer (so `accelerate launch` and several GPUs
work unchanged), fp32 on CPU and bf16 on GPU. Writes the PEFT adapter and a training record."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafuse.atomic import atomic_output_dir, check_output
from lorafuse.formulations import load_model, make_formulation
from lorafuse.provenance import stamp
from lorafuse.tasks.registry import Task, get_task

TRAIN_RECORD = "lorafuse_train.json"


@dataclass
class TrainConfig:
    task: str
    model: str = "minilm"
    output: str = "adapters/task"
    formulation: str | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    lr: float = 5e-4
    epochs: float = 2.0
    batch_size: int = 16
    grad_accum: int = 1
    max_examples: int | None = None
    max_eval_examples: int | None = 500
    max_length: int | None = None
    seed: int = 0
    data_dir: str | None = None
    gradient_checkpointing: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    logging_steps: int = 10
    extra: dict[str, Any] = field(default_factory=dict)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def _lora_config(cfg: TrainConfig, formulation: str, default_targets: tuple[str, ...]) -> Any:
    from peft import LoraConfig

    targets = cfg.target_modules or list(default_targets)
    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=targets[0] if len(targets) == 1 and "\\" in targets[0] else targets,
        task_type="SEQ_CLS" if formulation == "classify" else "CAUSAL_LM",
    )


def _trainer(model: Any, formulation: Any, task: Task, rows: list[dict[str, Any]], cfg: TrainConfig,
             ckpt_dir: Path) -> Any:
    from transformers import Trainer, TrainingArguments

    from lorafuse.formulations import Batch

    class FormulationTrainer(Trainer):
        """The formulation's own loss (answer tokens only; masked logits of binary tasks)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs.pop("targets")
            loss = formulation.loss(model, Batch(inputs, targets), task)
            return (loss, None) if return_outputs else loss

    def collate(batch_rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = formulation.collate(batch_rows, with_answer=True) if formulation.name == "chat" \
            else formulation.collate(batch_rows)
        return {**batch.inputs, "targets": batch.targets}

    gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        lr_scheduler_type="linear", warmup_steps=0.06, weight_decay=0.0, logging_steps=max(1, cfg.logging_steps), save_strategy="epoch",
        save_total_limit=1, report_to=[], seed=cfg.seed, data_seed=cfg.seed, bf16=gpu, use_cpu=not gpu,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=not cfg.progress,
        **_checkpointing_arg(TrainingArguments, cfg.gradient_checkpointing),
    )
    trainer = FormulationTrainer(model=model, args=args, train_dataset=_Rows(rows), data_collator=collate)
    if not cfg.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # it prints every log line when progress bars are off
    return trainer


def _checkpointing_arg(arguments: Any, enabled: bool) -> dict[str, bool]:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(arguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def train_adapter(cfg: TrainConfig) -> Path:
    """Train one task's adapter; returns the output directory (PEFT adapter + lorafuse_train.json)."""
    from peft import get_peft_model

    from lorafuse.evaluation import Evaluator
    from lorafuse.models import resolve_model

    out = check_output(cfg.output, cfg.overwrite)
    info = resolve_model(cfg.model)
    formulation_name = cfg.formulation or info.formulation
    task = get_task(cfg.task)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(info.path, formulation_name)
    formulation = make_formulation(formulation_name, tokenizer, cfg.max_length)
    examples = task.load("train", cfg.data_dir, cfg.max_examples)
    rows = formulation.encode(task, examples)
    peft_model = get_peft_model(model, _lora_config(cfg, formulation_name, info.target_modules))
    ckpt = out.parent / f".{out.name}.checkpoints"
    trainer = _trainer(peft_model, formulation, task, rows, cfg, ckpt)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=cfg.resume and any(ckpt.glob("checkpoint-*")) or None)
    train_seconds = time.perf_counter() - start
    peft_model.eval()
    with atomic_output_dir(out, cfg.overwrite) as tmp:
        peft_model.save_pretrained(tmp)
        record = _record(cfg, task, formulation_name, info.path, len(rows), result, train_seconds,
                         trainer.state.log_history)
        (tmp / TRAIN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    val = Evaluator(cfg.model, [task], split="validation", formulation=formulation_name, data_dir=cfg.data_dir,
                    max_examples=cfg.max_eval_examples, max_length=cfg.max_length, progress=False).evaluate(out)
    record["validation_accuracy"] = val.accuracy[task.name]
    (out / TRAIN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    import shutil

    shutil.rmtree(ckpt, ignore_errors=True)
    return out


def _record(cfg: TrainConfig, task: Task, formulation: str, model_path: str, n: int, result: Any,
            seconds: float, log_history: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [round(float(h["loss"]), 5) for h in log_history if "loss" in h]
    return {
        "task": task.name, "labels": list(task.labels), "model": cfg.model, "model_path": model_path,
        "formulation": formulation, "train_examples": n,
        "data_sha256": {"train": task.data_fingerprint("train", cfg.data_dir)},
        "hyperparameters": {k: v for k, v in asdict(cfg).items() if k not in ("output", "overwrite", "progress")},
        "train_loss": float(result.training_loss), "train_steps": int(result.global_step),
        "loss_history": losses,
        "train_seconds": round(seconds, 2), **stamp(),
    }
