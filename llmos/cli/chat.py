"""`llmos chat`, `llmos sessions`, `llmos personas`, `llmos kb`: talking with personas, kept in SQLite."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmos.cli.common import ModelOpt, PrecisionOpt, SafetyOpt, attach_safety, err, fail, load_llm, out

REPL_HELP = """commands:
  /retry            a new reply to your last message
  /swipe [N]        list the replies your last message got (before it: the greetings); N: make
                    reply N the one you go on from (one past the last: a new reply, as /retry)
  /undo             take back your last message and its reply
  /edit TEXT        replace your last message with TEXT and get a new reply
  /persona NAME     talk to another persona from here on
  /rate N           rate the last reply 1-5 (or: up, down)
  /pin FACT         remember FACT for the rest of the session
  /facts            show the pinned facts
  /context          show what was sent to the model last
  /title TEXT       name this session
  /save [FILE]      export the session as Markdown (default chat-ID.md)
  /exit             leave (the session is saved as you go; resume with --session ID)"""


def _open_store():
    from llmos.db import Store, StoreError

    try:
        return Store()
    except StoreError as e:
        fail(str(e))


def _print_stream(pieces) -> bool:
    """Write streamed text to stdout; False if Ctrl-C cut it short."""
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pieces.close()  # the partial reply is stored by the conversation
        sys.stdout.write(" [interrupted]")
        return False
    finally:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return True


def _print_overlap(conv):
    """After a reply from a knowledge base: how much of it its cited passages account for."""
    turns = conv.turns()
    overlap = turns[-1]["meta"].get("overlap") if turns and turns[-1]["role"] == "assistant" else None
    if overlap:
        each = ", ".join(f"[{i}] {share:.0%}" for i, share in enumerate(overlap["per_passage"], 1))
        err.print(f"overlap with the sources: {overlap['overlap']:.0%} of the answer's {overlap['n']}-grams ({each})",
                  highlight=False, markup=False)


def chat(
    persona: Annotated[Optional[str], typer.Option("--persona", "-p", help="Persona name (see `llmos personas`) or a YAML/JSON file.")] = None,
    session: Annotated[Optional[int], typer.Option("--session", "-s", help="Resume this session (see `llmos sessions`).")] = None,
    kb: Annotated[Optional[str], typer.Option("--kb", help="Answer from this knowledge base (see `llmos kb`).")] = None,
    model: ModelOpt = None,
    show_context: Annotated[bool, typer.Option("--show-context", help="Print what is sent to the model before each reply (stderr).")] = False,
    budget: Annotated[Optional[int], typer.Option(help="Prompt tokens allowed; older turns are summarised beyond it. Default: the model's context.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (0: greedy). Default: the model's.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible replies.")] = None,
    no_facts: Annotated[bool, typer.Option("--no-facts", help="Do not pin facts found in your messages.")] = False,
    precision: PrecisionOpt = "auto",
    safety: SafetyOpt = "default",
):
    """Chat with a persona; every turn is saved. Type /help in the chat for its commands.

    Reads from a terminal as a REPL (Ctrl-C stops a reply, Ctrl-D or /exit leaves), or from a
    pipe: each line is a message (or a /command) and each reply is one block on stdout.

    Examples:

      llmos chat --persona history-teacher

      llmos chat --session 12

      llmos chat --persona support --kb shop

      printf 'hello\\nmy name is Ada\\nbye\\n' | llmos chat
    """
    from llmos.chat.conversation import ChatSettings, Conversation
    from llmos.chat.kb import KBError, KnowledgeBase
    from llmos.chat.personas import PersonaError, load_persona
    from llmos.chat.sessions import SessionError, Sessions

    store = _open_store()
    sessions = Sessions(store)
    try:  # everything that can be wrong is checked before the model loads
        row = sessions.get(session) if session is not None else None
        chosen = load_persona(persona) if persona or row is None else None
        kb_name = kb or (row["kb"] if row else None)
        base = KnowledgeBase(store, kb_name) if kb_name else None
    except (SessionError, PersonaError, KBError) as e:
        fail(str(e))
    llm = attach_safety(load_llm(_chat_model(model, row, chosen), precision), safety, "chat")
    settings = ChatSettings(max_tokens=max_tokens, temperature=temperature, seed=seed, budget=budget,
                            extract_facts=not no_facts)
    conv = Conversation(llm, sessions, session, chosen, base, settings)
    if show_context:
        conv.on_context = lambda ctx: err.print(ctx.render(), highlight=False, markup=False)
    interactive = sys.stdin.isatty()
    if interactive:
        err.print(f"[bold]chat {conv.id}[/] with [cyan]{conv.persona.name}[/] on {llm.name}"
                  + (f", knowledge base [cyan]{base.name}[/]" if base else "") + ". /help for commands, /exit to leave.",
                  highlight=False)
        turns = conv.turns()
        for t in turns[-6:] if row else turns:  # where the conversation stands
            who = "you" if t["role"] == "user" else conv.persona.name
            out.print(f"{who}> {t['content']}", highlight=False, markup=False)
    _repl(conv, interactive)
    if interactive:
        err.print(f"[dim]saved as session {conv.id}: resume with `llmos chat --session {conv.id}`[/]", highlight=False)


def _chat_model(model: str | None, row: dict | None, persona) -> str | None:
    """The model a chat runs on: the one named; else the one a resumed session was started with
    (in the studio too); else by the persona's language (Chinese: the multilingual model)."""
    import json

    from llmos.weights.store import ModelError, model_for, resolve

    if model:
        return model
    if row is not None and row["model"]:
        from llmos.remote import RemoteError, load_remotes

        try:
            if row["model"] in load_remotes():
                return row["model"]
            resolve(row["model"], quiet=True)
            return row["model"]
        except (ModelError, RemoteError):
            err.print(f"[yellow]note:[/] session {row['id']} ran on {row['model']}, which is not here; "
                      f"using the default for its persona", highlight=False)
    language = persona.language if persona is not None else json.loads(row["persona_data"]).get("language")
    return model_for(None, language=language)


