"""What every command group shares: the consoles, `fail`, the --model and --precision options,
loading a model with progress bars, and printing streams and results. Imports no command module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from llmos.weights import store

out = Console()  # model output and tables
err = Console(stderr=True)  # progress, errors and notes

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model name (see `llmos models`), checkpoint folder or .gguf file. "
                 f"Default: {store.DEFAULT_MODEL}."),
]
PrecisionOpt = Annotated[
    str, typer.Option(help="Weights at run time: auto (default: a GGUF's quantized blocks as stored, "
                           "else fp16), quantized, fp16, fp32 (exact reference) or bf16.")
]


SafetyOpt = Annotated[
    str, typer.Option("--safety", help="The safety policy prompts and outputs are checked against: 'default' (the "
                                       "shipped one: dark fiction passes, weapon recipes and sexual content involving "
                                       "minors are stopped, personal data redacted), a policy YAML file "
                                       "(`llmos safety policy` prints the default to start from), or 'off'.")
]


def fail(message: str, code: int = 2):
    """One line on stderr (not wrapped to the terminal: scripts and logs read it whole), exit 2."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


class PullProgress:
    """Rich progress bars for the stages of pulling and converting a model."""

    def __init__(self):
        from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("{task.fields[detail]}"), console=err, transient=False)
        self.tasks: dict[str, int] = {}
        self.download_column = DownloadColumn

    def __call__(self, description: str, completed: int, total: int):
        if description not in self.tasks:
            if not self.tasks:
                self.progress.start()
            self.tasks[description] = self.progress.add_task(description, total=total, detail="")
        detail = f"{completed / 2**20:.0f}/{total / 2**20:.0f} MiB" if total > 2**20 else f"{completed}/{total}"
        self.progress.update(self.tasks[description], completed=completed, total=total, detail=detail)

    def close(self):
        if self.tasks:
            self.progress.stop()


def load_llm(model: str | None, precision: str):
    from llmos.llm import LLM
    from llmos.remote import RemoteError, RemoteLLM, load_remotes

    try:
        remotes = load_remotes()
    except RemoteError as e:
        fail(str(e))
    if model in remotes:
        return RemoteLLM(remotes[model])

    progress = PullProgress()
    try:
        return LLM.load(model, precision=precision, progress=progress)
    except store.ModelError as e:
        fail(str(e))
    finally:
        progress.close()


def safety_policy(spec: str):
    """The Policy named by --safety (None for 'off'); a bad policy file fails with exit 2."""
    if spec.lower() == "off":
        return None
    from llmos.safety import PolicyError, load_policy

    try:
        return load_policy(None if spec.lower() == "default" else spec)
    except PolicyError as e:
        fail(str(e))


def attach_safety(llm, spec: str, where: str = "cli"):
    """Check llm's prompts and outputs against the --safety policy; what fires is recorded in the
    store's audit log (`llmos safety audit`) and noted on stderr."""
    policy = safety_policy(spec)
    if policy is None or llm.tokenizer is None:  # remote models stream through their own servers
        return llm
    from llmos.safety import record_audit

    def audit(kind, verdict):
        from llmos.db import Store, StoreError

        try:
            record_audit(Store(), f"{where}:{kind}", verdict, policy=policy, model=llm.name)
        except StoreError as e:
            err.print(f"[yellow]note:[/] the safety audit log could not be written ({e})", highlight=False)
        if kind == "output" or not verdict.blocked:
            fired = ", ".join(sorted({f"{f.category} ({f.action})" for f in verdict.findings}))
            err.print(f"[yellow]safety:[/] {kind}: {fired}", highlight=False)

    llm.safety, llm.audit = policy, audit
    return llm


CheckCopyingOpt = Annotated[bool, typer.Option(
    "--check-copying", help="Check the output for verbatim copying (50+ characters) from the model's training data "
                            "(a model trained here) or from --copy-against.")]
CopyAgainstOpt = Annotated[Optional[str], typer.Option(
    "--copy-against", help="With --check-copying: a training run, dataset or copy index folder, or a folder of texts.")]


def copy_index_for(llm, check: bool, against: str | None):
    """The CopyIndex --check-copying checks against (None when not asked); exit 2 when there is none."""
    if not check and against is None:
        return None
    from llmos.data.copying import CopyError, resolve_index

    try:
        return resolve_index(against or llm.loaded.path)
    except CopyError as e:
        if against:
            fail(str(e))
        fail(f"{llm.name} was not trained here, so there is no training data of its own to check against: "
             f"name the texts with --copy-against FOLDER ({e})")


def print_copying(reports: list[dict]):
    """The human view of copying reports: the longest copied span and the copied share, per candidate."""
    for i, r in enumerate(reports):
        who = f"candidate {i + 1}: " if len(reports) > 1 else ""
        longest = r.get("longest")
        if not r.get("spans"):
            err.print(f"[green]copying:[/] {who}no verbatim span of {r.get('min_chars', 50)}+ characters "
                      f"({r['copied_share']:.0%} of n-grams seen in the sources)", highlight=False)
        else:
            err.print(f"[yellow]copying:[/] {who}{len(r['spans'])} verbatim span(s), the longest {longest['chars']} "
                      f"characters from {longest['source']}: {longest['text'][:80]!r}", highlight=False)


