"""`llmos prefs list|stats|export|import|delete`: the preference pairs collected in the store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmos.cli.common import err, fail, out

prefs_app = typer.Typer(help="Preference pairs (prompt, chosen, rejected) collected from chat ratings and retries, "
                             "the studio and `llmos write --pick`, for `llmos finetune --dpo`.",
                        no_args_is_help=True)

SourceOpt = Annotated[Optional[str], typer.Option("--source", help="Only pairs of this source (see `llmos prefs stats`).")]


def _prefs():
    from llmos.data.prefs import Preferences
    from llmos.db import Store, StoreError

    try:
        return Preferences(Store())
    except StoreError as e:
        fail(str(e))


def _check_source(source: str | None):
    from llmos.data.prefs import SOURCES

    if source is not None and source not in SOURCES:
        fail(f"unknown source {source!r}; sources: {', '.join(SOURCES)}")


def _short(value, width: int = 48) -> str:
    text = value if isinstance(value, str) else " | ".join(f"{m['role']}: {m['content']}" for m in value[-2:])
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@prefs_app.command("list")
def list_pairs(
    source: SourceOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="Show at most this many (the oldest first).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line (as `export` writes).")] = False,
):
    """The pairs collected, oldest first: prompt, the answer preferred and the one not."""
    _check_source(source)
    pairs = _prefs().list(source, limit)
    if as_json:
        for p in pairs:
            print(json.dumps(p.as_dict(), ensure_ascii=False))
        return
    if not pairs:
        err.print("no preference pairs yet: rate chat replies (/rate), /retry and go on, keep a candidate in the "
                  "studio, `llmos write -n 4 --pick ask`, or `llmos prefs import FILE.jsonl`")
        return
    from rich.table import Table

    table = Table("id", "source", "prompt", "chosen", "rejected", title=f"{len(pairs)} preference pair(s)")
    for p in pairs:
        table.add_row(str(p.id), p.source, _short(p.prompt, 40), _short(p.chosen), _short(p.rejected))
    out.print(table)


@prefs_app.command()
def stats(as_json: Annotated[bool, typer.Option("--json")] = False):
    """How many pairs each source gave, over how many prompts, and their answers' lengths."""
    rows = _prefs().stats()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    from llmos.data.prefs import SOURCES

    table = Table("source", "pairs", "prompts", "chosen chars", "rejected chars", "last", "what it is",
                  title="preference pairs")
    for r in rows:
        table.add_row(r["source"], str(r["pairs"]), str(r["prompts"]), f"{r['chosen_chars']:.0f}",
                      f"{r['rejected_chars']:.0f}", time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last"])),
                      SOURCES.get(r["source"], ""))
    table.add_row("all", str(sum(r["pairs"] for r in rows)), "", "", "", "", "")
    out.print(table)


@prefs_app.command()
def export(
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="JSONL file to write (default: stdout).")] = None,
    source: SourceOpt = None,
):
    """Write the pairs as JSONL ({prompt, chosen, rejected, source, model, meta}): the shape
    `llmos prefs import` and `llmos finetune --dpo FILE` read."""
    _check_source(source)
    prefs = _prefs()
    if output is None:
        print(prefs.export(source=source), end="")
        return
    try:
        n = prefs.export(output, source)
    except OSError as e:
        fail(f"cannot write {output}: {e}")
    err.print(f"[green]exported[/] {n} pair(s) to {output}", highlight=False)


@prefs_app.command("import")
def import_pairs(file: Annotated[Path, typer.Argument(help="JSONL: one {\"prompt\", \"chosen\", \"rejected\"} per line; "
                                                           "the prompt a string or chat messages.")]):
    """Add the pairs of a JSONL file to the store: all of them, or none when a line is bad.
    Pairs already stored are skipped."""
    from llmos.data.prefs import PrefsError

    try:
        added, total = _prefs().import_jsonl(file)
    except PrefsError as e:
        fail(str(e))
    err.print(f"[green]imported[/] {added} new pair(s) of {total} in {file}", highlight=False)


@prefs_app.command()
def delete(ids: Annotated[list[int], typer.Argument(help="Pair ids (see `llmos prefs list`).")]):
    """Delete pairs by id."""
    n = _prefs().delete(ids)
    if n < len(ids):
        fail(f"deleted {n} of {len(ids)}: the others are not stored")
    err.print(f"deleted {n} pair(s)")