def _lines(interactive: bool):
    while True:
        if interactive:
            try:
                line = input("you> ")
            except KeyboardInterrupt:
                print()
                continue
            except EOFError:
                print()
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
        yield line.rstrip("\n")


def _swipe(conv, arg: str, prefix: str):
    """/swipe lists the alternatives (numbered from 1, the active one marked *); /swipe N selects."""
    if not arg:
        alts = conv.alternatives()
        what = "greetings" if alts.reply_to is None else "replies to your last message"
        lines = [f"{'*' if t['active'] else ' '} {i}  {' '.join(t['content'].split())[:100] or '(empty)'}"
                 for i, t in enumerate(alts.turns, 1)]
        new = f"; /swipe {len(alts.turns) + 1} writes a new one" if alts.reply_to is not None else ""
        err.print("\n".join([f"{what} (/swipe N picks one{new}):", *lines]), highlight=False, markup=False)
        return
    try:
        n = int(arg)
    except ValueError:
        raise ValueError("/swipe takes the number of a reply (/swipe lists them)") from None
    alts = conv.alternatives()
    most = len(alts.turns) + (alts.reply_to is not None)  # one past the last: a new reply
    if not 1 <= n <= most:
        raise ValueError(f"/swipe takes 1 to {most} here (/swipe lists them)" if most else "nothing to swipe yet")
    sys.stdout.write(prefix)
    _print_stream(conv.swipe(n - 1))
    _print_overlap(conv)


