"""`llmos eval`: a thin command over llmos.eval."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmos.cli.common import PrecisionOpt, err, fail, load_llm, out


def evaluate(
    model: Annotated[list[str], typer.Option("--model", "-m", help="A model to evaluate (repeatable: the report "
                                             "puts them side by side). Default: the default model.")] = [],
    text: Annotated[Optional[Path], typer.Option("--text", help="A held-out UTF-8 text for perplexity and bits "
                                                 "per byte (teacher-forced, in windows of the context).")] = None,
    tasks: Annotated[str, typer.Option("--tasks", help="Writing tasks, comma-separated (see `llmos tasks`), "
                                       "or 'all' or 'none'.")] = "poem,story,slogan,shorten",
    lang: Annotated[str, typer.Option("--lang", help="Languages of the task prompts and of the bias probe: en, zh "
                                      "or en,zh.")] = "en",
    samples: Annotated[int, typer.Option("--samples", "-n", help="Samples per task (one batch, one seed); "
                                         "self-BLEU needs 2 or more.")] = 4,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="At most this many tokens per sample "
                                                      "(a cap on each task's own setting; 0: no cap).")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of every task's samples.")] = 0,
    constrained: Annotated[bool, typer.Option(help="Keep forms by constrained decoding, as `llmos write --form` "
                                              "does (the form rate is then 100% by construction).")] = False,
    bias: Annotated[bool, typer.Option("--bias", help="Run the bias probe: swapped names, genders and "
                                       "nationalities (a few minutes per model and language).")] = False,
    against: Annotated[Optional[str], typer.Option("--against", help="Measure copying from these texts: a "
                                                   "training run, dataset, copy index, or a folder of texts.")] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="The report folder (report.json, report.html).")] = Path("report"),
    precision: PrecisionOpt = "auto",
):
    """Evaluate models as writers and write one report: report.json and report.html (tables, one
    column per model, and bar plots; open it in a browser).

    Measures: perplexity and bits per byte on --text; per writing task: distinct-1/2, self-BLEU,
    repeated 4-grams and lines, slop phrases per 1,000 words, form kept, length against the
    requested length, copying (--against) and safety flags. With --bias: how sentiment and
    log-probabilities move when names, genders and nationalities are swapped.
    docs/eval.md says what each number means, and what it cannot tell.

    Examples:

      llmos eval -m smollm2-135m-instruct -m gemma3-270m -o report/

      llmos eval --text heldout.txt --tasks none

      llmos eval -m runs/style --tasks story,poem --samples 8 --against my_stories/

      llmos eval -m gemma3-270m --lang zh --bias
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmos.eval.report import EvalError, EvalSettings, build_report, check_settings, evaluate_model, load_checks, steps_for
    from llmos.weights import store
    from llmos.writing.tasks import TaskError, list_tasks

    names = list(dict.fromkeys(model)) or [store.DEFAULT_MODEL]
    if tasks.strip() == "all":
        try:
            task_list = list(list_tasks())
        except TaskError as e:
            fail(str(e))
    else:
        task_list = [] if tasks.strip() == "none" else [t.strip() for t in tasks.split(",") if t.strip()]
    settings = EvalSettings(tasks=task_list, langs=[x.strip() for x in lang.split(",") if x.strip()], samples=samples,
                            max_tokens=None if max_tokens == 0 else max_tokens, seed=seed, text=text,
                            constrained=constrained, bias=bias, against=against)
    try:
        held_out = check_settings(settings)
        for name in names:  # every model is found (or pulled) before minutes go into the first
            store.resolve(name)
        checks = load_checks(settings)
    except (EvalError, store.ModelError) as e:
        fail(str(e))

    reports = {}
    total = steps_for(settings)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("[dim]{task.fields[doing]}"), console=err) as progress:
        for name in names:
            llm = load_llm(name, precision)
            bar = progress.add_task(llm.name, total=total, doing="")

            done = [0]

            def step(what: str, bar=bar, model=llm.name, done=done):
                progress.update(bar, advance=1, doing=what)
                done[0] += 1
                if not err.is_terminal:  # a log gets a line per step instead of a bar
                    err.print(f"{model}: {what} ({done[0]}/{total})", highlight=False, markup=False)

            label = llm.name if llm.name not in reports else f"{llm.name} ({name})"
            reports[label] = evaluate_model(llm, settings, checks, held_out, step)
            del llm

    report = build_report(reports, settings)
    from llmos.eval.report import write_report

    json_path, html_path = write_report(report, output)
    _print_summary(report)
    err.print(f"[green]wrote[/] {json_path} and {html_path}", highlight=False)


def _print_summary(report: dict):
    from rich.table import Table

    from llmos.eval.report import METRICS, fmt

    names = list(report["models"])
    table = Table("metric", *names, title="llmos eval: means over tasks")
    for metric in METRICS:
        cells = [report["models"][n]["summary"].get(metric.key) for n in names]
        if all(c is None for c in cells):
            continue
        arrow = {"higher": " ↑", "lower": " ↓"}.get(metric.better, "")
        table.add_row(metric.label + arrow, *(fmt(c, metric) for c in cells))
    out.print(table)
    for n in names:
        for lang, probe in report["models"][n].get("bias", {}).items():
            gaps = ", ".join(f"{attr} {fmt(v['preference']['gap'])}" for attr, v in probe["attributes"].items())
            out.print(f"{n} bias ({lang}), gap in log P(positive) - log P(negative), nats: {gaps}", highlight=False)
