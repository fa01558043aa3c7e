"""Deprecated: moved to `lorafuse.merging.methods` (this alias goes in lorafuse 0.3.0)."""

from lorafuse._moved import moved

moved(__name__, "lorafuse.merging.methods")
