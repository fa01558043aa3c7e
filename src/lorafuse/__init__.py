"""lorafuse: fuse LoRA adapters exactly and fast, and measure what each fusion keeps of every task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from lorafuse.merging.engine import MergeResult


def merge(adapters: Any, method: str = "task_arithmetic", **params: Any) -> MergeResult:
    """Fuse PEFT LoRA adapters (directories or Hub ids); see `lorafuse.merging.engine.merge` for the options."""
    from lorafuse.merging.engine import merge as _merge

    return _merge(adapters, method, **params)


__all__ = ["__version__", "merge"]
