"""`llmos write | tasks | forms | story`: thin commands over llmos.writing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmos.cli.common import (BannedFileOpt, BannedRegexOpt, BannedStringsOpt, CheckCopyingOpt, CopyAgainstOpt,
                              ModelOpt, PrecisionOpt, SafetyOpt, SamplerOrderOpt, SlopOpt, TfsOpt, TopAOpt,
                              XtcProbabilityOpt, XtcThresholdOpt, attach_safety, banned_strings, copy_index_for, err,
                              fail, load_llm, out, parse_vars, print_copying, result_json, run_stream, sampler_order)


TonesOpt = Annotated[Optional[str], typer.Option(
    "--tones", help="Chinese forms: strict (the tonal template, 一三五不论 without 孤平 or 三平尾), loose "
                    "(2nd/4th/6th and last characters only) or off. Default: strict; off for 藏头诗.")]
BookOpt = Annotated[Optional[str], typer.Option(
    "--rhyme-book", help="Chinese forms: pingshui (平水韵, the default) or xinyun (中华新韵, modern readings).")]


def write(
    task: Annotated[str, typer.Argument(help="What to write (see `llmos tasks`): story, poem, rewrite, novel, ...")],
    brief: Annotated[str, typer.Argument(help="What it is about (the text itself for continue/expand/shorten/rewrite/translate; '-' reads stdin).")],
    model: ModelOpt = None,
    lang: Annotated[Optional[str], typer.Option(help="en or zh (default: from the brief; Chinese uses the multilingual model).")] = None,
    form: Annotated[Optional[str], typer.Option(help="A form kept by constrained decoding (see `llmos forms`), e.g. sonnet, haiku, 五言绝句.")] = None,
    var: Annotated[list[str], typer.Option("--var", help="A template variable KEY=VALUE (repeatable): acrostic=春夏秋冬, rhyme=true, n=5, to=zh ...")] = [],
    n: Annotated[int, typer.Option("-n", help="Number of candidates, generated in one batch.")] = 1,
    rank: Annotated[bool, typer.Option(help="Order candidates by likelihood, form, repetition and distinctness (see docs/writing.md). "
                                            "`--rank style:RUN` (the same as --rank-style RUN) adds closeness to the style a multi-task RUN learned.")] = False,
    style: Annotated[Optional[str], typer.Option("--rank-style", help="Rank by closeness to the style of this model "
                                                 "(trained with --objective multitask); the same as --rank style:RUN.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="0 = greedy.")] = None,
    top_p: Annotated[Optional[float], typer.Option()] = None,
    dry: Annotated[Optional[float], typer.Option(help="DRY repetition penalty strength (0.8 is typical; 0 = off).")] = None,
    allow_phrases: Annotated[bool, typer.Option(help="Do not ban stock phrases such as 'a testament to'.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Make the text reproducible.")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens below min_p x the top token's probability (0 = off).")] = None,
    top_a: TopAOpt = None,
    tfs: TfsOpt = None,
    xtc_threshold: XtcThresholdOpt = None,
    xtc_probability: XtcProbabilityOpt = None,
    order: SamplerOrderOpt = None,
    banned: BannedStringsOpt = [],
    banned_file: BannedFileOpt = None,
    slop: SlopOpt = None,
    banned_regex: BannedRegexOpt = False,
    chapters: Annotated[int, typer.Option(help="novel: number of chapters.")] = 5,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="novel: the book folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    precision: PrecisionOpt = "auto",
    tones: TonesOpt = None,
    rhyme_book: BookOpt = None,
    safety: SafetyOpt = "default",
    check_copying: CheckCopyingOpt = False,
    copy_against: CopyAgainstOpt = None,
    pick: Annotated[Optional[str], typer.Option(help="With -n 2 or more: the candidate you keep (1..n), or 'ask' to choose "
                                                     "after reading them; stored as preference pairs (`llmos prefs`) "
                                                     "for `llmos finetune --dpo`.")] = None,
):
    """Write with a task's own prompts and settings, in English or Chinese.

    Examples:

      llmos write poem "the sea at night"

      llmos write poem "autumn rain" --form haiku -n 4 --rank --seed 1

      llmos write story "a lighthouse keeper" -n 4 --rank style:runs/mystyle

      llmos write poem 春天 --form 藏头诗 --var acrostic=春夏秋冬

      llmos write slogan "a bakery by the sea" -n 4 --pick ask

      llmos write rewrite "me and him goes to the market yesterday"

      llmos write story "a storm at sea" --slop en --xtc-probability 0.5

      llmos write novel "a city where it never rains" --chapters 5 -o book/
    """
    from llmos.llm import Result
    from llmos.writing import forms as form_lib
    from llmos.writing.results import after_generation
    from llmos.weights.store import model_for
    from llmos.writing.tasks import TaskError, WriteRequest, pick_language, prepare_write

    if brief == "-":
        brief = sys.stdin.read()
    variables = parse_vars(var)
    variables.update({k: v for k, v in {"tones": tones, "book": rhyme_book}.items() if v})
    try:
        language = pick_language(brief, lang, form)
    except TaskError as e:
        fail(str(e))
    model = model_for(model, language=language)
    if task == "novel":
        return _novel(brief, chapters, output, model, language, seed, precision, safety)
    if n < 1:
        fail("-n must be at least 1")
    bans = banned_strings(banned, banned_file, slop, banned_regex)
    kept = _check_pick(pick, n)
    if style:
        rank = f"style:{style}"
        from llmos.writing.rank import check_style_model

        try:
            check_style_model(style)
        except ValueError as e:  # ModelError is one
            fail(str(e))
    req = WriteRequest(task, brief, variables, language, form, n,
                       dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            dry_multiplier=dry, logprobs=0 if rank else None, min_p=min_p, top_a=top_a, tfs=tfs,
                            xtc_threshold=xtc_threshold, xtc_probability=xtc_probability,
                            sampler_order=sampler_order(order)),
                       [] if allow_phrases else None)
    llm = attach_safety(load_llm(model, precision), safety)
    copying = copy_index_for(llm, check_copying, copy_against)
    result = Result("", 0, [])
    try:
        prompt, params, stops, chosen_form = prepare_write(llm, req)
        if bans and llm.tokenizer is None:
            fail("banned strings need a local model (-m with a local name)")
        extra = dict(banned_strings=bans, banned_regex=banned_regex) if bans else {}
        stream = llm.stream(prompt, params, n=n, stop=stops, result=result, **extra)
        first = next(stream, None)
    except (TaskError, form_lib.FormError, ValueError) as e:
        fail(str(e))

    def chained():
        if first is not None:
            yield first
        yield from stream

    quiet = as_json or task in ("rewrite", "brainstorm") or rank
    run_stream(llm, chained(), n, result, as_json=False, silent=quiet)
    extra = after_generation(task, brief, variables, result.completions, chosen_form, rank, copying)
    if pick is not None:
        extra["pick"] = _record_pick(llm, prompt, result.completions, kept, dict(task=task, brief=brief))
    if as_json:
        print(json.dumps({**result_json(llm, result), **extra}, ensure_ascii=False, indent=2))
    else:
        _print_after(extra, result.completions, variables)
        if "copying" in extra:
            print_copying(extra["copying"])


def _check_pick(pick: str | None, n: int) -> int | None:
    """--pick's candidate as an index (None for 'ask' or no pick); a bad value fails before writing."""
    if pick is None or pick == "ask":
        if pick == "ask" and n < 2:
            fail("--pick chooses among candidates: add -n 2 or more")
        return None
    if n < 2:
        fail("--pick chooses among candidates: add -n 2 or more")
    if not pick.isdigit() or not 1 <= int(pick) <= n:
        fail(f"--pick takes a candidate number from 1 to {n}, or 'ask'; got {pick!r}")
    return int(pick) - 1


