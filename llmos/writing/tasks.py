"""Writing tasks are data: a YAML file per task, with an instruct-model prompt (chat messages)
and a base-model prompt (few-shot completion), variables and default sampling settings.

Built-in tasks live in llmos/writing/templates; a user's own go in $LLMOS_HOME/templates and
take precedence over built-ins of the same name.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmos.settings import llmos_home

BUILTIN_DIR = Path(__file__).parent / "templates"


class TaskError(ValueError):
    """An unknown task, a bad template file, or a missing variable."""


@dataclass
class Task:
    name: str
    description: str
    instruct: dict  # {"system": str?, "user": str}: jinja templates
    base: str  # jinja template of a completion prompt
    variables: dict = field(default_factory=dict)  # name -> {"default": ..., "help": ...}
    params: dict = field(default_factory=dict)  # default sampling settings
    stop: list[str] = field(default_factory=list)  # stop strings for the base prompt
    path: Path | None = None

    @classmethod
    def from_file(cls, path: Path) -> Task:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise TaskError(f"{path}: not a readable YAML task file ({e})") from None
        if not isinstance(data, dict):
            raise TaskError(f"{path}: a task file must be a YAML mapping")
        missing = [k for k in ("description", "instruct", "base") if k not in data]
        if missing:
            raise TaskError(f"{path}: missing field(s) {', '.join(missing)}")
        if not isinstance(data["instruct"], dict) or "user" not in data["instruct"]:
            raise TaskError(f"{path}: 'instruct' must be a mapping with a 'user' template")
        unknown = set(data) - {"description", "instruct", "base", "variables", "params", "stop"}
        if unknown:
            raise TaskError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(
            name=path.stem, description=str(data["description"]), instruct=data["instruct"],
            base=str(data["base"]), variables=data.get("variables") or {},
            params=data.get("params") or {}, stop=list(data.get("stop") or []), path=path,
        )


def task_dirs() -> list[Path]:
    return [llmos_home() / "templates", BUILTIN_DIR]


def list_tasks() -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    for d in reversed(task_dirs()):  # user templates override built-ins
        if d.is_dir():
            for path in sorted(d.glob("*.yaml")):
                tasks[path.stem] = Task.from_file(path)
    return dict(sorted(tasks.items()))


def load_task(name: str) -> Task:
    for d in task_dirs():
        path = d / f"{name}.yaml"
        if path.is_file():
            return Task.from_file(path)
    known = ", ".join(list_tasks())
    raise TaskError(f"unknown task {name!r}; tasks: {known}")


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


def render(task: Task, brief: str, variables: dict | None = None, chat: bool = True):
    """The prompt for `task`: chat messages (instruct models) or a completion string (base
    models), with the stop strings that go with it."""
    from jinja2 import UndefinedError

    values = {k: spec.get("default") for k, spec in task.variables.items() if isinstance(spec, dict)}
    values.update(variables or {})
    values["brief"] = brief
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise TaskError(
            f"task {task.name!r} needs variable(s) {', '.join(missing)}: pass --var "
            + " --var ".join(f"{k}=..." for k in missing)
        )
    env = _environment()
    try:
        if chat:
            messages = []
            if task.instruct.get("system"):
                messages.append({"role": "system", "content": env.from_string(task.instruct["system"]).render(values).strip()})
            messages.append({"role": "user", "content": env.from_string(task.instruct["user"]).render(values).strip()})
            return messages, []
        return env.from_string(task.base).render(values), list(task.stop)
    except UndefinedError as e:
        raise TaskError(f"task {task.name!r}: {e.message}; pass it with --var NAME=VALUE") from None


def write(llm, task_name: str, brief: str, variables: dict | None = None, n: int = 1,
          result=None, **overrides) -> Iterator:
    """Stream the writing of `task_name` about `brief` (deltas, as LLM.stream yields them)."""
    task = load_task(task_name)
    chat = llm.tokenizer.has_chat_template
    prompt, stops = render(task, brief, variables, chat=chat)
    params = llm.sampling(**{**task.params, **{k: v for k, v in overrides.items() if v is not None}})
    return llm.stream(prompt, params, n=n, stop=stops, result=result)
