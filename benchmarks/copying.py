"""The copying check on a model trained here: how often does a small Tiny Shakespeare model
write 50-character spans of its training text verbatim, at temperature 0 and 0.8, against the
same check on as much real held-out Shakespeare (what unseen text by the same author shares
with the training text by chance and formula)? And how fast is the check?

    python benchmarks/copying.py                      # ~15 minutes on one core (7 of them training)
    python benchmarks/copying.py --minutes 2 --control-minutes 1 --samples 20
    python benchmarks/copying.py --only control            # the control again, the model's rows kept

The model: the 10-minute recipe of benchmarks/train_shakespeare.py with context 256 (batch 8,
the same tokens per step), trained for --minutes. Prompts: --prompt-chars characters at line
starts drawn (seeded) from the validation split; each sample is --chars new characters, and its
baseline is the real text that follows the prompt, of the same length. The same model is also
prompted with training text (can it be made to recite?), and a control, the same recipe trained
on only the first 4,000 characters for --control-minutes, shows what a memorising model looks like.
Copying is measured against each run's training split, found from the run folder as
`llmos check --against RUN` finds it. Results: a table on stdout and JSON in
benchmarks/results/copying.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, cpu_name, print_table, revision, write_json
from train_shakespeare import CORPUS, HEADLINE, prepare_data, train_run

MIN_CHARS = 50
# the 10-minute recipe with context 256 (batch 8: the same 2,048 tokens per step)
RECIPE = {**HEADLINE, "model": dict(max_seq_len=256), "block_size": 256, "batch_size": 8}


def heldout_text() -> tuple[str, str]:
    """The training and validation text of Tiny Shakespeare, split as `llmos prepare` splits it."""
    from llmos.data.clean import CleanOptions, read_documents
    from llmos.data.prepare import split_documents

    docs = list(read_documents([CORPUS], CleanOptions(), []))
    train, val = split_documents(docs, 0.1, 1337)
    return "".join(t for t, _ in train), "".join(t for t, _ in val)


def draw_prompts(val: str, count: int, prompt_chars: int, chars: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, the real continuation) pairs starting at line starts of the held-out text."""
    starts = [i + 1 for i, c in enumerate(val) if c == "\n" and i + 1 + prompt_chars + chars <= len(val)]
    picked = sorted(random.Random(seed).sample(starts, count))
    return [(val[s : s + prompt_chars], val[s + prompt_chars : s + prompt_chars + chars]) for s in picked]


def summarise(texts: list[str], idx) -> dict:
    from llmos.data.copying import check_copying

    reports = [check_copying(t, idx, MIN_CHARS) for t in texts]
    chars = sum(len(t) for t in texts)
    copied = sum(s["chars"] for r in reports for s in r.spans)
    spans = [s["chars"] for r in reports for s in r.spans]
    longest = [r.longest["chars"] if r.longest else 0 for r in reports]
    words = sum(len(t.split()) for t in texts)
    return {
        "samples": len(texts), "chars": chars,
        "samples_with_copy": sum(r.copied for r in reports) / len(texts),
        "spans": len(spans), "spans_per_1000_chars": 1000 * len(spans) / chars,
        "copied_chars_share": copied / chars, "span_chars_max": max(spans, default=0),
        "longest_overlap_median": statistics.median(longest), "longest_overlap_max": max(longest),
        "ngram_share_mean": sum(r.copied_share for r in reports) / len(reports),
        "check_ms_per_1000_words": 1000 * 1000 * sum(r.seconds for r in reports) / max(words, 1),
        "examples": [{"text": r.marked("brackets"), **r.longest} for r in reports if r.copied][:3],
    }


def check_speed(text: str, idx, words_per_piece: int = 1000) -> dict:
    """The check's time on pieces of `words_per_piece` words: median and worst, in ms."""
    from llmos.data.copying import check_copying

    words = text.split(" ")
    times = []
    for k in range(0, len(words) - words_per_piece + 1, words_per_piece):
        piece = " ".join(words[k : k + words_per_piece])
        t0 = time.perf_counter()
        check_copying(piece, idx, MIN_CHARS)
        times.append(1000 * (time.perf_counter() - t0))
    return {"pieces": len(times), "ms_median": statistics.median(times), "ms_max": max(times)}


def samples(run: Path, pairs: list[tuple[str, str]], chars: int, temperature: float) -> tuple[list[str], float]:
    """One sample of `chars` new characters per prompt (seeded by its number), and the seconds taken."""
    from llmos.engine.sampling import SamplingParams
    from llmos.llm import LLM

    llm = LLM.load(str(run))
    t0 = time.perf_counter()
    texts = [llm.generate(prompt, SamplingParams(max_tokens=chars, temperature=temperature, seed=k)).completions[0].text
             for k, (prompt, _) in enumerate(pairs)]
    return texts, time.perf_counter() - t0


def train_model(data_dir: Path, run: Path, minutes: float) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    trained = train_run(data_dir, run, RECIPE, time_limit=minutes * 60)
    return {**{k: trained[k] for k in ("steps", "wall_s", "params", "val_loss")}, "minutes": minutes}


def print_rates(rates: dict):
    rows = [[name, r["samples"], f"{r['chars']:,}", f"{100 * r['samples_with_copy']:.0f}%", r["spans"],
             f"{100 * r['copied_chars_share']:.1f}%", r["span_chars_max"], r["longest_overlap_median"],
             f"{100 * r['ngram_share_mean']:.1f}%"] for name, r in rates.items()]
    print()
    print_table(["text", "samples", "chars", "with a 50+ copy", "spans", "chars in spans", "longest span",
                 "median longest overlap", "24-grams found"], rows)


