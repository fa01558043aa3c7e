"""Which floating-point type the model side computes in: `auto`, `float32` or `bfloat16`.

`auto` takes bf16 only where the hardware computes it natively: a GPU that supports it, or a CPU whose flags show
AMX-BF16 or AVX512-BF16. Elsewhere bf16 is emulated and slower than fp32: on an Intel Xeon without either flag
(1 thread, MiniLM and SmolLM2 on MNLI) bf16 evaluation ran at 0.42–0.81× and bf16 training at 0.28–0.30× of fp32
(benchmarks/results/precision_speed.md). Every result records the dtype it ran in and why (`Precision.to_dict`).

Exactness rules that every bf16 path here follows:
- evaluation keeps an fp32 master copy of the weights; an adapter's merged weight is formed in fp32 (W + ΔW) and
  only then rounded, and removing it restores the rounded master, so A-then-B equals B alone bit for bit;
- no `torch.autocast` region spans a weight change (autocast caches a low-precision copy of each weight per
  region, so a weight changed in place inside one can go unseen): evaluation casts the weights instead;
- training in bf16 is mixed precision (fp32 master weights and optimizer state; the Trainer's autocast per step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lorafuse.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
FLAGS_ENV = "LORAFUSE_CPU_FLAGS"  # replaces /proc/cpuinfo's flags (tests; a machine whose flags lie)


@dataclass(frozen=True)
class Precision:
    """A resolved dtype and why it was chosen."""

    dtype: str  # float32 | bfloat16
    requested: str
    reason: str

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    @property
    def reduced(self) -> bool:
        return self.dtype != "float32"

    def to_dict(self) -> dict[str, str]:
        return {"dtype": self.dtype, "requested": self.requested, "reason": self.reason}


def check_dtype(value: str, field_name: str = "dtype") -> str:
    if value not in DTYPES:
        raise ConfigError(f"{field_name}: '{value}' is not one of {', '.join(DTYPES)}")
    return value


def cpu_flags() -> set[str]:
    """The CPU's feature flags ($LORAFUSE_CPU_FLAGS, space-separated, when set; else /proc/cpuinfo)."""
    if FLAGS_ENV in os.environ:
        return set(os.environ[FLAGS_ENV].split())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name, for benchmark and result headers."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def resolve_precision(requested: str = "auto", device: str = "cpu") -> Precision:
    """The dtype to compute in on `device` for `requested` (auto, float32 or bfloat16)."""
    check_dtype(requested)
    if requested != "auto":
        return Precision(requested, requested, "asked for")
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return Precision("bfloat16", requested, "auto: the GPU supports bf16")
        return Precision("float32", requested, "auto: the GPU lacks bf16")
    native = sorted(f for f in NATIVE_BF16_FLAGS if f in cpu_flags())
    if native:
        return Precision("bfloat16", requested, f"auto: the CPU has {' and '.join(native)}")
    return Precision("float32", requested, "auto: the CPU lacks AMX-BF16 and AVX512-BF16 (bf16 emulated: slower "
                                           "than fp32)")


def training_precision(requested: str = "auto") -> Precision:
    """The dtype training computes in (mixed precision when bf16) on the device the Trainer picks: the GPU when
    there is one."""
    import torch

    return resolve_precision(requested, "cuda" if torch.cuda.is_available() else "cpu")