def parse_vars(pairs: list[str]) -> dict:
    values = {}
    for pair in pairs:
        if "=" not in pair:
            fail(f"--var takes KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        values[key.strip()] = value
    return values


XtcThresholdOpt = Annotated[Optional[float], typer.Option(
    "--xtc-threshold", help="XTC: tokens at least this likely are the 'top choices' (0.1 is typical).")]
XtcProbabilityOpt = Annotated[Optional[float], typer.Option(
    "--xtc-probability", help="XTC: on this share of steps, drop the top choices but the least likely of them "
                              "(0 = off; 0.5 is typical).")]
TopAOpt = Annotated[Optional[float], typer.Option("--top-a", help="Drop tokens below top_a x (top probability)^2 (0 = off).")]
TfsOpt = Annotated[Optional[float], typer.Option("--tfs", help="Tail-free sampling z (1 = off; 0.95 is typical).")]
SamplerOrderOpt = Annotated[Optional[str], typer.Option(
    "--sampler-order", help="Samplers in the order to run, comma-separated, from rep_pen, temperature, top_k, top_p, "
                            "min_p, typical, top_a, tfs, xtc (those left out run after, in that default order).")]
BannedStringsOpt = Annotated[list[str], typer.Option(
    "--banned-strings", help="Text never to produce, in any case and tokenisation (repeatable): when the output "
                             "completes it, generation goes back to where it began and samples again.")]
BannedFileOpt = Annotated[Optional[Path], typer.Option(
    "--banned-file", help="A file of banned strings, one a line ('#' starts a comment).")]
SlopOpt = Annotated[Optional[str], typer.Option(
    "--slop", help="Ban the shipped list of overused phrases of this language: en or zh.")]
BannedRegexOpt = Annotated[bool, typer.Option("--banned-regex", help="Banned strings are regular expressions.")]


def banned_strings(strings: list[str], file: Path | None, slop: str | None, as_regex: bool) -> list[str] | None:
    """The banned strings of --banned-strings, --banned-file and --slop (exit 2 on a missing file,
    an unknown language or a bad regular expression)."""
    banned = [s for s in strings if s]
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"--banned-file {file}: cannot be read ({e.__class__.__name__}); give a UTF-8 text file, one string a line")
        banned += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    if slop is not None:
        from llmos.writing.slop import load_slop

        try:
            phrases = load_slop(slop)
        except ValueError as e:
            fail(f"--slop: {e}")
        if as_regex:
            import regex

            phrases = [regex.escape(p) for p in phrases]
        banned += phrases
    if banned and as_regex:
        from llmos.llm import banned_pattern

        try:
            banned_pattern(banned, True)
        except ValueError as e:
            fail(str(e))
    return banned or None


def sampler_order(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        fail("--sampler-order needs sampler names separated by commas, e.g. min_p,temperature")
    return names


def sampling_from_options(llm, opts: dict):
    try:
        return llm.sampling(**opts)
    except (TypeError, ValueError) as e:
        fail(str(e))


def banned_sequences(llm, words: list[str]) -> list[list[int]]:
    """Each banned word, with and without a leading space (how it appears mid-sentence)."""
    seqs = []
    for w in words:
        for form in {w, " " + w}:
            ids = llm.tokenizer.encode(form, add_bos=False)
            if ids:
                seqs.append(ids)
    return seqs


def run_stream(llm, stream, n: int, result, as_json: bool, show_prompt: str | None = None, silent: bool = False):
    """Print a stream: one candidate streams live; several are shown together as they grow.
    as_json prints the result as JSON at the end instead; silent prints nothing (the caller
    shows the result its own way)."""
    interrupted = False
    texts = [""] * n
    live = None
    try:
        if as_json or silent:
            for _ in stream:
                pass
        elif n == 1:
            if show_prompt:
                out.print(show_prompt, end="", style="dim", highlight=False, markup=False)
            for delta in stream:
                out.print(delta.text, end="", highlight=False, markup=False, soft_wrap=True)
            out.print()
        else:
            from rich.console import Group
            from rich.live import Live
            from rich.panel import Panel

            def view():
                return Group(*(Panel(t or "…", title=f"candidate {i + 1}", title_align="left")
                               for i, t in enumerate(texts)))

            live = Live(view(), console=out, refresh_per_second=8, transient=not out.is_terminal)
            with live:
                for delta in stream:
                    texts[delta.index] += delta.text
                    live.update(view())
            if not out.is_terminal:
                for i, t in enumerate(texts):
                    out.print(f"--- candidate {i + 1} ---", highlight=False)
                    out.print(t, highlight=False, markup=False)
    except KeyboardInterrupt:
        interrupted = True
        out.print()
        err.print("[yellow]stopped[/] (Ctrl-C)")
    if as_json and not interrupted:
        print(json.dumps(result_json(llm, result), ensure_ascii=False, indent=2))
    elif not interrupted and result.timings and not silent:
        t = result.timings
        err.print(
            f"[dim]{t['prompt_tokens']} prompt + {t['generated_tokens']} generated tokens, "
            f"first token {t['time_to_first_token_s']:.2f}s, "
            f"{t.get('decode_tok_s') or 0:.1f} tok/s decode[/]", highlight=False,
        )
    if interrupted:
        raise typer.Exit(130)


def result_json(llm, result) -> dict:
    tok = llm.tokenizer

    def lp_json(lps):
        if lps is None:
            return None
        return [
            {"token": tok.token_text(lp.token), "id": lp.token, "logprob": lp.logprob,
             "top": [{"token": tok.token_text(t), "id": t, "logprob": v} for t, v in lp.top]}
            for lp in lps
        ]

    return {
        "model": llm.name,
        "prompt": result.prompt,
        "prompt_tokens": result.prompt_tokens,
        "truncated_prompt_tokens": result.truncated_tokens,
        "completions": [
            {"index": c.index, "text": c.text, "tokens": c.token_ids, "finish_reason": c.finish_reason,
             "logprobs": lp_json(c.logprobs), **({"score": c.score} if c.score is not None else {}),
             **({"safety": c.safety} if c.safety else {})}
            for c in result.completions
        ],
        "timings": {**result.timings, "load_s": round(llm.loaded.load_seconds, 3)},
    }