def control_rows(args, work: Path, train_text: str, models: dict, rates: dict, gen_s: dict):
    """The same recipe on the first --control-chars characters: a model that memorises, which the
    check must catch (prompted with its own training text)."""
    from llmos.data.copying import resolve_index
    from llmos.data.prepare import PrepareConfig, prepare

    small = work / "slice.txt"
    small.write_text(train_text[: train_text.index("\n", args.control_chars) + 1])
    small_dir = work / "slice-char"
    shutil.rmtree(small_dir, ignore_errors=True)
    prepare(PrepareConfig([str(small)], str(small_dir), tokenizer="char"))
    control = work / "control-run"
    models["control"] = {**train_model(small_dir, control, args.control_minutes), "train_chars": len(small.read_text())}
    idx = resolve_index(control)
    slice_text = small.read_text()
    pairs = draw_prompts(slice_text[: int(0.85 * len(slice_text))], args.samples,  # inside its training split
                         args.prompt_chars, args.chars, seed=2)
    for temperature in (0.0, 0.8):
        name = f"control (memorising), training-text prompts, temperature {temperature:g}"
        texts, gen_s[name] = samples(control, pairs, args.chars, temperature)
        rates[name] = summarise(texts, idx)
    m = models["control"]
    print(f"control: {m['params'] / 1e6:.2f}M params, {m['train_chars']:,} characters, {m['steps']} steps in "
          f"{m['wall_s']:.0f} s, val loss {m['val_loss']:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget of the model")
    ap.add_argument("--control-minutes", type=float, default=3.0,
                    help="training budget of the memorising control (0: none)")
    ap.add_argument("--control-chars", type=int, default=4000, help="the control's training text: the first N characters")
    ap.add_argument("--only", default="model,control",
                    help="'control' reruns only the control, keeping the model's rows from --out")
    ap.add_argument("--samples", type=int, default=40, help="prompts (samples per row)")
    ap.add_argument("--chars", type=int, default=224, help="new characters per sample")
    ap.add_argument("--prompt-chars", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (more than the free cores of a shared machine slows everything)")
    ap.add_argument("--work", help="folder for data and the runs (default: a temporary folder)")
    ap.add_argument("--out", default=str(RESULTS / "copying.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llmos.data.copying import build_index, normalise, resolve_index

    work = Path(args.work or tempfile.mkdtemp(prefix="llmos-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    train_text, val_text = heldout_text()
    only = set(args.only.split(","))
    if "model" not in only:  # keep the model's rows, replace the control's
        results = json.loads(Path(args.out).read_text())
        models, rates, gen_s = results["models"], results["rates"], results["generation_s"]
        for name in [k for k in rates if k.startswith("control")]:
            del rates[name]
        control_rows(args, work, train_text, models, rates, gen_s)
        print_rates(rates)
        write_json(args.out, results)
        return
    data_dir = prepare_data(work)
    run = work / "copying-run"
    models = {"model": train_model(data_dir, run, args.minutes)}

    t0 = time.perf_counter()
    build_index([("tinyshakespeare.txt", train_text)])
    build_s = time.perf_counter() - t0
    index_bytes = sum(f.stat().st_size for f in (data_dir / "copy_index").iterdir())
    t0 = time.perf_counter()
    idx = resolve_index(run)  # the run -> its dataset -> the dataset's index
    load_s = time.perf_counter() - t0
    assert idx.text == normalise(train_text)[0].strip(" "), "the split differs from the prepared dataset's"

    heldout = draw_prompts(val_text, args.samples, args.prompt_chars, args.chars)
    seen = draw_prompts(train_text, args.samples, args.prompt_chars, args.chars, seed=1)
    rates, gen_s = {}, {}
    for temperature in (0.0, 0.8):
        name = f"held-out prompts, temperature {temperature:g}"
        texts, gen_s[name] = samples(run, heldout, args.chars, temperature)
        rates[name] = summarise(texts, idx)
    rates["held-out Shakespeare (baseline)"] = summarise([real for _, real in heldout], idx)
    for temperature in (0.0, 0.8):
        name = f"training-text prompts, temperature {temperature:g}"
        texts, gen_s[name] = samples(run, seen, args.chars, temperature)
        rates[name] = summarise(texts, idx)
    if "control" in only and args.control_minutes:
        control_rows(args, work, train_text, models, rates, gen_s)
    speed = {
        "held_out": check_speed(val_text, idx),
        "training_text (all copied)": check_speed(train_text[: len(val_text)], idx),
    }
    results = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "revision": revision(),
        "min_chars": MIN_CHARS, "n": idx.n, "prompt_chars": args.prompt_chars, "sample_chars": args.chars,
        "recipe": RECIPE, "models": models,
        "index": {"train_chars": len(train_text), "build_s": build_s, "load_s": load_s, "bytes": index_bytes},
        "generation_s": gen_s, "rates": rates, "speed_per_1000_words": speed,
    }
    m = models["model"]
    print(f"model: {m['params'] / 1e6:.2f}M params, {m['steps']} steps in {m['wall_s']:.0f} s, val loss {m['val_loss']:.3f}")
    print_rates(rates)
    print(f"\ncheck speed per 1,000 words: held-out {speed['held_out']['ms_median']:.1f} ms median "
          f"({speed['held_out']['ms_max']:.1f} max), fully copied {speed['training_text (all copied)']['ms_median']:.1f} ms; "
          f"index of {len(train_text):,} characters built in {build_s:.2f} s, {index_bytes / 2**20:.1f} MiB, "
          f"loaded in {1000 * load_s:.0f} ms")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
