"""Experiments: config schema, cached runner, report."""

from lorafuse.experiment.config import ExperimentConfig, load_config
from lorafuse.experiment.runner import ExperimentRunner

__all__ = ["ExperimentConfig", "ExperimentRunner", "load_config"]
