"""Banned phrases: how often stories still contain the shipped English slop list's phrases with
no ban, with the token masking writing tasks use (`banned_sequences`: each phrase's token ids in
four spellings, the completing token forbidden), and with rewind-and-resample banned strings
(`LLM.generate(..., banned_strings=...)`: any tokenisation, any case), and what each costs in
speed.

    LLMOS_HOME=.test-home python benchmarks/banned_phrases.py
    python benchmarks/banned_phrases.py --stories 10 --max-tokens 60   # a quicker look

SmolLM2-135M-Instruct writes --stories short stories of at most --max-tokens tokens: --per-prompt
candidates (one batch, seeded, the same seed in every arm) for each of --stories / --per-prompt
prompts. The arms take turns prompt by prompt, so that whatever else runs on the machine slows
them alike. Phrases are counted with `find_slop` (whole words, case-insensitive), as `llmos eval`
counts them. Speed is kept tokens per second of each batch's wall time; "sampled per kept" is
how many tokens were sampled for each token that stayed (rewinds sample again). Results: a table on stdout and JSON in benchmarks/results/banned_phrases.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from common import RESULTS, cpu_name, print_table, revision, write_json

SUBJECTS = ["a lighthouse keeper", "a retired detective", "a young witch", "a lonely robot", "two rival bakers",
            "a ship's cat", "a cartographer", "a girl who hears the sea", "an old soldier", "a night-train conductor"]
TURNS = ["finds a letter that was never sent", "meets a stranger in the rain", "loses the one thing they love",
         "discovers a door in the garden wall", "must keep a promise"]
ARMS = ("none", "masking", "rewind")


def story_prompts(n: int, seed: int) -> list[str]:
    pairs = [(s, t) for s in SUBJECTS for t in TURNS]
    random.Random(seed).shuffle(pairs)
    if n > len(pairs):
        raise SystemExit(f"--stories is at most {len(pairs)}")
    return [f"Write a short story about {s} who {t}." for s, t in pairs[:n]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--stories", type=int, default=50)
    ap.add_argument("--per-prompt", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=120)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "banned_phrases.json"))
    args = ap.parse_args()

    from llmos.llm import LLM
    from llmos.writing.slop import find_slop, load_slop
    from llmos.writing.tasks import banned_sequences

    llm = LLM.load(args.model)
    phrases = list(load_slop("en"))
    masks = banned_sequences(llm.tokenizer, phrases)
    prompts = story_prompts(max(1, args.stories // args.per_prompt), args.seed)
    llm.generate([{"role": "user", "content": "Hello"}], llm.sampling(max_tokens=8, temperature=0))  # warm up

    rows: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    t_start = time.perf_counter()
    for k, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}]
        for arm in ARMS:
            params = llm.sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=0.95,
                                  seed=args.seed + 100 * k, banned_sequences=masks if arm == "masking" else None)
            t0 = time.perf_counter()
            result = llm.generate(messages, params, n=args.per_prompt,
                                  banned_strings=phrases if arm == "rewind" else None)
            wall = time.perf_counter() - t0
            sampled = result.timings["generated_tokens"]
            kept_all = sum(len(c.token_ids) for c in result.completions)
            for c in result.completions:
                found = find_slop(c.text, phrases)
                rows[arm].append({"prompt": prompt, "text": c.text, "found": found, "words": len(c.text.split()),
                                  "kept_tokens": len(c.token_ids), "batch_sampled_tokens": sampled,
                                  "batch_kept_tokens": kept_all, "batch_tok_s": kept_all / wall if wall else 0.0})
        print(f"  {k + 1}/{len(prompts)} prompts, {time.perf_counter() - t_start:.0f} s", flush=True)
        report(args, rows, len(masks), len(phrases), final=False)

    report(args, rows, len(masks), len(phrases), final=True)


def report(args, rows: dict[str, list[dict]], masked: int, phrases: int, final: bool):
    """The summary table (at the end) and the JSON, also written along the way (final: False),
    so that a long run stopped early still leaves its stories so far."""
    summary = {}
    for arm, rs in rows.items():
        words = sum(r["words"] for r in rs)
        hits = sum(len(r["found"]) for r in rs)
        summary[arm] = {
            "stories": len(rs),
            "stories_with_slop": sum(bool(r["found"]) for r in rs),
            "phrases_found": hits,
            "per_1000_words": round(1000 * hits / words, 3) if words else 0.0,
            "median_phrases_per_story": statistics.median(len(r["found"]) for r in rs),
            "median_tok_s": round(statistics.median(r["batch_tok_s"] for r in rs[:: args.per_prompt]), 2),
            "median_kept_tokens": statistics.median(r["kept_tokens"] for r in rs),
            "median_sampled_per_kept": round(statistics.median(
                r["batch_sampled_tokens"] / max(r["batch_kept_tokens"], 1) for r in rs[:: args.per_prompt]), 3),
            "phrases": sorted({p for r in rs for p in r["found"]}),
        }
    if not final:
        write_json(args.out, {"benchmark": "banned_phrases", "complete": False, "summary": summary, "stories": rows})
        return
    header = ["arm", "stories with slop", "phrases", "per 1k words", "median tok/s", "sampled per kept (median)"]
    print_table(header, [[arm, f"{s['stories_with_slop']}/{s['stories']}", s["phrases_found"], s["per_1000_words"],
                          s["median_tok_s"], s["median_sampled_per_kept"]] for arm, s in summary.items()])
    write_json(args.out, {
        "benchmark": "banned_phrases", "complete": True, "model": args.model, "revision": revision(), "cpu": cpu_name(),
        "settings": {"stories": args.stories, "per_prompt": args.per_prompt, "max_tokens": args.max_tokens, "temperature": args.temperature,
                     "top_p": 0.95, "seed": args.seed, "slop_list": "en", "phrases": phrases,
                     "masked_sequences": masked},
        "summary": summary, "stories": rows,
    })


if __name__ == "__main__":
    main()
