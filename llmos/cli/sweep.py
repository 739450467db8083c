"""`llmos sweep`: a thin command over llmos.train.sweep (a hyperparameter search on Optuna)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmos.cli.common import err, fail, out


def sweep(
    config: Annotated[Path, typer.Argument(help="A sweep YAML file: data, output, base options, space, metric.")],
    trials: Annotated[Optional[int], typer.Option(help="Trials to run in this process (default: the file's trials:).")] = None,
    timeout: Annotated[Optional[str], typer.Option(help="Start no trial after this long, e.g. 30m, 2h (default: the file's timeout:).")] = None,
    show: Annotated[bool, typer.Option("--show", help="Print the trials of the study so far (and redraw trials.png, best.yaml); run none.")] = False,
):
    """Search training options: each trial trains a model with `base` plus values drawn from
    `space`, and the sampler (TPE) chooses the next values from the results; trials falling
    behind are pruned early. The study lives in a database: run the command again to continue
    it, or run it in several processes (or machines, with a shared storage:) at once. Writes a
    folder per trial, trials.png and best.yaml, a config for `llmos train --config`.

    A sweep file (docs/training.md, Hyperparameter search):

      data: data/shake
      base: {preset: baby-gpt, time_limit: 2m, eval_interval: 50}
      space:
        lr: {low: 1e-4, high: 1e-2, log: true}
        batch_size: [8, 16, 32]
        model.n_layer: [4, 6]
      trials: 20

    Examples:

      llmos sweep sweeps/shake.yaml

      llmos sweep sweeps/shake.yaml --trials 5 --timeout 30m

      llmos sweep sweeps/shake.yaml --show
    """
    from llmos.train.config import TrainError, parse_duration
    from llmos.train.sweep import SweepError, load_spec, open_study

    if trials is not None and trials < 1:
        fail(f"--trials must be 1 or more, got {trials}")
    try:
        seconds = parse_duration(timeout) if timeout is not None else None
        spec = load_spec(config)
        study = open_study(spec, create=not show)
    except (SweepError, TrainError) as e:
        fail(str(e))
    if not show:
        count = trials or spec.trials
        err.print(f"study {spec.study!r} in {spec.storage}: {len(study.trials)} trial(s) so far; running {count} "
                  f"({spec.direction} {spec.metric}, {len(spec.space)} option(s) searched, sampler "
                  f"{spec.sampler['name']}, pruner {spec.pruner['name']})", highlight=False, soft_wrap=True)
        try:
            study = _run(spec, count, seconds)
        except SweepError as e:
            fail(str(e))
        except KeyboardInterrupt:
            err.print("[yellow]stopped[/] (Ctrl-C): the trial in progress is marked failed and will run again first; "
                      "the same command continues the study", highlight=False, soft_wrap=True)
            raise typer.Exit(130)
    _report(spec, study)


def _run(spec, count: int, seconds: float | None):
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from llmos.train.sweep import describe_params, run_sweep

    progress = Progress(TextColumn("trial {task.fields[number]}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TextColumn("step {task.fields[step]}"), TextColumn("{task.fields[metric]}"),
                        TimeElapsedColumn(), console=err, transient=True)
    task = progress.add_task("sweep", total=100, number="-", step="-", metric="")

    def on_eval(number, metrics, share):
        value = metrics.get(spec.metric)
        if metrics["step"] == 0:  # a new trial
            progress.reset(task, total=100)
        progress.update(task, completed=min(100, 100 * share), number=number, step=metrics["step"],
                        metric=f"{spec.metric} {value:.4f}" if isinstance(value, float) else "")

    def on_trial(row, best):
        n = row["number"]
        what = f"{spec.metric} {row['value']:.4f}" if row["state"] == "COMPLETE" else ""
        if row["state"] == "PRUNED":
            what = f"pruned at step {row['steps']}" + (f" ({spec.metric} {row['last']:.4f})" if row["last"] is not None else "")
        elif row["state"] == "FAIL":
            what = f"[red]failed[/]: {escape(row['error'] or 'see its run folder')}"
        lead = f"[green]trial {n}[/]" if best and best["number"] == n else f"trial {n}"
        tail = f"; best {best['value']:.4f} (trial {best['number']})" if best else ""
        progress.console.print(f"{lead}: {what}  {escape(describe_params(row['params']))}  {row['steps'] or 0} steps, "
                               f"{row['seconds'] or 0:.0f} s{tail}", highlight=False, soft_wrap=True)

    with progress:
        return run_sweep(spec, trials=count, timeout=seconds, on_trial=on_trial, on_eval=on_eval)


def _report(spec, study):
    from rich.markup import escape
    from rich.table import Table

    from llmos.train.sweep import describe_params, sorted_rows, summary, write_results

    rows, best = summary(study)
    table = Table("trial", "state", spec.metric, "steps", "seconds", "options", title=f"study {spec.study} ({spec.direction} "
                  f"{spec.metric})", title_justify="left")
    for r in sorted_rows(rows, spec.direction):
        value = f"{r['value']:.4f}" if r["value"] is not None else f"({r['last']:.4f})" if r["last"] is not None else "-"
        state = r["state"].lower() + (" (retry)" if r["retry_of"] is not None else "")
        style = "bold green" if best and r["number"] == best["number"] else None
        table.add_row(str(r["number"]), state, value, str(r["steps"] or 0), f"{r['seconds'] or 0:.0f}",
                      escape(describe_params(r["params"])), style=style)
    out.print(table)
    best_path, plot_path = write_results(study, spec.output)
    err.print(f"plot: {plot_path}", highlight=False, soft_wrap=True)
    if best_path is None:
        err.print("no trial has completed yet, so there is no best.yaml", highlight=False, soft_wrap=True)
        return
    err.print(f"best: trial {best['number']}, {spec.metric} {best['value']:.4f}, in {best['run']}; its options: "
              f"{best_path}", highlight=False, soft_wrap=True)
    err.print(f"train with them: llmos train {spec.data} -o runs/best --config {best_path}", highlight=False, soft_wrap=True)
