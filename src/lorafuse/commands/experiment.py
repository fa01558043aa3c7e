"""`lorafuse experiment CONFIG`: train, fuse, tune, evaluate and report, resuming where it stopped."""

from __future__ import annotations

import argparse
from typing import Any

STAGES = ("train", "reference", "fuse", "data-driven", "report")  # as lorafuse.experiment.runner.STAGES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML, or a shipped config name (see --list)")
    add_run_options(p)
    p.add_argument("--data-dir", help="override the config's data_dir")
    p.add_argument("--only-stage", nargs="+", choices=STAGES, metavar="STAGE",
                   help=f"run only these stages ({', '.join(STAGES)}); the others only read finished work")
    p.add_argument("--list", action="store_true", help="list the shipped configs and exit")


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", help="run directory (default: runs/<config name>)")
    p.add_argument("--cache-dir", help="adapter cache shared between run directories (default: the run directory)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="fresh", action="store_false", default=False,
                        help="reuse finished jobs and adapters (the default)")
    resume.add_argument("--fresh", dest="fresh", action="store_true",
                        help="delete the run directory first (only a directory lorafuse created as a run; a "
                             "separate --cache-dir is kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 on a machine busy with other "
                                               "jobs, where oversubscribed threads run several times slower)")
    dist = p.add_argument_group("executor (default: the config's `executor:`, else local)")
    dist.add_argument("--executor", choices=["local", "ray"],
                      help="run the jobs of each stage here one by one (local) or in parallel on Ray workers")
    dist.add_argument("--address", help="Ray cluster to join: `auto` or HOST:PORT (default: start one here)")
    dist.add_argument("--workers", type=int, help="Ray workers (default: one per GPU, else one per CPU slot)")


def run(args: argparse.Namespace) -> int:
    from lorafuse.errors import ConfigError
    from lorafuse.experiment.config import load_config, shipped_configs

    if args.list:
        for name, path in shipped_configs().items():
            print(f"{name:20s} {path.read_text().splitlines()[0].lstrip('# ')}")
        return 0
    if not args.config:
        raise ConfigError("give a config file or a shipped config name (lorafuse experiment --list)")
    config = load_config(args.config)
    if args.data_dir:
        config = config.model_copy(update={"data_dir": args.data_dir})
    return execute(config, args, stages=args.only_stage)


def execute(config: Any, args: argparse.Namespace, stages: list[str] | None = None) -> int:
    """Run `config` with the shared run options; print the results table, any failures and the report path.
    Exits 1 when any job failed (after running all the others)."""
    import sys
    import time
    from pathlib import Path

    from lorafuse.experiment.report import results_table, summary_table
    from lorafuse.experiment.runner import ExperimentRunner
    from lorafuse.validate import user_path

    config = with_executor(config, args)
    out = user_path(args.output or Path("runs") / config.name)  # as the overlap checks see it
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    _warn_without_gpu(config)
    start = time.perf_counter()
    runner = ExperimentRunner(config, out, progress=not args.quiet, cache_dir=args.cache_dir, stages=stages)
    runner.prepare(fresh=args.fresh)  # validates everything first: a refused config deletes and creates nothing
    results = runner.run()
    failed = [j for j in runner.state.training + runner.state.jobs if j.get("status") != "ok"]
    if not results:
        print(f"stages {', '.join(stages or [])} done in {time.perf_counter() - start:.0f} s; run directory {out}")
        return 1 if failed else 0
    print(summary_table(results["jobs"], results["statistics"]))
    print()
    print(results_table(results["jobs"], config.tasks, results["statistics"]))
    for warning in results["warnings"]:
        print(f"warning: {warning['message']}")
    print(f"\n{time.perf_counter() - start:.0f} s. Report: {out / 'report' / 'report.html'} "
          "(also report.md, results.json, results.csv and the plots)")
    for job in failed:
        print(f"failed: {job.get('job_id')}: {job.get('error')}", file=sys.stderr)
    if failed:
        print(f"lorafuse experiment: error: {len(failed)} job(s) failed (records in {out / 'jobs'}; "
              "a rerun retries them)", file=sys.stderr)
        return 1
    return 0


def with_executor(config: Any, args: argparse.Namespace) -> Any:
    """The config with the executor options of the command line applied over its `executor:` section."""
    update = {k: v for k, v in (("kind", getattr(args, "executor", None)), ("address", getattr(args, "address", None)),
                                ("workers", getattr(args, "workers", None))) if v is not None}
    if (update.get("address") or update.get("workers")) and update.get("kind", config.executor.kind) != "ray":
        from lorafuse.errors import ConfigError

        raise ConfigError("--address and --workers are options of the Ray executor: add --executor ray")
    if not update:
        return config
    return config.model_copy(update={"executor": config.executor.model_copy(update=update)})


def _warn_without_gpu(config: Any) -> None:
    import sys

    import torch

    if config.hardware == "gpu" and not torch.cuda.is_available():
        print(f"warning: config '{config.name}' is sized for a GPU and none is visible; this will be very slow",
              file=sys.stderr)
