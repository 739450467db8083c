"""Prompt-lookup speculative decoding: decode speed with and without drafts, per writing task.

    python benchmarks/lookahead.py                     # SmolLM2, lookahead 8
    python benchmarks/lookahead.py --model gemma3-270m --lookahead 6

Each task is one chat prompt, greedy, up to 160 new tokens; drafts are the tokens that followed
the latest earlier occurrence of the text's last few tokens. Both runs must give the same text
(checked). Reports drafted and accepted tokens, decode tok/s (median of --repeats) and the
speed-up. Results: a table and benchmarks/results/lookahead.json.
"""

from __future__ import annotations

import argparse
import statistics

from common import RESULTS, cpu_name, print_table, revision, write_json

PASSAGE = ("The lighthouse stood on the northern rock for a hundred years. Every night the keeper "
           "climbed the iron stairs, trimmed the wick, and wrote the weather in a narrow book. "
           "Ships passed far out, their lights small as sparks, and none of them ever stopped.")
TASKS = {
    "rewrite (fix spelling)": "Rewrite this paragraph exactly, correcting only the spelling mistakes:\n\n"
                              + PASSAGE.replace("lighthouse", "lighthuose").replace("climbed", "clibmed"),
    "edit (past to present)": "Rewrite this paragraph in the present tense, changing nothing else:\n\n" + PASSAGE,
    "continue (new text)": "Continue this story with two more paragraphs:\n\n" + PASSAGE,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lookahead", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "lookahead.json"))
    args = ap.parse_args()

    import torch

    from llmos.engine import generate as engine
    from llmos.llm import LLM

    llm = LLM.load(args.model)
    rows, results = [], {}
    for task, prompt in TASKS.items():
        msgs = [{"role": "user", "content": prompt}]
        runs = {0: [], args.lookahead: []}
        for _ in range(args.repeats):
            for k in runs:
                engine._PREFIXES[llm.model] = engine.PrefixCache(max_tokens=0)  # every run prefills cold
                r = llm.generate(msgs, llm.sampling(temperature=0, max_tokens=args.max_tokens, lookahead=k))
                runs[k].append((r.completions[0].text, r.timings))
        texts = {text for k in runs for text, _ in runs[k]}
        if len(texts) != 1:
            raise SystemExit(f"{task}: lookahead changed the text: a bug")
        plain = statistics.median(t["decode_tok_s"] for _, t in runs[0])
        fast = statistics.median(t["decode_tok_s"] for _, t in runs[args.lookahead])
        t = runs[args.lookahead][0][1]
        results[task] = dict(generated=t["generated_tokens"], drafted=t.get("drafted_tokens", 0),
                             accepted=t.get("accepted_tokens", 0), decode_tok_s_plain=plain,
                             decode_tok_s_lookahead=fast, speedup=fast / plain)
        rows.append([task, t["generated_tokens"], t.get("drafted_tokens", 0), t.get("accepted_tokens", 0),
                     f"{plain:.1f}", f"{fast:.1f}", f"{fast / plain:.2f}x"])
    print_table(["task", "tokens", "drafted", "accepted", "plain tok/s", "lookahead tok/s", "speed-up"], rows)
    write_json(args.out, {"model": args.model, "lookahead": args.lookahead, "max_tokens": args.max_tokens,
                          "repeats": args.repeats, "tasks": results, "threads": torch.get_num_threads(),
                          "cpu": cpu_name(), "revision": revision()})


if __name__ == "__main__":
    main()