def _repl(conv, interactive: bool):
    from llmos.chat.personas import PersonaError
    from llmos.chat.sessions import SessionError

    for line in _lines(interactive):
        text = line.strip()
        if not text:
            continue
        prefix = f"{conv.persona.name}> " if interactive else ""
        try:
            if text.startswith("/"):
                command, _, arg = text[1:].partition(" ")
                arg = arg.strip()
                if command in ("exit", "quit"):
                    return
                if command == "help":
                    err.print(REPL_HELP, highlight=False, markup=False)
                elif command == "retry":
                    sys.stdout.write(prefix)
                    _print_stream(conv.retry())
                    _print_overlap(conv)
                elif command == "swipe":
                    _swipe(conv, arg, prefix)
                elif command == "undo":
                    taken = conv.undo()
                    err.print(f"took back: {taken}", highlight=False, markup=False)
                elif command == "edit":
                    if not arg:
                        raise ValueError("/edit needs the new text: /edit TEXT")
                    sys.stdout.write(prefix)
                    _print_stream(conv.edit(arg))
                    _print_overlap(conv)
                elif command == "persona":
                    if not arg:
                        raise ValueError("/persona needs a name (see `llmos personas`)")
                    conv.switch_persona(arg)
                    err.print(f"now talking to {conv.persona.name}", highlight=False, markup=False)
                    if conv.persona.greeting and interactive:
                        out.print(f"{prefix}{conv.persona.greeting}", highlight=False, markup=False)
                elif command == "rate":
                    value = {"up": 5, "down": 1, "+1": 5, "-1": 1}.get(arg, arg)
                    try:
                        value = int(value)
                    except ValueError:
                        raise ValueError("/rate takes 1-5, up or down") from None
                    conv.rate(value)
                    err.print(f"rated {value}", highlight=False)
                elif command == "pin":
                    if not arg:
                        raise ValueError("/pin needs a fact: /pin my novel is set in Lisbon")
                    err.print("pinned" if conv.pin(arg) else "already pinned", highlight=False)
                elif command == "facts":
                    facts = conv.sessions.facts(conv.id)
                    err.print("\n".join(f"- {f}" for f in facts) or "no pinned facts", highlight=False, markup=False)
                elif command == "context":
                    ctx = conv.last_context
                    err.print(ctx.render() if ctx else "nothing sent to the model yet", highlight=False, markup=False)
                elif command == "title":
                    conv.sessions.update(conv.id, title=arg)
                    err.print("titled", highlight=False)
                elif command == "save":
                    path = Path(arg or f"chat-{conv.id}.md")
                    fmt = "json" if path.suffix == ".json" else "md"
                    path.write_text(conv.sessions.export(conv.id, fmt), encoding="utf-8")
                    err.print(f"wrote {path}", highlight=False)
                else:
                    raise ValueError(f"unknown command /{command}; /help lists them")
                continue
            sys.stdout.write(prefix)
            sys.stdout.flush()
            _print_stream(conv.send(text))
            _print_overlap(conv)
            if not interactive:
                sys.stdout.write("\n")  # a blank line between piped replies
            action = conv.last_action
            if action is not None and action.handover:
                err.print(f"[yellow]handed over to a person[/] ({action.reason}); the session is flagged", highlight=False)
            if action is not None and action.close:
                return
        except (ValueError, SessionError, PersonaError) as e:
            err.print(f"[red]{e}[/]", highlight=False)


# ---------------------------------------------------------------------------------------------
# sessions

sessions_app = typer.Typer(help="Saved chat sessions: list, show, export, delete.", invoke_without_command=True)


def _sessions():
    from llmos.chat.sessions import Sessions

    return Sessions(_open_store())


