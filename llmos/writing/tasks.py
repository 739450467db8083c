"""Writing tasks are data: one YAML file per task, with an English and a Chinese section, each
holding a prompt for instruct models (chat messages) and one for base models (a few-shot
completion prompt), plus variables, default sampling settings and stop strings.

Built-in tasks live in llmos/writing/templates; a user's own go in $LLMOS_HOME/templates and
take precedence over built-ins of the same name. A user file may hold a single language at
the top level (instruct / base / stop), which then serves both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmos.languages import has_han
from llmos.settings import llmos_home

BUILTIN_DIR = Path(__file__).parent / "templates"
LANGS = ("en", "zh")
BANNED_PHRASES = [  # stock phrases small models lean on; banned in every task unless allowed
    "a testament to", "tapestry of", "in the realm of", "a symphony of", "delve into",
    "it is important to note", "in conclusion", "nestled in", "a kaleidoscope of",
]


class TaskError(ValueError):
    """An unknown task, a bad template file, or a missing variable."""


@dataclass
class Prompt:
    instruct: dict  # {"system"?: template, "user": template}
    base: str  # template of a completion prompt
    stop: list[str] = field(default_factory=list)


@dataclass
class Task:
    name: str
    description: str
    prompts: dict[str, Prompt]  # by language
    variables: dict = field(default_factory=dict)  # name -> {"default": ..., "help": ...}
    params: dict = field(default_factory=dict)  # default sampling settings
    internal: bool = False  # a stage of a larger pipeline (hidden from `llmos tasks`)
    path: Path | None = None

    @classmethod
    def from_file(cls, path: Path) -> Task:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise TaskError(f"{path}: not a readable YAML task file ({e})") from None
        if not isinstance(data, dict):
            raise TaskError(f"{path}: a task file must be a YAML mapping")
        known = {"description", "variables", "params", "internal", "en", "zh", "instruct", "base", "stop"}
        unknown = set(data) - known
        if unknown:
            raise TaskError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}")
        if "description" not in data:
            raise TaskError(f"{path}: missing field 'description'")
        prompts = {}
        for lang in LANGS:
            section = data.get(lang)
            if section is not None:
                prompts[lang] = _prompt(path, section, lang)
        if "instruct" in data or "base" in data:
            single = _prompt(path, data, "top level")
            for lang in LANGS:
                prompts.setdefault(lang, single)
        if not prompts:
            raise TaskError(f"{path}: needs an 'en' or 'zh' section (or instruct/base at the top level)")
        variables = data.get("variables") or {}
        if not isinstance(variables, dict):
            raise TaskError(f"{path}: 'variables' must be a mapping")
        return cls(path.stem, str(data["description"]), prompts, variables,
                   data.get("params") or {}, bool(data.get("internal")), path)


def _prompt(path: Path, section: dict, where: str) -> Prompt:
    if not isinstance(section, dict):
        raise TaskError(f"{path}: section {where} must be a mapping")
    missing = [k for k in ("instruct", "base") if k not in section]
    if missing:
        raise TaskError(f"{path}: section {where} lacks {', '.join(missing)}")
    if not isinstance(section["instruct"], dict) or "user" not in section["instruct"]:
        raise TaskError(f"{path}: 'instruct' in {where} must be a mapping with a 'user' template")
    return Prompt(section["instruct"], str(section["base"]), list(section.get("stop") or []))


def task_dirs() -> list[Path]:
    return [llmos_home() / "templates", BUILTIN_DIR]


def list_tasks(include_internal: bool = False) -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    for d in reversed(task_dirs()):  # user templates override built-ins
        if d.is_dir():
            for path in sorted(d.glob("*.yaml")):
                tasks[path.stem] = Task.from_file(path)
    return {k: t for k, t in sorted(tasks.items()) if include_internal or not t.internal}


def load_task(name: str) -> Task:
    for d in task_dirs():
        path = d / f"{name}.yaml"
        if path.is_file():
            return Task.from_file(path)
    raise TaskError(f"unknown task {name!r}; tasks: {', '.join(list_tasks())}")


def pick_language(brief: str, lang: str | None = None, form: str | None = None) -> str:
    """--lang if given; Chinese for a Chinese form or a brief written in Chinese; else English."""
    if lang:
        if lang not in LANGS:
            raise TaskError(f"--lang must be one of {', '.join(LANGS)}, got {lang!r}")
        return lang
    return "zh" if (form and has_han(form)) or has_han(brief) else "en"


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


def render(task: Task, brief: str, variables: dict | None = None, chat: bool = True, lang: str = "en"):
    """The prompt for `task`: chat messages (instruct models) or a completion string (base
    models), and the stop strings that go with it."""
    from jinja2 import TemplateError, UndefinedError

    prompt = task.prompts.get(lang) or next(iter(task.prompts.values()))
    values = {k: spec.get("default") if isinstance(spec, dict) else spec for k, spec in task.variables.items()}
    values.update(variables or {})
    values.update(brief=brief, brief_lang="zh" if has_han(brief) else "en", lang=lang)
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise TaskError(f"task {task.name!r} needs variable(s) {', '.join(missing)}: pass "
                        + " ".join(f"--var {k}=..." for k in missing))
    env = _environment()
    try:
        if chat:
            messages = []
            if prompt.instruct.get("system"):
                messages.append({"role": "system", "content": env.from_string(prompt.instruct["system"]).render(values).strip()})
            messages.append({"role": "user", "content": env.from_string(prompt.instruct["user"]).render(values).strip()})
            return messages, []
        return env.from_string(prompt.base).render(values), list(prompt.stop)
    except UndefinedError as e:
        raise TaskError(f"task {task.name!r}: {e.message}; pass it with --var NAME=VALUE") from None
    except TemplateError as e:
        raise TaskError(f"task {task.name!r}: template error: {e}") from None


@dataclass
class WriteRequest:
    """Everything `write` needs besides the model; the CLI and the server fill it in."""

    task: str
    brief: str
    variables: dict = field(default_factory=dict)
    lang: str | None = None
    form: str | None = None
    n: int = 1
    overrides: dict = field(default_factory=dict)  # sampling settings
    banned_phrases: list[str] | None = None  # None: BANNED_PHRASES; [] allows all


def prepare_write(llm, req: WriteRequest):
    """(prompt, SamplingParams, stop strings, form) for a request: template, language, form
    constraint, banned phrases and the task's sampling presets, in that order of precedence
    (the request's overrides win)."""
    from llmos.writing import forms

    task = load_task(req.task)
    lang = pick_language(req.brief, req.lang, req.form)
    variables = dict(req.variables)
    form = None
    if req.form:
        form = forms.get_form(req.form)
        variables["form"] = form.name
    elif "form" in variables and variables["form"] in forms.FORMS:
        form = forms.get_form(variables["form"])
    local = llm.tokenizer is not None  # a remote model has no tokenizer here, and chats
    chat = llm.tokenizer.has_chat_template if local else True
    prompt, stops = render(task, req.brief, variables, chat=chat, lang=lang)
    settings = {**task.params, **{k: v for k, v in req.overrides.items() if v is not None}}
    phrases = BANNED_PHRASES if req.banned_phrases is None else req.banned_phrases
    if local:
        settings["banned_sequences"] = banned_sequences(llm.tokenizer, phrases)
    if form is not None and not local:
        raise forms.FormError("forms are kept by masking tokens, which needs a local model (-m with a local name)")
    if form is not None:
        from llmos.writing.tokens import token_table

        settings["constraint"] = forms.make_constraint(form, token_table(llm.tokenizer), llm.model.config.vocab_size,
                                                       variables)
        settings["max_tokens"] = max(settings.get("max_tokens", 0), form.token_budget(forms.form_options(form, variables)))
        settings["banned_sequences"] = []  # the form's machine decides what may be written
        stops = []
    return prompt, llm.sampling(**settings), stops, form


def truthy(value) -> bool | None:
    if value is None:
        return None
    return str(value).lower() in ("1", "true", "yes", "on")


def banned_sequences(tokenizer, phrases: list[str]) -> list[list[int]]:
    """Each phrase as the model would spell it: with and without a leading space, and capitalised."""
    seqs = []
    for phrase in phrases:
        for form in {phrase, " " + phrase, phrase[:1].upper() + phrase[1:], " " + phrase[:1].upper() + phrase[1:]}:
            ids = tokenizer.encode(form, add_bos=False)
            if ids and ids not in seqs:
                seqs.append(ids)
    return seqs


def write(llm, req: WriteRequest, result=None) -> Iterator:
    """Stream the writing (deltas, as LLM.stream yields them)."""
    prompt, params, stops, _ = prepare_write(llm, req)
    return llm.stream(prompt, params, n=req.n, stop=stops, result=result)
