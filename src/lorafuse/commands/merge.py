"""`lorafuse merge`: a mergekit-style YAML, or the same settings as flags (flags win)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lorafuse.errors import ConfigError
from lorafuse.validate import finite_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="mergekit-style YAML (merge_method, models, parameters)")
    p.add_argument("-o", "--output", help="output adapter directory (PEFT format)")
    g = p.add_argument_group("method")
    g.add_argument("--method", help="merge method (see --list-methods)")
    g.add_argument("--adapters", nargs="+", metavar="ADAPTER", help="adapter directories or Hub ids")
    g.add_argument("--names", nargs="+", help="labels for the adapters (default: task or directory name)")
    g.add_argument("--weights", nargs="+", type=finite_float, help="one weight per adapter")
    g.add_argument("--densities", nargs="+", type=finite_float, help="one density per adapter (element-wise methods)")
    g.add_argument("--lambda", dest="lambda_", type=finite_float, help="scale of the merged update")
    g.add_argument("--density", type=finite_float,
                   help="fraction of entries kept per task (ties, magnitude_prune, breadcrumbs; not DARE)")
    g.add_argument("--drop-rate", type=finite_float, help="DARE drop probability (PEFT's density = 1 - drop rate)")
    g.add_argument("--trim-scope", choices=["module", "global"],
                   help="trim threshold per module or whole adapter (default: the space's reference: "
                        "full and core per module, knots global)")
    g.add_argument("--seed", type=int, help="seed of random methods (DARE)")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="any other method parameter")
    g.add_argument("--list-methods", action="store_true", help="list the methods and exit")
    o = p.add_argument_group("output")
    o.add_argument("--rank", type=positive_int, help="output rank (default: nothing cut, each result's natural rank ≤ Σr; "
                                            "dense element-wise results min(Σr, m, n))")
    o.add_argument("--space", help="space of element-wise methods: full, knots, core")
    o.add_argument("--exact-svd", action="store_true", default=None, help="exact SVD instead of randomized")
    o.add_argument("--device", help="where each module's work runs: cpu, cuda, cuda:1 (default: the GPU when there "
                                    "is one, else the CPU; $LORAFUSE_DEVICE)")
    o.add_argument("--modules-to-save", choices=["auto", "error", "per_task", "average", "drop"],
                   help="what to do with modules_to_save tensors (classification heads); default auto: per_task for "
                        "adapters made by `lorafuse train` (each task keeps its head), else an error asking")
    o.add_argument("--rank-patterns", action="store_true", default=None,
                   help="store each module at its own rank with rank_pattern/alpha_pattern (PEFT only; default: one "
                        "rank, lower-rank modules zero-padded, which every engine loads)")
    o.add_argument("--target", choices=["vllm", "sglang", "lorax", "llamacpp", "peft"],
                   help="write an adapter this engine loads with the same ΔW (picks the rank, refuses what it cannot "
                        "load; see `lorafuse check`)")
    o.add_argument("--max-lora-rank", type=int,
                   help="with --target: the server's max LoRA rank (vLLM's default 16); the output rank is capped to it")
    o.add_argument("--dtype", help="output dtype (default: the adapters')")
    o.add_argument("--base-model", help="base model id or path (checked against the adapters)")
    o.add_argument("--output-model", help="also write the base model with the fused update added (safetensors)")
    o.add_argument("--allow-bin", action="store_true", help="allow pickled adapter_model.bin (weights_only load)")
    o.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def _parse_value(text: str, item: str) -> Any:
    """A flag value as YAML reads it (`0.5`, `true`, `global`), refusing duplicate keys."""
    from lorafuse.validate import load_yaml

    return load_yaml(text, f"--param {item!r}")


def build_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Merge the YAML config (if any) with the flags; flags take precedence."""
    from lorafuse.merging.config import RESERVED, load_merge_config

    kwargs: dict[str, Any] = {}
    if args.config:
        kwargs = load_merge_config(args.config).merge_kwargs(Path(args.config).resolve().parent)
    flags = {"method": args.method, "adapters": args.adapters, "names": args.names, "weights": args.weights,
             "densities": args.densities, "lambda": args.lambda_, "density": args.density,
             "drop_rate": args.drop_rate, "trim_scope": args.trim_scope, "seed": args.seed, "rank": args.rank,
             "space": args.space, "exact_svd": args.exact_svd, "modules_to_save": args.modules_to_save,
             "dtype": args.dtype, "base_model": args.base_model, "allow_bin": args.allow_bin or None,
             "rank_patterns": args.rank_patterns, "device": args.device}
    kwargs.update({k: v for k, v in flags.items() if v is not None})
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        key = key.replace("-", "_")
        if key in RESERVED:  # e.g. adapters=... would be read character by character
            raise ConfigError(f"--param {item!r}: '{key}' is not a method parameter; use its own flag")
        kwargs[key] = _parse_value(value, item)
    if not kwargs.get("adapters"):
        raise ConfigError("no adapters: give a config file or --adapters")
    kwargs.setdefault("method", "task_arithmetic")
    return kwargs


