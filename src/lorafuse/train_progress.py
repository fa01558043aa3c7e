"""Deprecated: moved to `lorafuse.model.train_progress` (this alias goes in lorafuse 0.3.0)."""

from lorafuse._moved import moved

moved(__name__, "lorafuse.model.train_progress")
