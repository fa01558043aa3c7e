"""`lorafuse check DIR --engine E`: whether a serving engine loads the adapter and computes PEFT's ΔW."""

from __future__ import annotations

import argparse
import json

ENGINE_CHOICES = ("vllm", "sglang", "lorax", "llamacpp", "peft")  # lorafuse.adapters.engines.ENGINES (no import)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="PEFT adapter directory")
    p.add_argument("--engine", required=True, nargs="+", choices=ENGINE_CHOICES,
                   help="engine(s) whose loading rules to replay (lorax covers TGI too)")
    p.add_argument("--max-lora-rank", type=int,
                   help="the engine's max LoRA rank (vLLM's default: 16; others: not checked unless given)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from lorafuse.adapters.engines import check_layout, layout_from_dir

    layout = layout_from_dir(args.adapter)
    verdicts = [check_layout(layout, engine, args.max_lora_rank) for engine in args.engine]
    if args.json:
        print(json.dumps([v.to_dict() for v in verdicts], indent=2))
    else:
        print("\n\n".join(v.format() for v in verdicts))
    return 0 if all(v.ok for v in verdicts) else 1
