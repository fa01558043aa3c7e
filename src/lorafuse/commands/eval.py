"""`lorafuse eval`: accuracy per task of a base model, a single adapter or a fused one; normalized accuracy
against each task's own adapter (accuracy ÷ own accuracy × 100, as KnOTS reports it); the cross-task average.
A Markdown table (each accuracy with its 95% Wilson interval) and JSON, both in percent (the JSON says so in
`"units": "percent"`); a --reference adapter at chance (not above its majority class) is warned about."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lorafuse.validate import positive_int

if TYPE_CHECKING:
    from lorafuse.model.evaluation import EvalResult


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="minilm", help="minilm, smollm2, or a Hugging Face id / local path")
    p.add_argument("--adapter", help="adapter directory (single, fused or router); omit for the base model")
    p.add_argument("--tasks", required=True, help="comma-separated task names, e.g. mnli,rte,scitail")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--formulation", choices=["classify", "chat"], help="default: the model's (minilm: classify)")
    p.add_argument("--data-dir", help="directory of <task>/<split>.jsonl (e.g. ../shared/data/nli)")
    p.add_argument("--task-file", action="append", default=[], help="YAML defining extra tasks (repeatable)")
    p.add_argument("--max-examples", type=positive_int, help="evaluate at most this many examples per task")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-length", type=positive_int, help="token limit per example")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (auto: bf16 on a GPU or a CPU with AMX-BF16/AVX512-BF16, else fp32)")
    heads = p.add_argument_group("classification heads (classify; a fused adapter has no single head)")
    heads.add_argument("--heads", nargs="+", default=[], metavar="TASK=DIR[,TASK=DIR]",
                       help="each task's own adapter, whose head is used where the adapter has none for it")
    heads.add_argument("--heads-dir", help="directory holding each task's own adapter as DIR/<task>")
    ref = p.add_argument_group("normalized accuracy")
    ref.add_argument("--reference", nargs="+", default=[], metavar="TASK=DIR[,TASK=DIR]",
                     help="each task's own adapter: evaluated too, as the 100%% of its task")
    ref.add_argument("--reference-results", help="results JSON of the tasks' own adapters (or {task: accuracy})")
    p.add_argument("--output", help="write the results JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def pairs(items: list[str], flag: str) -> dict[str, str]:
    """`TASK=DIR` items, each possibly a comma-separated list of them."""
    from lorafuse.errors import ConfigError

    out = {}
    for item in (part for chunk in items for part in chunk.split(",") if part.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{flag} {item!r}: expected TASK=DIR")
        out[key.strip()] = value.strip()
    return out


def _references(args: argparse.Namespace, ev, heads: dict) -> dict[str, float]:
    """Own-adapter accuracy per task: from --reference-results, then --reference adapters evaluated here."""
    from lorafuse.model.evaluation import load_reference

    own = load_reference(args.reference_results) if args.reference_results else {}
    for task, directory in pairs(args.reference, "--reference").items():
        result = ev.evaluate(directory, heads=heads, tasks=[task])
        own[task] = result.accuracy[task]
        _warn_at_chance(result, task, directory)
    return own


def _warn_at_chance(result: EvalResult, task: str, directory: str) -> None:
    """A reference adapter not significantly above its majority class (the experiment report's exact binomial
    test) makes normalized accuracy against it meaningless; say so."""
    import sys

    from lorafuse.experiment.analysis import at_chance, chance_text, majority_share

    chance = at_chance(result.accuracy[task], result.examples[task], majority_share(result.to_dict(), task))
    if chance is not None:
        print(f"warning: reference adapter {directory} ({task}) is at chance: {chance_text(chance)}; normalized "
              f"accuracy against it means little", file=sys.stderr)


def _check_adapter(path: str) -> None:
    """A bad adapter (config types, NaN alpha, integer tensors) is refused before the model loads."""
    from lorafuse.adapters.reader import LoraAdapter
    from lorafuse.fusion.arrow import is_arrow
    from lorafuse.fusion.logo import is_logo
    from lorafuse.fusion.router import is_router

    if not is_router(path) and not is_arrow(path) and not is_logo(path):
        LoraAdapter(path).check_dtypes()


def _inputs(args: argparse.Namespace, tasks: list[str]) -> list[tuple[str, str]]:
    """(what, path) of everything eval reads from the local disk: --output may be none of them, nor hold one."""
    from pathlib import Path

    from lorafuse.tasks import get_task
    from lorafuse.validate import user_path

    found = [(flag, path) for flag, path in (("--adapter", args.adapter), ("--data-dir", args.data_dir),
                                              ("--heads-dir", args.heads_dir), ("--model", args.model),
                                              ("--reference-results", args.reference_results))
             if path and user_path(path).exists()]
    found += [("--task-file", path) for path in args.task_file]
    found += [(flag, path) for flag, items in (("--reference", args.reference), ("--heads", args.heads))
              for path in pairs(items, flag).values()]
    found += [(f"task '{t}' {split} file", str(Path(f))) for t in tasks for split, f in get_task(t).files.items()]
    return found


def _check_output(args: argparse.Namespace, tasks: list[str]) -> None:
    """--output checked before the model loads: apart from every input, and an existing file only with
    --overwrite (as every output lorafuse writes)."""
    from lorafuse.atomic import check_output_file
    from lorafuse.validate import check_apart

    check_apart(args.output, _inputs(args, tasks), "--output")
    check_output_file(args.output, args.overwrite)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import lorafuse.fusion.arrow  # noqa: F401 (registers the Arrow kind: --adapter ARROW_DIR)
    import lorafuse.fusion.logo  # noqa: F401 (registers the LoGo kind: --adapter LOGO_DIR)
    import lorafuse.fusion.router  # noqa: F401 (registers the router kind: --adapter ROUTER_DIR)
    from lorafuse.atomic import write_output_file
    from lorafuse.errors import ConfigError
    from lorafuse.model.evaluation import Evaluator, load_task_head, markdown_table
    from lorafuse.provenance import stamp
    from lorafuse.tasks import get_task, load_task_file

    for task_file in args.task_file:
        load_task_file(task_file)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    for name in tasks:
        get_task(name)  # unknown names fail here, before the model loads
    if args.output:
        _check_output(args, tasks)
    if args.adapter:
        _check_adapter(args.adapter)
    given = {**pairs(args.reference, "--reference"), **pairs(args.heads, "--heads")}
    heads = {t: h for t in tasks if (h := load_task_head(t, None, given, args.heads_dir)) is not None}
    ev = Evaluator(args.model, tasks, split=args.split, formulation=args.formulation, data_dir=args.data_dir,
                   max_examples=args.max_examples, batch_size=args.batch_size, max_length=args.max_length,
                   progress=not args.quiet, dtype=args.dtype)
    result = ev.evaluate(args.adapter, heads=heads)
    own = _references(args, ev, heads)
    if own:
        result.normalize(own)
    print(markdown_table({Path(args.adapter).name if args.adapter else "base": result}, tasks))
    if args.output:
        record = {"model": args.model, "adapter": args.adapter, "split": args.split,
                  "formulation": ev.formulation_name, **result.to_percent_dict(), **stamp()}
        write_output_file(args.output, json.dumps(record, indent=2) + "\n", args.overwrite)
    return 0
