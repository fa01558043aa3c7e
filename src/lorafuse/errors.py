"""Errors lorafuse raises for bad input: each names the file, module or field at fault."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LorafuseError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback by the CLI."""


class AdapterError(LorafuseError):
    """An adapter directory, file or tensor is missing, corrupt or unsupported."""


class IncompatibleAdaptersError(LorafuseError):
    """Adapters that cannot be fused together (different base models, shapes or options)."""


class ConfigError(LorafuseError):
    """A merge, task or experiment configuration is invalid."""


class OutputExistsError(LorafuseError):
    """The output path exists and --overwrite was not given."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' hint for an unknown name, or a list of the valid ones."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (valid: {', '.join(choices)})"
