"""Creative writing: tasks as YAML templates (English and Chinese), poetic forms kept by
constrained decoding, story mode with Memory, Author's Note and Lorebook, candidate ranking,
and long form (outline -> chapters)."""

from llmos.writing.tasks import Task, TaskError, WriteRequest, list_tasks, load_task, prepare_write, render, write

__all__ = ["Task", "TaskError", "WriteRequest", "list_tasks", "load_task", "prepare_write", "render", "write"]
