"""`lorafuse check DIR [--engine E ...]`: whether each engine loads the adapter and computes PEFT's ΔW (every
engine when none is named). PEFT and transformers load it for real and compare each module's ΔW."""

from __future__ import annotations

import argparse
import json

# lorafuse.adapters.check.ALL_ENGINES (no import: heavy modules stay out of --help)
ENGINE_CHOICES = ("vllm", "sglang", "lorax", "llamacpp", "peft", "transformers")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="PEFT adapter directory")
    p.add_argument("--engine", nargs="+", choices=ENGINE_CHOICES,
                   help="engine(s) to check (default: all; lorax covers TGI too; peft and transformers load the "
                        "adapter for real and compare its ΔW with the files')")
    p.add_argument("--max-lora-rank", type=int,
                   help="the engine's max LoRA rank (vLLM's default: 16; others: not checked unless given)")
    p.add_argument("--base-model", help="a local base model for the live peft/transformers load (default: a tiny "
                                        "model built from the adapter's shapes)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from lorafuse.adapters.check import check_adapter

    verdicts = [check_adapter(args.adapter, engine, args.max_lora_rank, args.base_model)
                for engine in args.engine or ENGINE_CHOICES]
    if args.json:
        print(json.dumps([v.to_dict() for v in verdicts], indent=2))
    else:
        print("\n\n".join(v.format() for v in verdicts))
    return 0 if all(v.ok for v in verdicts) else 1