@sessions_app.callback()
def sessions_list(ctx: typer.Context):
    """List chat sessions, newest first (with no subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    rows = _sessions().list()
    if not rows:
        err.print("no chat sessions yet: start one with `llmos chat`")
        return
    table = Table("id", "persona", "turns", "status", "updated", "title / first message")
    for r in rows:
        table.add_row(str(r["id"]), r["persona"], str(r["user_turns"]), r["status"] + (" (handover)" if r["handover"] else ""),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r["updated_at"])),
                      (r["title"] or r["first_message"] or "")[:60])
    out.print(table)


@sessions_app.command("show")
def sessions_show(session_id: int):
    """Print a session as Markdown (replaced turns marked)."""
    from llmos.chat.sessions import SessionError

    try:
        out.print(_sessions().export(session_id, "md"), highlight=False, markup=False)
    except SessionError as e:
        fail(str(e))


@sessions_app.command("export")
def sessions_export(
    session_id: int,
    format: Annotated[str, typer.Option("--format", "-f", help="md or json")] = "md",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File to write (default: stdout).")] = None,
):
    """Export a session as Markdown or JSON (every turn, ratings, facts, summary)."""
    from llmos.chat.sessions import SessionError

    try:
        text = _sessions().export(session_id, format)
    except SessionError as e:
        fail(str(e))
    if output:
        output.write_text(text, encoding="utf-8")
        err.print(f"wrote {output}")
    else:
        sys.stdout.write(text + "\n")


@sessions_app.command("delete")
def sessions_delete(session_id: int):
    """Delete a session and all its turns."""
    from llmos.chat.sessions import SessionError

    try:
        _sessions().delete(session_id)
    except SessionError as e:
        fail(str(e))
    err.print(f"deleted session {session_id}")


# ---------------------------------------------------------------------------------------------
# personas

personas_app = typer.Typer(help="Personas: built-in ones and yours in $LLMOS_HOME/personas.", invoke_without_command=True)


@personas_app.callback()
def personas_list(ctx: typer.Context):
    """List personas (with no subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from llmos.chat.personas import list_personas, personas_dir

    table = Table("name", "", "description")
    for p in list_personas():
        kind = "built-in" if p["builtin"] else "card" if p["card"] else "yours"
        tags = f" [{', '.join(p['tags'][:4])}]" if p["tags"] else ""
        table.add_row(p["name"], kind, p["description"][:90] + tags)
    out.print(table)
    err.print(f"add your own as YAML or JSON in {personas_dir()}", highlight=False)


@personas_app.command("show")
def personas_show(name: str):
    """Print a persona as YAML."""
    import yaml

    from llmos.chat.personas import PersonaError, load_persona

    try:
        p = load_persona(name)
    except PersonaError as e:
        fail(str(e))
    out.print(yaml.safe_dump(p.to_dict(), allow_unicode=True, sort_keys=False), highlight=False, markup=False)


@personas_app.command("import")
def personas_import(card: Path):
    """Import a character card as a persona: V1, V2 or V3, as JSON, PNG or CHARX. Its picture,
    greetings, example dialogue, lorebook and every other field come along.

    Example: llmos personas import Mira.png
    """
    from llmos.cards import CardError, read_card
    from llmos.chat.personas import PersonaError, import_card

    try:
        persona, path = import_card(read_card(card), str(card))
    except (CardError, PersonaError) as e:
        fail(str(e))
    extras = [f"{n} {what}" for n, what in ((len(persona.alternate_greetings), "alternate greetings"),
                                           (len((persona.card.get("data", {}).get("character_book") or {}).get("entries", [])), "lore entries"))
              if n]
    err.print(f"imported [cyan]{persona.name}[/] into {path}" + (f" ({', '.join(extras)})" if extras else "")
              + f"; chat with `llmos chat --persona {persona.name}`", highlight=False)


@personas_app.command("export")
def personas_export(
    name: str,
    output: Annotated[Path, typer.Argument(help="The file to write: .json, .png or .charx (the format follows the suffix).")],
    format: Annotated[Optional[str], typer.Option("--format", "-f", help="json, png or charx (default: from the suffix).")] = None,
):
    """Export a persona as a character card: the card it was imported from, unchanged (PNG: both
    the `chara` and `ccv3` chunks, in its picture), or a V2 card written from its fields."""
    from llmos.cards import CardError, export_card
    from llmos.chat.personas import PersonaError, card_of, load_persona

    fmt = format or output.suffix.lstrip(".").lower()
    try:
        card = card_of(load_persona(name))
        data = export_card(card, fmt, card.image)
    except (CardError, PersonaError) as e:
        fail(str(e))
    output.write_bytes(data)
    err.print(f"wrote {output} ({card.spec or 'chara_card_v2'}, {fmt})", highlight=False)


# ---------------------------------------------------------------------------------------------
# knowledge bases

kb_app = typer.Typer(help="Knowledge bases: your documents, searchable by meaning, for chat.", invoke_without_command=True)


@kb_app.callback()
def kb_list(ctx: typer.Context):
    """List knowledge bases (with no subcommand)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from llmos.chat.kb import list_kbs

    rows = list_kbs(_open_store())
    if not rows:
        err.print("no knowledge bases yet: `llmos kb add NAME FILES_OR_FOLDERS...`")
        return
    table = Table("name", "documents", "passages", "FAQ entries", "embedder")
    for r in rows:
        table.add_row(r["name"], str(r["documents"]), str(r["passages"]), str(r["faq"]), r["embedder"])
    out.print(table)


@kb_app.command("add")
def kb_add(
    name: str,
    paths: Annotated[list[str], typer.Argument(help="Files, or folders of .md/.txt files.")],
):
    """Add documents to a knowledge base (created if new). Changed files are re-indexed,
    unchanged ones skipped; binary or unreadable files are skipped and reported.

    Example: llmos kb add shop docs/faq.md docs/policies/
    """
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from llmos.chat.kb import KBError, KnowledgeBase
    from llmos.embedder import EmbedderError
    from llmos.weights.store import ModelError

    store = _open_store()
    try:
        base = KnowledgeBase(store, name, create=True)
        with Progress(TextColumn("embedding passages"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                      console=err, transient=True) as progress:
            task = progress.add_task("embed", total=None)
            report = base.add(paths, progress=lambda done, total: progress.update(task, completed=done, total=total))
    except (KBError, EmbedderError, ModelError) as e:
        fail(str(e))
    for path, why in report.skipped:
        err.print(f"[yellow]skipped[/] {path}: {why}", highlight=False)
    err.print(f"{name}: {len(report.added)} added, {len(report.updated)} updated, {len(report.unchanged)} unchanged, "
              f"{len(report.skipped)} skipped; {report.passages} passages embedded in {report.seconds:.1f} s", highlight=False)


@kb_app.command("search")
def kb_search(
    name: str,
    query: str,
    k: Annotated[int, typer.Option("-k", help="Passages to show.")] = 5,
):
    """Show the passages closest in meaning to QUERY, with their scores and sources."""
    from llmos.chat.kb import KBError, KnowledgeBase

    try:
        hits = KnowledgeBase(_open_store(), name).search(query, k)
    except KBError as e:
        fail(str(e))
    for h in hits:
        where = h.source + (f" - {h.heading}" if h.heading else "")
        out.print(f"[bold]{h.score:.3f}[/] [cyan]{where}[/]" + (" (FAQ)" if h.question else ""), highlight=False)
        out.print(h.text, highlight=False, markup=False)
        out.print()


@kb_app.command("show")
def kb_show(name: str):
    """List a knowledge base's documents."""
    from llmos.chat.kb import KBError, KnowledgeBase

    try:
        docs = KnowledgeBase(_open_store(), name).documents()
    except KBError as e:
        fail(str(e))
    for d in docs:
        out.print(f"{d['passages']:5d}  {d['path']}", highlight=False)


@kb_app.command("delete")
def kb_delete(name: str):
    """Delete a knowledge base (your files are not touched)."""
    from llmos.chat.kb import KBError, delete_kb

    try:
        delete_kb(_open_store(), name)
    except KBError as e:
        fail(str(e))
    err.print(f"deleted knowledge base {name}")
