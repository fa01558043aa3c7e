"""NLI tasks as data: the registry, the shared JSONL schema, Hub loading and the demo's generated suite."""

from lorafuse.tasks import synthetic
from lorafuse.tasks.registry import (
    SPLITS,
    DataError,
    Example,
    Fields,
    HubSource,
    MissingSplitError,
    Task,
    add_builtin_set,
    get_task,
    list_tasks,
    load_task_file,
    read_jsonl,
    register_task,
)

add_builtin_set(synthetic.register_all)  # the demo's generated suite, registered with the built-in tasks

__all__ = ["SPLITS", "DataError", "Example", "Fields", "HubSource", "MissingSplitError", "Task", "get_task", "list_tasks",
           "load_task_file", "read_jsonl", "register_task"]
