"""Merge methods, one registry: `get_method(name)`, `list_methods()`, `register(...)`."""

from lorafuse.merging.methods.registry import MergeMethod, MethodParams, get_method, list_methods, register

__all__ = ["MergeMethod", "MethodParams", "get_method", "list_methods", "register"]
