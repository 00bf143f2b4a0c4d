"""The run's task from its `task` config: a SuperGLUE task by name (tasks.py), or one defined on the user's own
files (text_classification.py). It sits above both, so neither imports the other's side to build a task."""

from __future__ import annotations

from typing import Any

from fastformers.data import text_classification
from fastformers.data.tasks import Task, get_task


def from_files(task_cfg: Any) -> bool:
    """Whether a `task` config defines its own task on the user's files (conf/task/text_classification.yaml)."""
    return "files" in task_cfg


def task_of(cfg: Any) -> Task:
    """The run's task: the SuperGLUE task `task.name` names, or the one `task` defines on the user's files."""
    if not from_files(cfg.task):
        return get_task(cfg.task.name)
    return text_classification.build(text_classification.check(cfg.task))
