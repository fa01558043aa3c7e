"""`lorafuse experiment CONFIG`: train, fuse, tune, evaluate and report, resuming where it stopped."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML, or a shipped config name (see --list)")
    p.add_argument("--output", help="run directory (default: runs/<name>)")
    p.add_argument("--data-dir", help="override the config's data_dir")
    p.add_argument("--fresh", action="store_true", help="discard cached jobs and adapters of this run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the shipped configs and exit")


def run(args: argparse.Namespace) -> int:
    from lorafuse.experiment.config import load_config, shipped_configs

    if args.list:
        for name, path in shipped_configs().items():
            print(f"{name:20s} {path.read_text().splitlines()[0].lstrip('# ')}")
        return 0
    if not args.config:
        from lorafuse.errors import ConfigError

        raise ConfigError("give a config file or a shipped config name (lorafuse experiment --list)")
    config = load_config(args.config)
    if args.data_dir:
        config = config.model_copy(update={"data_dir": args.data_dir})
    return execute(config, args.output, args.fresh, args.quiet)


def execute(config, output: str | None, fresh: bool, quiet: bool) -> int:
    import shutil
    from pathlib import Path

    from lorafuse.experiment.report import results_table
    from lorafuse.experiment.runner import ExperimentRunner

    out = Path(output or Path("runs") / config.name)
    if fresh and out.exists():
        shutil.rmtree(out)
    results = ExperimentRunner(config, out, progress=not quiet).run()
    print(results_table(results["jobs"], config.tasks))
    failed = [j for j in results["jobs"] if j.get("status") != "ok"]
    for job in failed:
        print(f"failed: {job.get('job_id')}: {job.get('error')}")
    print(f"\nreport: {out / 'report' / 'report.html'} (also report.md, results.json, results.csv)")
    return 0
