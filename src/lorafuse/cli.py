"""The `lorafuse` command line. Each subcommand lives in `lorafuse.commands.<name>` and exposes
`add_arguments(parser)` and `run(args) -> int`; heavy libraries are imported inside `run` so `--help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lorafuse import __version__
from lorafuse.errors import LorafuseError

# name -> one-line help; module lorafuse.commands.<name with - as _>
COMMANDS: dict[str, str] = {
    "merge": "fuse LoRA adapters into one PEFT adapter (mergekit-style YAML or flags)",
    "inspect": "print an adapter's modules, shapes, ranks, scaling and norms",
    "check": "whether vLLM, SGLang, LoRAX/TGI, llama.cpp or PEFT loads an adapter and computes its ΔW",
    "train": "train one LoRA adapter per task (PEFT + Hugging Face Trainer)",
    "eval": "evaluate an adapter (single, fused or routed) on tasks",
    "experiment": "train, fuse, tune, evaluate and report from one config",
    "demo": "run the offline demo experiment on the embedded MiniLM",
    "lorahub": "learn per-adapter weights for a target task from a few examples (LoraHub)",
    "router": "an input-routed mixture of adapters: a trained gate, or Arrow or LoGo (training-free)",
    "regmean": "merge adapters by RegMean from unlabelled inputs of their tasks (input Gram matrices)",
    "adamerging": "merge adapters with coefficients learned by entropy minimisation on unlabelled inputs",
    "export-lm-eval": "write lm-evaluation-harness tasks (YAML + JSONL) with lorafuse's chat prompts",
}


def _command_module(name: str):
    return importlib.import_module(f"lorafuse.commands.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafuse", description="Fuse LoRA adapters: exact, fast, honest.")
    parser.add_argument("--version", action="version", version=f"lorafuse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        try:
            module = _command_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != f"lorafuse.commands.{name.replace('-', '_')}":
                raise
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # transformers 5 deprecation notices raised from inside PEFT/Trainer calls we do not control
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    _tolerant_stdout()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except LorafuseError as exc:
        print(f"lorafuse {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `lorafuse ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # a disk, permission or file problem of the environment, named by its path
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lorafuse {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _tolerant_stdout() -> None:
    """Output with λ, Σ or ≤ on a stdout that cannot encode them (PYTHONIOENCODING=ascii, a C locale) shows `?`
    in their place rather than failing with UnicodeEncodeError; stderr already escapes them."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and (sys.stdout.errors or "strict") == "strict":
        reconfigure(errors="replace")


if __name__ == "__main__":
    sys.exit(main())
