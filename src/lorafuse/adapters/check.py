"""`lorafuse check DIR --engine E`: an engine's static rules (lorafuse.adapters.engines) and, for PEFT and
transformers, a live load of the adapter (lorafuse.adapters.live) whose ΔW is compared with the files'."""

from __future__ import annotations

from pathlib import Path

from lorafuse.adapters.engines import ENGINES, Verdict, check_layout, layout_from_dir
from lorafuse.errors import ConfigError, did_you_mean

ALL_ENGINES = ENGINES + ("transformers",)  # transformers: its PEFT integration (`model.load_adapter`), live only


def check_adapter(path: str | Path, engine: str, max_lora_rank: int | None = None,
                  base_model: str | None = None) -> Verdict:
    """`lorafuse check DIR --engine E`: whether `engine` loads the adapter in DIR and computes PEFT's ΔW. PEFT and
    transformers also load it for real (`lorafuse.adapters.live`) and compare each module's ΔW with the files'."""
    layout = layout_from_dir(path)
    if engine not in ALL_ENGINES:
        raise ConfigError(f"unknown engine '{engine}'{did_you_mean(engine, ALL_ENGINES)}")
    verdict = check_layout(layout, "peft" if engine == "transformers" else engine, max_lora_rank)
    if engine not in ("peft", "transformers") or not verdict.ok:
        return verdict  # a layout PEFT's rules refuse is not loaded (the rules say why)
    from lorafuse.adapters.live import live_findings

    return Verdict(engine, verdict.source, verdict.max_lora_rank,
                   verdict.findings + live_findings(path, layout, engine, base_model))