def _record_pick(llm, prompt, completions, kept: int | None, meta: dict) -> dict:
    """The writer's pick among the candidates, stored as preference pairs over the others."""
    from llmos.data.prefs import Preferences
    from llmos.db import Store

    texts = [c.text for c in sorted(completions, key=lambda c: c.index)]
    if kept is None:  # --pick ask: after the candidates are on screen
        err.print(f"Keep which candidate? [1-{len(texts)}, Enter: none] ", end="")
        answer = sys.stdin.readline().strip()
        if not answer:
            return {"kept": None, "pairs": 0}
        if not answer.isdigit() or not 1 <= int(answer) <= len(texts):
            fail(f"a candidate number from 1 to {len(texts)}, got {answer!r}; nothing stored")
        kept = int(answer) - 1
    added = Preferences(Store()).record_choice(prompt, texts, kept=kept, source="write-pick", model=llm.name, meta=meta)
    err.print(f"kept candidate {kept + 1}: {added} preference pair(s) stored (`llmos prefs list`)", highlight=False)
    return {"kept": kept, "pairs": added}


def _print_after(extra: dict, completions, variables: dict):
    """The human view of after_generation's ranking, revision, ideas and form check."""
    if "ranking" in extra:
        texts = {c.index: c.text for c in completions}
        for pos, r in enumerate(extra["ranking"], 1):
            parts = {k: v for k, v in r.items() if k not in ("index", "score")}
            detail = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
            out.print(f"--- #{pos}: candidate {r['index'] + 1}, score {r['score']:.2f} ({detail}) ---", highlight=False)
            out.print(texts[r["index"]], highlight=False, markup=False)
    if "revision" in extra:
        from rich.text import Text

        revision = extra["revision"]
        out.print("[bold]Revised[/]")
        out.print(revision["revised"], highlight=False, markup=False)
        if revision["suggestions"]:
            out.print("\n[bold]Suggestions[/]")
            for s in revision["suggestions"]:
                out.print(f"- {s}", highlight=False, markup=False)
        line = Text()
        for op, piece in revision["diff"]:
            line.append(piece, style={"-": "red strike", "+": "green", " ": ""}[op])
        out.print("\n[bold]Changes[/]")
        out.print(line)
    if "ideas" in extra:
        from llmos.writing.results import idea_limit

        ideas, limit = extra["ideas"], idea_limit(variables)
        for i, idea in enumerate(ideas, 1):
            out.print(f"{i}. {idea}", highlight=False, markup=False)
        if len(ideas) < limit:
            err.print(f"[yellow]note:[/] {len(ideas)} distinct ideas out of {limit} asked; try -n 2 for more")
    if "form" in extra:
        bad = [i + 1 for i, p in enumerate(extra["form"]["problems"]) if p]
        err.print(f"[dim]form {extra['form']['name']}: " + ("kept by every candidate" if not bad else f"broken in {bad}") + "[/]")