LIST_NOTES = """
Choices where the references differ (the methods' docstrings give the details):
- output rank: nothing is cut unless --rank is given (results keep their natural rank, at most Σr; dense
  element-wise results come back at min(Σr, m, n)); with --rank, iso_c/iso_cts take the rank as their budget
  (top directions of the sum, then a flat spectrum), the others are cut to their best rank-k approximation
- weights: element-wise methods act on w·x; TIES elects on the weighted values (a tie elects +) and divides by
  the agreeing tasks' Σ|w| (denominator=count: their number, as PEFT)
- average refuses weights; linear defaults to normalize=false (mergekit: true)
- DARE takes drop_rate, never density (PEFT's density = 1 - drop_rate); dare_ties: optional trim_density after
  the drop, as the DARE authors' DARE+TIES
- breadcrumbs: mergekit's band (int(density·N) kept after the top gamma); rule=authors: per row, as their code
- spaces: --trim-scope defaults to each space's reference (full, core: per module; knots: global); Core Space's
  bases come from the scaled factors s·B (its code: the raw factors; equal when every α/r is equal)"""


def _list_methods() -> int:
    from lorafuse.merging.methods.registry import list_methods

    for m in list_methods():
        tag = "exact" if m.exact else m.kind
        print(f"{m.name:18s} [{tag}] {m.summary}\n{'':18s}  {m.paper}")
    print(LIST_NOTES)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list_methods:
        return _list_methods()
    from lorafuse.merging.config import dump_merge_config
    from lorafuse.merging.engine import merge

    if not args.output:
        raise ConfigError("no output directory: pass -o/--output DIR")
    kwargs = build_kwargs(args)
    if args.max_lora_rank is not None and not args.target:
        raise ConfigError("--max-lora-rank needs --target ENGINE (or use --rank)")
    if args.target:
        from lorafuse.adapters.serving import check_merge_options

        check_merge_options(args.target, args.max_lora_rank, kwargs)
    outputs = _check_outputs(args, kwargs)
    base_dir = _check_base(args, kwargs)
    result = merge(progress=not args.quiet, **kwargs)
    result.provenance["config_yaml"] = dump_merge_config(kwargs)
    if args.target:
        from lorafuse.adapters.serving import fit_for_engine

        verdict = fit_for_engine(result, args.target, args.max_lora_rank)
        print(f"{args.target}: passes its {len(verdict.findings)} loading rules (max_lora_rank "
              f"{verdict.max_lora_rank or 'not limited'})")
    if args.output_model:
        _write_with_model(result, kwargs, base_dir, outputs, args.overwrite)
    else:
        result.save(args.output, overwrite=args.overwrite)
    print(f"wrote {args.output} ({len(result.modules)} modules, ranks {result.provenance['output']['ranks']})")
    if args.output_model:
        print(f"wrote {args.output_model}")
    energy = result.provenance["retained_energy"]
    if energy["min"] is not None:
        print(f"retained energy after truncation: mean {energy['mean']:.4f}, min {energy['min']:.4f}")
    return 0


def _inputs(args: argparse.Namespace, kwargs: dict[str, Any]) -> list[str]:
    """Local inputs an output must neither be, contain, nor lie inside (Hub ids resolve into the cache)."""
    items = [str(a) for a in kwargs["adapters"] if Path(str(a)).expanduser().exists()]
    if args.config:
        items.append(args.config)
    base = _base_name(args, kwargs) if args.output_model else kwargs.get("base_model")
    if base and Path(base).expanduser().exists():
        items.append(base)
    return items


def _base_name(args: argparse.Namespace, kwargs: dict[str, Any]) -> str | None:
    """The base model of --output-model: --base-model, else the one the first adapter names."""
    from lorafuse.adapters.reader import LoraAdapter

    return kwargs.get("base_model") or LoraAdapter(kwargs["adapters"][0]).settings.base_model


def _check_outputs(args: argparse.Namespace, kwargs: dict[str, Any]) -> list[str]:
    from lorafuse.atomic import check_output
    from lorafuse.validate import check_apart

    outputs = [args.output] + ([args.output_model] if args.output_model else [])
    if args.output_model:
        check_apart(args.output_model, [args.output], "--output-model")
    for flag, out, kind in zip(("-o", "--output-model"), outputs, ("adapter", "merged-model")):
        check_apart(out, _inputs(args, kwargs), flag)
        check_output(out, args.overwrite, kind)
    return outputs


def _check_base(args: argparse.Namespace, kwargs: dict[str, Any]) -> Path | None:
    """With --output-model, the base model is found and checked before the merge (its shapes after it, before
    anything is written)."""
    if not args.output_model:
        return None
    from lorafuse.adapters.export import check_base_model
    from lorafuse.atomic import check_writable

    base = _base_name(args, kwargs)
    if not base:
        raise ConfigError("--output-model needs --base-model (the adapters name none)")
    model_dir = check_base_model(base)
    check_writable(args.output_model, sum(p.stat().st_size for p in model_dir.glob("*.safetensors")))  # its size
    return model_dir


def _write_with_model(result: Any, kwargs: dict[str, Any], base_dir: Path, outputs: list[str],
                      overwrite: bool) -> None:
    """-o and --output-model committed together: both are written to temporary directories, then moved into
    place one after the other, or neither is."""
    from lorafuse.adapters.export import plan_merged_model, write_merged_model_files
    from lorafuse.atomic import atomic_outputs, check_writable

    plan = plan_merged_model(result, base_dir)
    check_writable(outputs[0], result.nbytes())
    check_writable(outputs[1], plan.nbytes)
    with atomic_outputs(outputs, overwrite, ["adapter", "merged-model"]) as (adapter_tmp, model_tmp):
        result.write_files(adapter_tmp)
        write_merged_model_files(result, plan, model_tmp)
