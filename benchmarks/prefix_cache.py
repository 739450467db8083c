"""Time to first token across a chat's turns, with and without the prefix cache.

    python benchmarks/prefix_cache.py                       # SmolLM2, 10 turns
    python benchmarks/prefix_cache.py --model gemma3-270m --turns 6

A chat with a long system prompt (a writer's Memory) grows by one user line and one reply per
turn; every turn's prompt repeats the whole history. Greedy, 32 new tokens a turn, same model
in one process: the cache is switched off by giving it no room. Both runs must produce the same
replies (checked). Results: a table and benchmarks/results/prefix_cache.json.
"""

from __future__ import annotations

import argparse
import statistics

from common import RESULTS, cpu_name, print_table, revision, write_json

MEMORY = ("You are helping a novelist. The story so far: Mara, a lighthouse keeper on a northern "
          "island, finds a drowned sailor's logbook whose last entries describe her own lighthouse "
          "years before it was built. Keep her voice spare and exact. ") * 6


def chat(llm, turns: int, max_tokens: int) -> list[dict]:
    msgs = [{"role": "system", "content": MEMORY}]
    out = []
    for turn in range(turns):
        msgs.append({"role": "user", "content": f"Write the next two sentences of scene {turn + 1}."})
        r = llm.generate(msgs, llm.sampling(temperature=0, max_tokens=max_tokens))
        msgs.append({"role": "assistant", "content": r.completions[0].text})
        out.append(dict(turn=turn + 1, prompt_tokens=r.timings["prompt_tokens"],
                        cached=r.timings["cached_prompt_tokens"], ttft_s=r.timings["time_to_first_token_s"],
                        text=r.completions[0].text))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "prefix_cache.json"))
    args = ap.parse_args()

    import torch

    from llmos.engine import generate as engine
    from llmos.llm import LLM

    llm = LLM.load(args.model)
    model = llm.model
    runs = {"off": [], "on": []}
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            engine._PREFIXES[model] = engine.PrefixCache(max_tokens=0 if mode == "off" else 8192)
            runs[mode].append(chat(llm, args.turns, args.max_tokens))
    for a, b in zip(runs["off"], runs["on"]):
        if [t["text"] for t in a] != [t["text"] for t in b]:
            raise SystemExit("the prefix cache changed a reply: a bug")
    rows, table = [], []
    for turn in range(args.turns):
        off = statistics.median(r[turn]["ttft_s"] for r in runs["off"])
        on = statistics.median(r[turn]["ttft_s"] for r in runs["on"])
        first = runs["on"][0][turn]
        rows.append(dict(turn=turn + 1, prompt_tokens=first["prompt_tokens"], cached_tokens=first["cached"],
                         ttft_off_s=off, ttft_on_s=on))
        table.append([turn + 1, first["prompt_tokens"], first["cached"], f"{off * 1000:.0f}", f"{on * 1000:.0f}",
                      f"{off / on:.1f}x"])
    print_table(["turn", "prompt tokens", "from cache", "TTFT off ms", "TTFT on ms", "speed-up"], table)
    write_json(args.out, {"model": args.model, "turns": rows, "max_tokens": args.max_tokens, "repeats": args.repeats,
                          "threads": torch.get_num_threads(), "cpu": cpu_name(), "revision": revision()})


if __name__ == "__main__":
    main()
