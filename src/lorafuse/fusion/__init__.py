"""Data-driven fusion: LoraHub (few-shot, gradient-free weights per adapter) and an input-routed mixture."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def loss_batches(formulation: Any, task: Any, examples: Sequence[Any], batch_size: int | None = None) -> list[Any]:
    """Examples tokenized once into batches the formulation's `loss` accepts (chat's generative loss: with the
    answer tokens; its verbalizer loss: up to the scored position, as for prediction)."""
    rows = formulation.encode(task, examples)
    size = batch_size or max(len(rows), 1)
    extra = {"with_answer": True} if getattr(formulation, "trains_on_answer", False) else {}
    return [formulation.collate(rows[i:i + size], **extra) for i in range(0, len(rows), size)]
