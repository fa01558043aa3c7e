"""Training one LoRA adapter per task: PEFT on the Hugging Face Trainer (so `accelerate launch` and several GPUs
work unchanged), fp32 on CPU and bf16 on GPU. Writes the PEFT adapter and a training record.

The recipe (each default measured in `benchmarks/results/recipe_ablation.md`):
- the classify head reads the model's own pooling (mean pooling for sentence-transformers encoders such as
  all-MiniLM-L6-v2, see `formulations.model_pooling`), and the freshly initialised head learns at `head_lr`,
  higher than the LoRA factors' `lr` (a zero-initialised LoRA and a random head at one small rate sit at the
  prior for most of a short budget);
- linear decay after a `warmup` fraction of the steps; learning rates per model (`models.ModelInfo.recipe`);
- batches of similar length (length-grouped sampling) padded to their own longest row;
- validation accuracy every `eval_steps`: the adapter written is the best one seen (`best_step` in the record),
  not the last one (`best_checkpoint=False` keeps the last);
- chat: the verbalizer loss by default (`chat_loss`, see `lorafuse.model.formulations`).
`full_finetune=True` trains every weight instead of a LoRA (the same data, budget and head; the reference a
LoRA is judged against in `benchmarks/single_task.py`) and writes a whole model directory.

Under `accelerate launch --multi_gpu --num_processes N` (torchrun; gloo on a machine without GPUs) each process
takes `batch_size` examples a step, so the global batch is N × batch_size; the first process writes the adapter
and the others wait for it. With dropout off, the adapter equals a one-process run with batch N × batch_size up to
float rounding (tests/test_accelerate.py), for the classify formulation; chat averages its token loss per process,
so there the two agree only when the processes see equally many answer tokens."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorafuse.atomic import atomic_output_dir, check_output
from lorafuse.model.formulations import check_formulation, load_model, make_formulation
from lorafuse.model.train_progress import TrainProgress
from lorafuse.provenance import stamp
from lorafuse.tasks.registry import Task, get_task
from lorafuse.validate import check_apart

TRAIN_RECORD = "lorafuse_train.json"


@dataclass
class TrainConfig:
    """Everything `lorafuse train` takes; `train_adapter(TrainConfig(...))` is the Python entry point.
    `formulation` and `target_modules` default to the model's (see `lorafuse.model.models`); `target_modules` may be
    module names, one regex, or `all` (every linear projection: Llama's 7)."""

    task: str
    model: str = "minilm"
    output: str = "adapters/task"
    formulation: str | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | None = None
    lr: float | None = None  # None: the model's recipe (models.ModelInfo.recipe), else DEFAULT_RECIPE
    head_lr: float | None = None  # the classify head's learning rate; None: the recipe's
    warmup: float | None = None  # fraction of the steps with a linear warmup; None: the recipe's
    # classify head input: None (the model's own), `model` or `mean`; anything but None is for ablations: the
    # Evaluator reads every model with its own pooling
    pooling: str | None = None
    chat_loss: str = "verbalizer"  # or `generative` (see lorafuse.model.formulations)
    eval_steps: int | None = None  # validate every N steps (None: EVALUATIONS times a run); 0: never
    best_checkpoint: bool = True  # write the best adapter by validation accuracy, not the last
    group_by_length: bool = True
    full_finetune: bool = False
    epochs: float = 2.0
    batch_size: int = 16
    grad_accum: int = 1
    max_examples: int | None = None
    max_eval_examples: int | None = 500
    max_length: int | None = None
    seed: int = 0
    data_dir: str | None = None
    gradient_checkpointing: bool = False
    dtype: str = "auto"  # bfloat16: mixed precision, fp32 masters (lorafuse.model.precision); auto: by the hardware
    save_steps: int | None = None  # checkpoint every N steps (default: every epoch), for --resume
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    stage_lines: bool = False  # one line per stage on stderr, with or without the bar (the CLI's)
    logging_steps: int = 10
    extra: dict[str, Any] = field(default_factory=dict)


# Used where neither the config nor the model's recipe gives a value.
DEFAULT_RECIPE: dict[str, float] = {"lr": 1e-3, "head_lr": 1e-2, "warmup": 0.06}
MAX_COUNT = 2**31 - 1  # the largest rank, batch, step or length count training takes (a C int's)
EVALUATIONS = 5  # validations per run when eval_steps is not given (each costs a pass over them)


def resolve_recipe(cfg: TrainConfig, recipe: dict[str, Any]) -> TrainConfig:
    """The config with every recipe field it leaves open (None) taken from the model's recipe, then
    DEFAULT_RECIPE: what the record stores is what was run."""
    filled = {k: recipe.get(k, DEFAULT_RECIPE[k]) for k in DEFAULT_RECIPE if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **filled)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def _is_head(name: str) -> bool:
    """Parameters of the classification head: PEFT's modules_to_save copy, or the bare model's head."""
    return "modules_to_save" in name or name.split(".")[0] in ("classifier", "score")


def _row_length(row: dict[str, Any]) -> int:
    return len(row.get("input_ids") or row.get("prompt", [])) + len(row.get("answer", []))


def _trainer(model: Any, formulation: Any, task: Task, rows: list[dict[str, Any]], cfg: TrainConfig,
             ckpt_dir: Path, callbacks: list[Any] | None = None) -> Any:
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from lorafuse.model.formulations import Batch

    lengths = [_row_length(r) for r in rows]

    class FormulationTrainer(Trainer):
        """The formulation's own loss (verbalizer or answer tokens; masked logits of binary tasks), the head at
        its own learning rate, length-grouped batches."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs.pop("targets")
            loss = formulation.loss(model, Batch(inputs, targets), task)
            return (loss, None) if return_outputs else loss

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                named = [(n, p) for n, p in (model or self.model).named_parameters() if p.requires_grad]
                groups = [{"params": [p for n, p in named if not _is_head(n)], "lr": cfg.lr},
                          {"params": [p for n, p in named if _is_head(n)], "lr": cfg.head_lr}]
                self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                                                   weight_decay=0.0)
            return self.optimizer

        def _get_train_sampler(self, train_dataset=None):
            if not cfg.group_by_length:
                return super()._get_train_sampler(train_dataset)
            # Length-grouped (a shuffled order, sorted within mega-batches): little padding, random batches.
            # Grouped by the global batch, so N processes (which take every N-th batch of this order) see the
            # same examples per step as one process with N times the batch.
            return LengthGroupedSampler(cfg.batch_size * cfg.grad_accum * self.args.world_size, lengths=lengths)

    def collate(batch_rows: list[dict[str, Any]]) -> dict[str, Any]:
        if getattr(formulation, "trains_on_answer", False):
            batch = formulation.collate(batch_rows, with_answer=True)
        else:
            batch = formulation.collate(batch_rows)
        return {**batch.inputs, "targets": batch.targets}

    gpu = torch.cuda.is_available()
    precision = train_precision(cfg)
    args = TrainingArguments(
        output_dir=str(ckpt_dir), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        lr_scheduler_type="linear", warmup_steps=cfg.warmup, weight_decay=0.0,
        logging_steps=max(1, cfg.logging_steps),
        save_strategy="steps" if cfg.save_steps else "epoch", save_steps=cfg.save_steps or 500, save_total_limit=1,
        report_to=[], seed=cfg.seed, data_seed=cfg.seed, bf16=precision.reduced, use_cpu=not gpu,
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=not cfg.progress,
        **_checkpointing_arg(TrainingArguments, cfg.gradient_checkpointing),
    )
    trainer = FormulationTrainer(model=model, args=args, train_dataset=_Rows(rows), data_collator=collate,
                                 callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # both print each log dict ({'loss': ..., 'grad_norm': ...}) as a line; TrainProgress shows the loss in its
    # bar's postfix instead (it is among `callbacks`)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


class BestCheckpoint:
    """Validation accuracy every `every` steps (and at the last); keeps a copy of the trainable weights of the
    best step (LoRA factors and head: a few MB), and `restore` loads them back before the adapter is written.
    A run resumed from a checkpoint starts its search afresh (the best state lives in memory)."""

    def __init__(self, model: Any, formulation: Any, task: Task, batches: list[Any], every: int,
                 keep_best: bool = True, progress: TrainProgress | None = None, names: dict[int, str] | None = None
                 ) -> None:
        self.model, self.formulation, self.task, self.batches = model, formulation, task, batches
        self.every, self.keep_best = every, keep_best
        self.progress = progress or TrainProgress(bar=False)
        self.names = names or {}  # target index → label word, for the gold label counts
        self.history: list[tuple[int, float]] = []
        self.seconds = 0.0  # spent validating (not training)
        self.best_step: int | None = None
        self.best_accuracy = -1.0
        self._best: dict[str, torch.Tensor] = {}

    def accuracy(self) -> float:
        """Validation accuracy of the model as it stands (eval mode for the pass, train mode restored)."""
        was_training = self.model.training
        self.model.eval()
        correct = total = 0
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for batch in self.batches:
                moved = type(batch)({k: v.to(device) if torch.is_tensor(v) else v
                                     for k, v in batch.inputs.items()}, batch.targets.to(device))
                correct += int((self.formulation.predict(self.model, moved, self.task) == moved.targets).sum())
                total += len(batch.targets)
        self.model.train(was_training)
        return correct / max(total, 1)

    def step(self, step: int, max_steps: int) -> None:
        last = step >= max_steps
        if not self.batches or not (last or (self.every and step % self.every == 0)):
            return
        if self.history and self.history[-1][0] == step:
            return
        self.progress.validating(step, max_steps)
        start = time.perf_counter()
        accuracy = self.accuracy()
        self.seconds += time.perf_counter() - start
        self.progress.validated(accuracy)
        self.history.append((step, round(accuracy, 5)))
        if accuracy > self.best_accuracy or not self.keep_best:  # ties keep the earlier step
            self.best_accuracy, self.best_step = accuracy, step
            self._best = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def gold_counts(self) -> dict[str, int]:
        """How often each label is the gold one on the validation examples (its majority share is the bar an
        adapter must clear)."""
        from collections import Counter

        counts = Counter(int(t) for b in self.batches for t in b.targets.tolist())
        return {self.names.get(i, str(i)): n for i, n in sorted(counts.items())}

    def restore(self) -> None:
        if not self._best:
            return
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, value in self._best.items():
                params[n].copy_(value)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        tracker = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                tracker.step(state.global_step, state.max_steps)

        return _Callback()


def _checkpointing_arg(arguments: Any, enabled: bool) -> dict[str, bool]:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(arguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


def train_adapter(cfg: TrainConfig) -> Path:
    """Train one task's adapter; returns the output directory (PEFT adapter + lorafuse_train.json; a whole model
    directory with `full_finetune`). The output is written to a temporary directory and moved into place whole."""
    from lorafuse.model.evaluation import label_names
    from lorafuse.model.models import check_max_length, resolve_model, resolve_targets

    check_train_config(cfg)
    out = check_output(cfg.output, cfg.overwrite, "adapter")
    info = resolve_model(cfg.model)
    check_max_length(info.path, cfg.max_length)
    cfg = resolve_recipe(cfg, dict(info.recipe))
    formulation_name = cfg.formulation or info.formulation
    task = get_task(cfg.task)
    check_apart(out, _inputs(cfg, task), what="output")
    check_formulation(formulation_name, [task])
    _check_validation_split(task, cfg.data_dir)  # a malformed split is an error now, not "n/a" after training
    progress = TrainProgress(lines=cfg.stage_lines, bar=cfg.progress)
    progress.stage(f"loading {cfg.model} and the {task.name} data")
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(info.path, formulation_name, pooling=cfg.pooling)
    formulation = make_formulation(formulation_name, tokenizer, cfg.max_length, cfg.chat_loss)
    rows = formulation.encode(task, task.load("train", cfg.data_dir, cfg.max_examples))
    if cfg.full_finetune:
        trained = model
    else:
        trained = _wrap(model, cfg, formulation_name, resolve_targets(info, cfg.target_modules))
    best = BestCheckpoint(trained, formulation, task, _validation_batches(formulation, task, cfg, formulation_name),
                          _eval_every(cfg, len(rows)), keep_best=cfg.best_checkpoint, progress=progress,
                          names=label_names(formulation_name, task))
    ckpt = out.parent / f".{out.name}.checkpoints"
    _remove_stale_temporaries(out)
    trainer = _trainer(trained, formulation, task, rows, cfg, ckpt, [best.callback(), progress.callback()])
    start = time.perf_counter()
    with _full_disk_named(ckpt):
        result = trainer.train(resume_from_checkpoint=_last_checkpoint(ckpt) if cfg.resume else None)
    train_seconds = time.perf_counter() - start - best.seconds  # validation timed apart
    if not trainer.is_world_process_zero():  # under `accelerate launch`, one process writes
        trainer.accelerator.wait_for_everyone()  # and the others return once the adapter is in place
        return out
    best.restore()
    trained.eval()
    progress.stage(f"writing {out}")
    with atomic_output_dir(out, cfg.overwrite, kind="adapter") as tmp, _full_disk_named(tmp):
        trained.save_pretrained(tmp)
        _portable_base_name(tmp, info.recorded_name)
        if cfg.full_finetune:
            tokenizer.save_pretrained(tmp)
            _copy_pooling_config(info.path, tmp, cfg.pooling)
        record = _record(cfg, task, formulation_name, info, len(rows), result, train_seconds,
                         trainer.state.log_history)
        record.update(_validation_record(best))
        (tmp / TRAIN_RECORD).write_text(json.dumps(record, indent=2) + "\n")  # names the task for its head
        if not best.history and not cfg.full_finetune:
            progress.stage("validating the written adapter")
            record.update(_validate(cfg, task, formulation_name, tmp))
            (tmp / TRAIN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if not cfg.full_finetune:
            _write_card(tmp, record)
    shutil.rmtree(ckpt, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return out


DISK_FULL_WORDS = ("No space left on device", "StorageFull", "os error 28", "file write failed", "Disk quota")


@contextlib.contextmanager
def _full_disk_named(where: Path) -> Iterator[None]:
    """A full disk while the Trainer writes a checkpoint (or PEFT the adapter) comes as torch.save's
    RuntimeError ("file write failed") or safetensors' SafetensorError ("StorageFull"), not an OSError:
    made one, ENOSPC naming the file or checkpoint, for the CLI's one-line error; a checkpoint cut short is
    removed (the complete ones stay, for --resume)."""
    try:
        yield
    except Exception as exc:
        if not _disk_full(exc):
            raise
        path = _remove_partial_checkpoints(where) or Path(getattr(exc, "filename", None) or where)
        raise OSError(errno.ENOSPC, "No space left on device; what it was writing is removed: free space, then "
                      "rerun (with --resume to continue from the last complete checkpoint)", str(path)) from None


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return not isinstance(exc, OSError) and any(w in str(exc) for w in DISK_FULL_WORDS)


def _remove_partial_checkpoints(ckpt: Path) -> Path | None:
    """Remove the checkpoints a failed save left incomplete (see checkpoint_problem); the newest such one."""
    partial = [p for p in sorted(ckpt.glob("checkpoint-*")) if p.is_dir() and checkpoint_problem(p) is not None]
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return partial[-1] if partial else None


def _eval_every(cfg: TrainConfig, n_rows: int) -> int:
    """Steps between validations: the config's, else EVALUATIONS evenly spaced over the run."""
    if cfg.eval_steps is not None:
        return cfg.eval_steps
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # `accelerate launch`: the global batch counts
    steps = math.ceil(math.ceil(n_rows / (cfg.batch_size * processes)) / cfg.grad_accum * cfg.epochs)
    return max(1, math.ceil(steps / EVALUATIONS))


