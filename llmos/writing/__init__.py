"""Creative writing tasks: prompt templates (data files) rendered for instruct or base models."""

from llmos.writing.tasks import Task, TaskError, list_tasks, load_task, render, write

__all__ = ["Task", "TaskError", "list_tasks", "load_task", "render", "write"]
