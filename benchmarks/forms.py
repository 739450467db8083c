"""Form satisfaction: how often the bundled models keep each form with and without constrained
decoding, what the constraint costs in the model's own log-probability, how diverse the samples
are, and how often the checker complains about real poems that keep their forms.

    python benchmarks/forms.py                                   # 50 samples per form and model
    python benchmarks/forms.py --samples 10 --forms haiku,五言绝句 --models gemma3-270m
    python benchmarks/forms.py --real-only                       # the checker on real poems only

Each sample is written by `llmos write` machinery (the poem, slogan, title or social task with
the form named in its prompt), once freely and once under the form's constraint, with the same
seeds and token budget, and judged by the form's checker (llmos.writing.forms.check), which is
separate from the constraint machine. Per form and mode it reports:

- kept: the share of samples that keep every rule of the form;
- logprob/token: the mean log-probability the model itself gave the tokens it wrote (before
  the constraint's mask), so constrained vs free shows what keeping the form costs in fluency;
- distinct-2: distinct bigrams over all bigrams of the samples (characters for Chinese, words
  for English), and repeated lines: the share of lines that appear more than once among them.

The real-poem check runs the checkers over tests/data/poems/ (唐诗三百首's regulated verse and
Song 词, public domain, sources in its README): every poem there is real, most keep their
forms, so a complaint about one is a false alarm or the poem's own licence.
Results: tables on stdout, JSON in benchmarks/results/forms.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from common import RESULTS, ROOT, cpu_name, print_table, revision, write_json

TASK = {"slogan": "slogan", "title": "title", "tweet": "social"}
VARIABLES = {"藏头诗": {"acrostic": "春夏秋冬"}, "acrostic": {"acrostic": "MOON"}}
POEMS = ROOT / "tests" / "data" / "poems"


def units(text: str, chinese: bool) -> list[str]:
    return [c for c in text if not c.isspace() and c not in "，。！？；、"] if chinese else text.lower().split()


def diversity(texts: list[str], chinese: bool) -> dict:
    bigrams = [tuple(u[i: i + 2]) for t in texts for u in [units(t, chinese)] for i in range(len(u) - 1)]
    lines = [line.strip(" ，。！？；,.;:!?").lower() for t in texts for line in t.split("\n") if line.strip()]
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return {"distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
            "repeated_lines": sum(1 for line in lines if counts[line] > 1) / len(lines) if lines else 0.0}


def run(llm, form_name: str, samples: int, constrained: bool, batch: int) -> dict:
    from llmos.writing import forms
    from llmos.writing.tasks import WriteRequest, prepare_write

    form = forms.get_form(form_name)
    chinese = form.kind in ("han", "ci")
    brief = "秋夜" if chinese else "the sea at night"
    variables = VARIABLES.get(form_name, {})
    req = WriteRequest(TASK.get(form_name, "poem"), brief, dict(variables), form=form_name)
    prompt, params, stops, _ = prepare_write(llm, req)
    params = replace(params, logprobs=0)
    if not constrained:
        params = replace(params, constraint=None)
    ok, tokens, logprob, t0 = 0, 0, 0.0, time.perf_counter()
    examples, texts = [], []
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        result = llm.generate(prompt, replace(params, seed=1000 + start), n=n, stop=stops)
        for c in result.completions:
            problems = forms.check(form, c.text, variables)
            ok += not problems
            tokens += len(c.token_ids)
            logprob += sum(lp.logprob for lp in c.logprobs)
            texts.append(c.text)
            if len(examples) < 2:
                examples.append({"text": c.text, "problems": [str(p) for p in problems]})
    elapsed = time.perf_counter() - t0
    return {"rate": ok / samples, "samples": samples, "tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "logprob_per_token": logprob / max(tokens, 1),
            **diversity(texts, chinese), "examples": examples}


def real_poems() -> dict:
    """The checkers on real poems: per tone mode, how many are flagged and for which rules."""
    from llmos.writing import forms

    out = {}
    tang = json.loads((POEMS / "tang300_regulated.json").read_text(encoding="utf-8"))
    ci = json.loads((POEMS / "ci.json").read_text(encoding="utf-8"))
    for mode in ("strict", "loose", "off"):
        for name, poems, form_of in (("tang300 regulated", tang, lambda p: p["type"]),
                                     ("song ci", ci, lambda p: f"词:{p['tune']}")):
            flagged, level, level_flagged, rules = 0, 0, 0, {}
            for p in poems:
                problems = forms.check(forms.get_form(form_of(p)), "\n".join(p["lines"]), tones=mode)
                flagged += bool(problems)
                for q in problems:
                    rules[q.rule] = rules.get(q.rule, 0) + 1
                # near-regulated: rhymes on level tones (a 古绝 rhymed on oblique tones is not 近体诗)
                if name.startswith("tang"):
                    ends = [line.rstrip("，。！？；")[-1:] for line in p["lines"][1::2]]
                    if all("平" in forms.han.rhymebook.tones(c) for c in ends):
                        level += 1
                        level_flagged += bool(problems)
            row = {"poems": len(poems), "flagged": flagged, "rate": flagged / len(poems), "rules": rules}
            if name.startswith("tang"):
                row.update(level_rhymed=level, level_rhymed_flagged=level_flagged,
                           level_rhymed_rate=level_flagged / max(level, 1))
            out.setdefault(name, {})[mode] = row
    return out


def main():
    from llmos.writing.forms import FORMS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--real-only", action="store_true", help="only check the real poems")
    ap.add_argument("--out", default=str(RESULTS / "forms.json"))
    args = ap.parse_args()
    real = real_poems()
    print_table(["corpus", "tones", "poems", "flagged", "level-rhymed flagged", "rules"],
                [[corpus, mode, r["poems"], f"{r['flagged']} ({r['rate']:.0%})",
                  f"{r['level_rhymed_flagged']}/{r['level_rhymed']} ({r['level_rhymed_rate']:.0%})" if "level_rhymed" in r else "-",
                  ", ".join(f"{k} {v}" for k, v in sorted(r["rules"].items()))]
                 for corpus, modes in real.items() for mode, r in modes.items()])
    meta = {"cpu": cpu_name(), "revision": revision(), "samples": args.samples}
    results, rows = {}, []
    if not args.real_only:
        from llmos.llm import LLM

        print()
        for model in args.models.split(","):
            llm = LLM.load(model)
            for form in args.forms.split(","):
                free = run(llm, form, args.samples, False, args.batch)
                kept = run(llm, form, args.samples, True, args.batch)
                results.setdefault(model, {})[form] = {"unconstrained": free, "constrained": kept}
                rows.append([form, model, f"{free['rate']:.0%}", f"{kept['rate']:.0%}",
                             f"{free['logprob_per_token']:.2f}", f"{kept['logprob_per_token']:.2f}",
                             f"{free['distinct_2']:.2f}", f"{kept['distinct_2']:.2f}",
                             f"{free['repeated_lines']:.0%}", f"{kept['repeated_lines']:.0%}",
                             f"{kept['tokens_per_s']:.0f}"])
                print("  ".join(rows[-1]), flush=True)
                # after every form, so that a long run stopped early keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps({**meta, "real_poems": real, "results": results},
                                                     ensure_ascii=False, indent=2))
        header = ["form", "model", "kept free", "kept constrained", "logprob free", "logprob constrained",
                  "distinct-2 free", "distinct-2 constrained", "repeated lines free", "repeated lines constrained",
                  "constrained tok/s"]
        print()
        print_table(header, rows)
    write_json(args.out, {**meta, "real_poems": real, "results": results})


if __name__ == "__main__":
    main()
