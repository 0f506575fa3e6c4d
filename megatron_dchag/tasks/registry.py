"""Find a workload's Task class by the name recorded in its checkpoints."""

from __future__ import annotations

import importlib
from typing import Dict, Type

from megatron_dchag.tasks.base import Task

TASK_MODULES = ("megatron_dchag.tasks.mae_pretraining", "megatron_dchag.tasks.forecasting",
                "megatron_dchag.tasks.segmentation")


def known_tasks() -> Dict[str, Type[Task]]:
    found: Dict[str, Type[Task]] = {}
    for module_name in TASK_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Task) and value is not Task and value.__module__ == module_name:
                found[value.name] = value
    return found


def task_class(name: str) -> Type[Task]:
    tasks = known_tasks()
    if name not in tasks:
        raise KeyError(f"unknown task '{name}' (known: {', '.join(sorted(tasks))})")
    return tasks[name]