def _validation_batches(formulation: Any, task: Task, cfg: TrainConfig, formulation_name: str) -> list[Any]:
    """The validation split tokenized once, in length-sorted batches ([] without a split, or eval_steps=0)."""
    from lorafuse.errors import LorafuseError

    if cfg.eval_steps == 0 or cfg.max_eval_examples == 0:
        return []
    try:
        examples = task.load("validation", cfg.data_dir, cfg.max_eval_examples)
    except LorafuseError:
        return []
    rows = sorted(formulation.encode(task, examples), key=_row_length)
    size = 64 if formulation_name == "classify" else 16
    return [formulation.collate(rows[i:i + size]) for i in range(0, len(rows), size)]


def _validation_record(best: BestCheckpoint) -> dict[str, Any]:
    if not best.history:
        return {}
    return {"validation_accuracy": best.best_accuracy, "validation_examples": sum(len(b.targets) for b in best.batches),
            "validation_labels": best.gold_counts(), "best_step": best.best_step, "validation_history": best.history,
            "validation_seconds": round(best.seconds, 2),
            "checkpoint_rule": "best validation accuracy" if best.keep_best else "last"}


def _copy_pooling_config(model_path: str, out: Path, pooling: str | None) -> None:
    """A fully fine-tuned sentence-transformers model keeps its pooling config (so it is read the same way)."""
    source = Path(model_path) / "1_Pooling"
    if pooling in (None, "mean") and source.is_dir():
        shutil.copytree(source, out / "1_Pooling")


