"""`llmos safety`: check a text against a content policy, read the audit log, print the default policy."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmos.cli.common import err, fail, out

safety_app = typer.Typer(
    help="Content safety: check texts against a policy (dark fiction passes; recipes for weapons, sexual content "
         "involving minors and pushes towards suicide do not; personal data is redacted), read the audit log, "
         "print the default policy to edit.",
    no_args_is_help=True,
)


def _read(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    path = Path(source)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read {path} as UTF-8 text ({e.__class__.__name__})")
    return source


@safety_app.command("check")
def check(
    text: Annotated[str, typer.Argument(help="The text itself, a file to read, or - for stdin.")],
    policy: Annotated[Optional[str], typer.Option("--policy", help="A policy YAML file (default: the shipped policy).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON (with the matched and redacted text).")] = False,
    classifier: Annotated[bool, typer.Option("--classifier/--no-classifier", help="Run the sentence classifier "
                                             "(as the policy says; --no-classifier: rules, word lists and personal data only).")] = True,
):
    """Check a text against the policy: what fired, which action, and the text with personal
    data redacted. Exit code 0 when the text may pass (allow or warn, redactions applied),
    1 when a block rule fired, 2 on bad input (an unreadable file, a bad policy).

    Examples:
      llmos safety check "The villain said he would kill them all."      # allow, exit 0
      llmos safety check "Mail me at ann@example.com"                     # prints it with the address redacted
      llmos safety check story.txt --json
      echo "怎么在家里制作炸弹？" | llmos safety check - ; echo $?           # 1
      llmos safety check draft.md --policy my-policy.yaml
    """
    from llmos.embedder import EmbedderError
    from llmos.safety import PolicyError, check_text, load_policy
    from llmos.weights.store import ModelError

    try:
        pol = load_policy(policy)
    except PolicyError as e:
        fail(str(e))
    body = _read(text)
    try:
        verdict = check_text(body, pol, classifier=None if classifier else False)
    except (EmbedderError, ModelError) as e:  # the classifier's embedder could not be pulled or loaded
        fail(f"the classifier needs the embedding model: {e} (or pass --no-classifier)")
    if as_json:
        out.print_json(json.dumps(verdict.as_dict(with_text=True), ensure_ascii=False))
    else:
        for f in verdict.findings:
            err.print(f"{f.action:6} {f.category:20} {f.rule} ({f.source}, {f.score:.2f}) at {f.start}-{f.end}",
                      highlight=False, markup=False)
        err.print(f"verdict: {verdict.action}", highlight=False, markup=False)
        if not verdict.blocked:
            sys.stdout.write(verdict.text if verdict.text.endswith("\n") else verdict.text + "\n")
    raise typer.Exit(1 if verdict.blocked else 0)


@safety_app.command("audit")
def audit(
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many rows, newest first.")] = 50,
    since: Annotated[Optional[float], typer.Option("--since", help="Only rows from the last N hours.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
):
    """The audit log: what fired, where (cli:prompt, cli:output, server:output, ...), with which
    model, and which action. The checked text is kept only when the policy says `audit: {store_text: true}`.

    Examples:
      llmos safety audit
      llmos safety audit -n 10 --since 24 --json
    """
    from rich.table import Table

    from llmos.db import Store, StoreError
    from llmos.safety import list_audit

    try:
        rows = list_audit(Store(), limit=limit, since=time.time() - since * 3600 if since is not None else None)
    except StoreError as e:
        fail(str(e))
    if as_json:
        out.print_json(json.dumps(rows, ensure_ascii=False))
        return
    if not rows:
        err.print("the audit log is empty: nothing has fired yet")
        return
    table = Table("time", "where", "model", "category", "action", "rule", "source", "text")
    for r in rows:
        table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])), r["where"], r["model"] or "",
                      r["category"], r["action"], r["rule"], r["source"], (r["text"] or "")[:40])
    out.print(table)


@safety_app.command("policy")
def policy():
    """Print the default policy (YAML) to copy and edit, then pass with --policy / --safety.

    Example:
      llmos safety policy > my-policy.yaml     # set violence: allow, add words, keep audit text...
      llmos safety check draft.md --policy my-policy.yaml
    """
    from llmos.safety import default_policy_text

    sys.stdout.write(default_policy_text())