def _novel(brief, chapters, output, model, language, seed, precision, safety):
    from llmos.writing.novel import Novel, NovelError

    if output is None:
        fail("novel needs -o BOOK_FOLDER (where each stage is saved as an editable file)")
    llm = attach_safety(load_llm(model, precision), safety)
    try:
        book = Novel(llm, output, brief, chapters, language, seed,
                     on_stage=lambda what, path: err.print(f"writing {what} -> {path}", highlight=False))
        stages = book.run()
    except (NovelError, ValueError) as e:
        fail(str(e))
    made = sum(s.generated for s in stages)
    err.print(f"[green]done:[/] {made} stage(s) written, {len(stages) - made} kept as they were, in {output}")


def tasks(as_json: Annotated[bool, typer.Option("--json")] = False):
    """List the writing tasks (built in, and your own in $LLMOS_HOME/templates)."""
    from rich.table import Table

    from llmos.writing import TaskError, list_tasks

    try:
        found = list_tasks()
    except TaskError as e:
        fail(str(e))
    if as_json:
        print(json.dumps({k: {"description": t.description, "languages": list(t.prompts), "variables": list(t.variables)}
                          for k, t in found.items()}, ensure_ascii=False, indent=2))
        return
    table = Table("task", "description", "languages", "variables")
    for name, t in found.items():
        table.add_row(name, t.description, ", ".join(t.prompts), ", ".join(t.variables) or "-")
    out.print(table)


def list_forms():
    """List the forms that `llmos write --form` keeps by constrained decoding."""
    from rich.table import Table

    from llmos.writing.forms import FORMS

    table = Table("form", "kind", "shape")
    for f in FORMS.values():
        table.add_row(f.name, {"han": "Chinese", "verse": "English", "limit": "length", "ci": "Chinese 词"}[f.kind], f.description)
    out.print(table)