def _wrap(model: Any, cfg: TrainConfig, formulation: str, targets: list[str] | str) -> Any:
    """The PEFT LoRA model; classify's head trains too and is saved beside the adapter (modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        task_type="SEQ_CLS" if formulation == "classify" else "CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if cfg.gradient_checkpointing:
        peft_model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still get gradients
    return peft_model


def _last_checkpoint(ckpt: Path) -> str | None:
    """The newest complete `checkpoint-N` of an interrupted run, or None to start afresh. A checkpoint is
    complete when its trainer_state.json (the Trainer writes it last) parses and names its step, and its adapter
    weights are there; a broken one (a kill or a full disk during the save) is removed, saying so, and the
    previous complete one is used."""
    steps = [(int(p.name.rsplit("-", 1)[1]), p) for p in ckpt.glob("checkpoint-*")
             if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    for _, path in sorted(steps, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        print(f"warning: skipping the broken checkpoint {path} ({problem}); it is removed", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
    if steps:
        print(f"warning: no complete checkpoint in {ckpt}: training starts afresh", file=sys.stderr)
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from, or None when it can."""
    state_file = path / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"trainer_state.json unreadable: {type(exc).__name__}"
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        return "trainer_state.json has no global_step"
    if not any((path / name).is_file() and (path / name).stat().st_size > 0
               for name in ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors")):
        return "no adapter weights"
    return None


def check_train_config(cfg: TrainConfig) -> None:
    """One-line errors for values the Trainer would reject with a traceback (or accept silently); the checks
    are lorafuse.validate's, as for every other input."""
    from lorafuse.errors import ConfigError
    from lorafuse.validate import finite_number, strict_int

    for name in ("rank", "batch_size", "grad_accum", "max_examples", "max_eval_examples", "save_steps",
                 "logging_steps", "max_length"):
        value = getattr(cfg, name)
        if value is not None:  # past MAX_COUNT a count is a typo, and the model would fail to allocate it
            strict_int(value, name, minimum=8 if name == "max_length" else 1, maximum=MAX_COUNT)
    for name in ("lr", "head_lr", "epochs", "alpha"):
        value = getattr(cfg, name)
        if value is not None or name not in ("lr", "head_lr"):  # None: the model's recipe
            if finite_number(value, name) <= 0:
                raise ConfigError(f"{name}: must be > 0 (got {value!r})")
    for name in ("warmup", "dropout"):
        value = getattr(cfg, name)
        if value is not None or name != "warmup":
            if not 0.0 <= finite_number(value, name) < 1.0:
                raise ConfigError(f"{name}: must be in [0, 1) (got {value!r})")
    from lorafuse.model.precision import check_dtype

    check_dtype(cfg.dtype)


def _inputs(cfg: TrainConfig, task: Task) -> list[tuple[str, Path]]:
    """What training reads from the local disk: the output may neither hold it nor lie inside it."""
    found = [("model", Path(cfg.model))] if Path(cfg.model).exists() else []
    if cfg.data_dir:
        found.append(("data directory", Path(cfg.data_dir)))
    return found + [(f"task '{task.name}' {split} file", Path(p)) for split, p in sorted(task.files.items())]


def _remove_stale_temporaries(out: Path) -> None:
    """What a kill during the final write left beside the output (atomic's one leftover rule: the writer is
    dead, or the temporary has been idle for an hour); the checkpoints directory is kept for --resume."""
    from lorafuse.atomic import clean_leftovers

    for path in clean_leftovers(out):
        print(f"removed {path}, left by an interrupted run", file=sys.stderr)


def _check_validation_split(task: Task, data_dir: str | None) -> None:
    """Read a local validation split before training: absent is fine (no validation accuracy), but an empty or
    malformed file is an error naming the file and line (it used to end as "no validation split" after
    training). Hub splits are left to the evaluation, as before."""
    from lorafuse.tasks.registry import MissingSplitError

    if task.loader is None and ("validation" in task.files or data_dir is not None):
        try:
            task.load("validation", data_dir)
        except MissingSplitError:
            pass


def _validate(cfg: TrainConfig, task: Task, formulation: str, adapter_dir: Path) -> dict[str, Any]:
    """Validation accuracy of the freshly written adapter (None when the task has no validation split)."""
    from lorafuse.errors import ConfigError
    from lorafuse.model.evaluation import Evaluator
    from lorafuse.tasks.registry import DataError

    try:  # a local split was read before training (_check_validation_split): what fails here is its absence
        ev = Evaluator(cfg.model, [task], split="validation", formulation=formulation, data_dir=cfg.data_dir,
                       max_examples=cfg.max_eval_examples, max_length=cfg.max_length, progress=False,
                       dtype=cfg.dtype)
    except (DataError, ConfigError):
        return {"validation_accuracy": None, "validation_examples": 0}
    result = ev.evaluate(adapter_dir)
    return {"validation_accuracy": result.accuracy[task.name], "validation_examples": result.examples[task.name],
            "validation_labels": result.labels.get(task.name, {})}


def _pooling_of(model_path: str) -> str:
    from lorafuse.model.formulations import model_pooling

    return model_pooling(model_path)


def _fingerprints(task: Task, data_dir: str | None) -> dict[str, str]:
    """sha256 of the train and validation data (validation only where the task has one)."""
    from lorafuse.errors import LorafuseError

    out = {"train": task.data_fingerprint("train", data_dir)}
    try:
        out["validation"] = task.data_fingerprint("validation", data_dir)
    except LorafuseError:
        pass
    return out


def train_precision(cfg: TrainConfig) -> Any:
    """The dtype training computes in (mixed precision when bf16) on the device the Trainer picks."""
    from lorafuse.model.precision import training_precision

    return training_precision(cfg.dtype)


def _write_card(directory: Path, record: dict[str, Any]) -> None:
    """A real model card in place of PEFT's template (~40 "[More Information Needed]")."""
    from lorafuse.adapters.cards import train_card

    config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    (directory / "README.md").write_text(train_card(record, config), encoding="utf-8")


def _portable_base_name(directory: Path, name: str) -> None:
    """PEFT records the base model as it was loaded (this machine's absolute path): record `name` instead (an
    embedded model's Hub id, a user's path as given or its final name), in adapter_config.json and, for a full
    fine-tune, config.json's `_name_or_path`."""
    for file, key in (("adapter_config.json", "base_model_name_or_path"), ("config.json", "_name_or_path")):
        path = directory / file
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            if key in config:
                config[key] = name
                path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _portable_hyperparameters(cfg: TrainConfig) -> dict[str, Any]:
    """The config as run, with the paths in it recorded portably (see `models.portable_name`)."""
    from lorafuse.model.models import portable_name

    params = {k: v for k, v in asdict(cfg).items() if k not in ("output", "overwrite", "progress", "stage_lines")}
    for key in ("model", "data_dir"):
        if params.get(key):
            params[key] = portable_name(params[key])
    return params


def _record(cfg: TrainConfig, task: Task, formulation: str, info: Any, n: int, result: Any,
            seconds: float, log_history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the adapter was trained on and how (the experiment runner and `load_task_head` read `task`). Paths
    are recorded portably: `model_path` is the Hub id of an embedded model, else the model as given (a relative
    path) or its final name, never this machine's directories."""
    from lorafuse.model.models import portable_name

    losses = [round(float(h["loss"]), 5) for h in log_history if "loss" in h]
    return {
        "task": task.name, "labels": list(task.labels), "model": portable_name(cfg.model),
        "model_path": info.recorded_name,
        "formulation": formulation, "train_examples": n,
        "data_sha256": _fingerprints(task, cfg.data_dir),
        "hyperparameters": _portable_hyperparameters(cfg),
        "train_loss": float(result.training_loss), "train_steps": int(result.global_step),
        "loss_history": losses, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "precision": train_precision(cfg).to_dict(),
        "train_seconds": round(seconds, 2),
        "train_examples_per_second": round(n * cfg.epochs / seconds, 2)
        if seconds > 0 else None,
        "pooling": cfg.pooling or (_pooling_of(info.path) if formulation == "classify" else None), **stamp(),
    }
