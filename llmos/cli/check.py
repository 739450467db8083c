"""`llmos check`: is a text a verbatim copy of a model's training data or of a folder of texts?"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from llmos.cli.common import err, fail, out


def read_text_arg(text: str) -> str:
    """TEXT as given, the file it names, or stdin for '-'."""
    if text == "-":
        return sys.stdin.read()
    if "\n" in text or len(text) > 1024:  # a text, not a file name
        return text
    path = Path(text).expanduser()
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read {text} as UTF-8 text ({e})")
    if " " not in text and path.suffix.lower() in (".txt", ".md", ".jsonl"):
        fail(f"no such file: {text} (to check that string itself, it needs no file extension)")
    return text


def check(
    text: Annotated[str, typer.Argument(help="The text to check, a file holding it, or - to read stdin.")],
    against: Annotated[str, typer.Option("--against", "-a", help="A training run (its dataset's index), a model trained "
                                         "here, a dataset from `llmos prepare`, a copy index, or files/folders of "
                                         ".txt, .md and .jsonl texts.")],
    min_chars: Annotated[int, typer.Option(help="Report verbatim spans of at least this many characters "
                                                "(whitespace runs count as one).")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
):
    """Find verbatim copying: spans of TEXT that occur word for word (ignoring case and
    whitespace) in a model's training data or in texts you name. Prints the text with the copied
    spans marked, the longest overlap, the share of its 24-character n-grams found, and the sources.
    Exit status: 0 nothing copied above --min-chars, 1 copying found, 2 bad input.
    Paraphrase is not detected: only verbatim copies.

    Examples:

      llmos check story.txt --against runs/shake

      llmos generate "ROMEO:" -m runs/shake | llmos check - --against runs/shake --min-chars 80

      llmos check "To be, or not to be, that is the question" --against my_sources/ --json
    """
    from llmos.data.copying import CopyError, check_copying, resolve_index

    body = read_text_arg(text)
    try:
        idx = resolve_index(against)
        report = check_copying(body, idx, min_chars)
    except CopyError as e:
        fail(str(e))
    if as_json:
        print(json.dumps({**report.as_dict(), "against": against, "index": idx.describe()}, ensure_ascii=False, indent=2))
        raise typer.Exit(1 if report.copied else 0)
    if report.copied:
        sys.stdout.write(report.marked("ansi" if sys.stdout.isatty() else "brackets").rstrip("\n") + "\n\n")
        for s in report.spans:
            out.print(f"  copied {s['chars']} chars (at {s['start']}-{s['end']}) from {s['source']}", highlight=False)
    longest = report.longest
    summary = (f"longest verbatim overlap: {longest['chars']} chars from {longest['source']}" if longest
               else f"no {report.n}-character overlap")
    err.print(f"{summary}; {100 * report.copied_share:.1f}% of the text's {report.ngrams:,} {report.n}-grams found; "
              f"checked against {idx.describe()} in {1000 * report.seconds:.0f} ms", highlight=False, soft_wrap=True)
    if report.copied:
        names = ", ".join(f"{s['source']} ({s['chars']} chars)" for s in report.sources)
        err.print(f"[bold red]copying found[/]: {len(report.spans)} span{'s' * (len(report.spans) != 1)} of "
                  f"{min_chars}+ chars, from {names}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    err.print(f"[green]no copying[/] of {min_chars}+ characters", highlight=False)
