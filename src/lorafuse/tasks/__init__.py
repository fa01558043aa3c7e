"""NLI tasks as data: the registry, the shared JSONL schema, Hub loading and the demo's generated suite."""

from lorafuse.tasks.registry import (
    DataError,
    Example,
    Task,
    get_task,
    list_tasks,
    load_task_file,
    register_task,
)

__all__ = ["DataError", "Example", "Task", "get_task", "list_tasks", "load_task_file", "register_task"]
