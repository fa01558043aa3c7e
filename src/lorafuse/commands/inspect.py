"""`lorafuse inspect ADAPTER`: modules, shapes, ranks, scaling and update norms of a PEFT LoRA adapter."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="adapter directory or Hub id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--allow-bin", action="store_true", help="allow pickled adapter_model.bin")


def run(args: argparse.Namespace) -> int:
    from lorafuse.adapters.inspect import describe_adapter, format_description

    info = describe_adapter(args.adapter, allow_bin=args.allow_bin)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0
