"""Form satisfaction: how often the bundled models keep each form, with and without
constrained decoding.

    python benchmarks/forms.py                                   # 50 samples per form and model
    python benchmarks/forms.py --samples 10 --forms haiku,五言绝句 --models gemma3-270m

Each sample is written by `llmos write` machinery (the poem, slogan, title or social task with
the form named in its prompt), once freely and once under the form's constraint, with the same
seeds and token budget, and judged by the form's checker (llmos.writing.forms.check), which is
separate from the constraint machine. Results: a table on stdout and JSON in
benchmarks/results/forms.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from dataclasses import replace

from common import RESULTS, print_table, write_json

TASK = {"slogan": "slogan", "title": "title", "tweet": "social"}
VARIABLES = {"藏头诗": {"acrostic": "春夏秋冬"}, "acrostic": {"acrostic": "MOON"}}


def run(llm, form_name: str, samples: int, constrained: bool, batch: int) -> dict:
    from llmos.writing import forms
    from llmos.writing.tasks import WriteRequest, prepare_write

    form = forms.get_form(form_name)
    brief = "秋夜" if form.kind == "han" else "the sea at night"
    variables = VARIABLES.get(form_name, {})
    req = WriteRequest(TASK.get(form_name, "poem"), brief, dict(variables), form=form_name)
    prompt, params, stops, _ = prepare_write(llm, req)
    if not constrained:
        params = replace(params, constraint=None)
    ok, tokens, t0 = 0, 0, time.perf_counter()
    examples = []
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        result = llm.generate(prompt, replace(params, seed=1000 + start), n=n, stop=stops)
        for c in result.completions:
            problems = forms.check(form, c.text, **variables)
            ok += not problems
            tokens += len(c.token_ids)
            if len(examples) < 2:
                examples.append({"text": c.text, "problems": problems})
    elapsed = time.perf_counter() - t0
    return {"rate": ok / samples, "samples": samples, "tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "examples": examples}


def main():
    from llmos.llm import LLM
    from llmos.writing.forms import FORMS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--out", default=str(RESULTS / "forms.json"))
    args = ap.parse_args()
    results, rows = {}, []
    for model in args.models.split(","):
        llm = LLM.load(model)
        for form in args.forms.split(","):
            free = run(llm, form, args.samples, False, args.batch)
            kept = run(llm, form, args.samples, True, args.batch)
            results.setdefault(model, {})[form] = {"unconstrained": free, "constrained": kept}
            rows.append([form, model, f"{free['rate']:.0%}", f"{kept['rate']:.0%}", f"{kept['tokens_per_s']:.0f}"])
            print("  ".join(rows[-1]), flush=True)
            # after every form, so that a long run stopped early keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"samples": args.samples, "results": results}, ensure_ascii=False, indent=2))
    header = ["form", "model", "free", "constrained", "constrained tok/s"]
    print()
    print_table(header, rows)
    write_json(args.out, {"samples": args.samples, "results": results})


if __name__ == "__main__":
    main()
