"""Experiments: the config schema, the cached runner (train → reference → fuse → data-driven → report) and the
report writer."""

from lorafuse.experiment.config import ExperimentConfig, load_config, shipped_configs
from lorafuse.experiment.runner import STAGES, ExperimentError, ExperimentRunner

__all__ = ["STAGES", "ExperimentConfig", "ExperimentError", "ExperimentRunner", "load_config", "shipped_configs"]