def check_poem(
    file: Annotated[str, typer.Argument(help="The poem: a text file, or '-' for stdin. Chinese lines may share one line of text.")],
    form: Annotated[Optional[str], typer.Option(help="The form to check against (see `llmos forms`); default: told from the poem's shape.")] = None,
    tones: TonesOpt = None,
    rhyme_book: BookOpt = None,
    var: Annotated[list[str], typer.Option("--var", help="A form variable KEY=VALUE (repeatable): acrostic=春夏秋冬, rhyme=false ...")] = [],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Check your own poem against a form: which lines break which rule (tones, rhyme, length).

    Exit status: 0 when the poem keeps the form, 1 when it breaks a rule, 2 for bad input.

    Examples:

      llmos check-poem poem.txt

      echo "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。" | llmos check-poem -

      llmos check-poem ci.txt --form 词:浣溪沙 --tones loose
    """
    from llmos.writing import forms

    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read {file}: {e}")
    variables = {**parse_vars(var), **({"tones": tones} if tones else {}), **({"book": rhyme_book} if rhyme_book else {})}
    try:
        report = forms.check_poem(text, form, variables)
    except forms.FormError as e:
        fail(str(e))
    if as_json:
        out.print_json(json.dumps(report, ensure_ascii=False))
    elif report["ok"]:
        out.print(f"keeps the form {report['form']}")
    else:
        out.print(f"{report['form']}: {len(report['problems'])} problem(s)")
        for p in report["problems"]:
            out.print(f"  {p['message']}", markup=False, highlight=False)
    raise typer.Exit(0 if report["ok"] else 1)


story_app = typer.Typer(help="Story mode: a story file with Memory, Author's Note and Lorebook.", no_args_is_help=True)


def _load_story(path: Path):
    from llmos.writing.story import Story, StoryError

    try:
        return Story.load(path)
    except StoryError as e:
        fail(str(e))


@story_app.command("new")
def story_new(
    path: Annotated[Path, typer.Argument(help="The story file (JSON) to create.")],
    title: Annotated[str, typer.Option()] = "",
    text: Annotated[str, typer.Option(help="The opening text.")] = "",
    memory: Annotated[str, typer.Option(help="Always in context: premise, style, main characters.")] = "",
    note: Annotated[str, typer.Option("--note", help="Author's Note: steers the next few lines.")] = "",
    note_depth: Annotated[int, typer.Option(help="Lines before the end where the Author's Note goes.")] = 3,
    model: ModelOpt = None,
    force: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
):
    """Create a story file."""
    from llmos.writing.story import Story

    if path.exists() and not force:
        fail(f"{path} exists; use `llmos story continue {path}`, or --force to replace it")
    Story(title=title, text=text, memory=memory, authors_note=note, authors_note_depth=note_depth,
          model=model).save(path, allow_shorter=force)
    err.print(f"[green]created[/] {path}", highlight=False)


@story_app.command("continue")
def story_continue(
    path: Annotated[Path, typer.Argument(help="The story file.")],
    model: ModelOpt = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens")] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    show_context: Annotated[bool, typer.Option(help="Print exactly what is sent to the model, and why.")] = False,
    precision: PrecisionOpt = "auto",
    safety: SafetyOpt = "default",
    xtc_threshold: XtcThresholdOpt = None,
    xtc_probability: XtcProbabilityOpt = None,
    banned: BannedStringsOpt = [],
    banned_file: BannedFileOpt = None,
    slop: SlopOpt = None,
    banned_regex: BannedRegexOpt = False,
):
    """Continue the story, append the new text to the file (the previous version is kept as .bak).
    The sampler options override the story's own settings for this continuation."""
    from llmos.llm import Result
    from llmos.writing.story import StoryError, assemble_context, continue_story

    story = _load_story(path)
    llm = attach_safety(load_llm(_story_model(model, story), precision), safety)
    if show_context:
        try:
            prompt, parts = assemble_context(story, llm.tokenizer, llm.context_window,
                                             max_tokens or story.sampler.get("max_tokens", 120))
        except StoryError as e:
            fail(str(e))
        _print_context(parts)
    result = Result("", 0, [])
    try:
        stream = continue_story(llm, story, max_tokens=max_tokens, seed=seed, result=result,
                                sampler=dict(xtc_threshold=xtc_threshold, xtc_probability=xtc_probability),
                                banned_strings=banned_strings(banned, banned_file, slop, banned_regex),
                                banned_regex=banned_regex)
        pieces = []
        for delta in stream:
            pieces.append(delta.text)
            out.print(delta.text, end="", highlight=False, markup=False, soft_wrap=True)
        out.print()
    except KeyboardInterrupt:
        err.print("[yellow]stopped[/]; the story file is unchanged")
        raise typer.Exit(130)
    except (StoryError, ValueError) as e:
        fail(str(e))
    story.text += "".join(pieces)
    story.save(path)


def _story_model(model: str | None, story) -> str | None:
    """The model named, else the story's own, else by its language (Chinese: the multilingual model)."""
    from llmos.weights.store import model_for

    return model_for(model or story.model, story.text, story.memory)


def _print_context(parts):
    from rich.panel import Panel

    for p in parts:
        style = "dim" if p.kind == "lore-skipped" else ""
        err.print(Panel(p.text if p.kind != "lore-skipped" else "(not sent)", title=f"{p.kind} · {p.tokens} tokens",
                        subtitle=p.reason, title_align="left", subtitle_align="left", style=style))


@story_app.command("show")
def story_show(
    path: Annotated[Path, typer.Argument()],
    context: Annotated[bool, typer.Option(help="Also show the context a continuation would send (for the default model).")] = False,
    model: ModelOpt = None,
):
    """Show a story: its text, Memory, Author's Note and Lorebook."""
    story = _load_story(path)
    out.print(f"[bold]{story.title or path.stem}[/]")
    out.print(story.text, highlight=False, markup=False)
    err.print(f"\nMemory: {story.memory or '-'}\nAuthor's Note ({story.authors_note_depth} lines from the end): "
              f"{story.authors_note or '-'}\nLorebook: {len(story.lorebook)} entries, budget {story.lore_budget} tokens",
              highlight=False)
    for e in story.lorebook:
        err.print(f"  [{', '.join(e.keys) or 'constant'}] priority {e.priority}: {e.content[:80]}", highlight=False)
    if context:
        from llmos.writing.story import assemble_context

        llm = load_llm(_story_model(model, story), "fp32")
        _, parts = assemble_context(story, llm.tokenizer, llm.context_window, story.sampler.get("max_tokens", 120))
        _print_context(parts)


@story_app.command("lore")
def story_lore(
    path: Annotated[Path, typer.Argument()],
    keys: Annotated[str, typer.Option(help="Comma-separated keywords that bring the entry into context.")],
    content: Annotated[str, typer.Option(help="What the model should know.")],
    priority: Annotated[int, typer.Option(help="Higher is kept first when the budget is tight.")] = 100,
    name: Annotated[str, typer.Option()] = "",
):
    """Add a Lorebook entry."""
    from llmos.writing.story import LoreEntry

    story = _load_story(path)
    story.lorebook.append(LoreEntry([k.strip() for k in keys.split(",") if k.strip()], content, priority, name=name))
    story.save(path)
    err.print(f"[green]added[/] lore entry ({len(story.lorebook)} in all)")


@story_app.command("import")
def story_import(
    path: Annotated[Path, typer.Argument(help="The story file (created if missing).")],
    card: Annotated[Path, typer.Argument(help="A character card (V1/V2/V3: JSON, PNG or CHARX) or a lorebook "
                                               "(SillyTavern World Info, character_book or NovelAI .lorebook).")],
):
    """Import a character card or a lorebook into a story: the card's description into Memory, its
    lorebook (or the lorebook file's entries) into the Lorebook."""
    from llmos.cards import CardError, read_card
    from llmos.writing.story import Story, StoryError

    try:
        c = read_card(card)
        story = _load_story(path) if path.exists() else Story()
        before = len(story.lorebook)
        story.add_card(c)
    except (CardError, StoryError) as e:
        fail(str(e))
    story.save(path)
    err.print(f"[green]imported[/] {c.name}: {len(story.lorebook) - before} lore entries", highlight=False)


@story_app.command("lore-export")
def story_lore_export(
    path: Annotated[Path, typer.Argument(help="The story file.")],
    output: Annotated[Path, typer.Argument(help="The lorebook file to write.")],
    format: Annotated[str, typer.Option("--format", "-f", help="world_info (SillyTavern), character_book or novelai.")] = "world_info",
):
    """Export a story's Lorebook as SillyTavern World Info, a card's character_book or a NovelAI
    .lorebook."""
    import json

    from llmos.writing.lorebook import LorebookError, write_entries

    story = _load_story(path)
    try:
        data = write_entries(story.lorebook, format, story.title)
    except LorebookError as e:
        fail(str(e))
    output.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    err.print(f"wrote {output}: {len(story.lorebook)} entries ({format})", highlight=False)
