"""Prompt sets and benchmark tasks, by name."""

from advantageflow.registry import Registry
from advantageflow.tasks.base import Prompt, Task, TaskBase

TASKS: Registry = Registry("task")
TASKS.register("toy2d", "advantageflow.tasks.toy2d:Toy2DTask")
TASKS.register("prompts", "advantageflow.tasks.prompt_file:PromptFileTask")
TASKS.register("shapes", "advantageflow.tasks.shapes.task:ShapesTask")

__all__ = ["TASKS", "Prompt", "Task", "TaskBase"]
