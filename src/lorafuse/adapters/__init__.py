"""PEFT LoRA adapters in and out: lazy reading, PEFT-format writing, merged-model export, inspection."""

from lorafuse.adapters.reader import LoraAdapter

__all__ = ["LoraAdapter"]
