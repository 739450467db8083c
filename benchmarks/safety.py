"""Content safety: precision and recall of the default policy on a labelled set, how much
fiction passes, and what checking a stream costs per token.

    python benchmarks/safety.py                    # both languages, with and without the classifier
    python benchmarks/safety.py --repeats 3        # fewer timing repeats
    python benchmarks/safety.py --threads 4        # the embedder on 4 torch threads (default 1)

The labelled set (benchmarks/data/safety/labelled.jsonl, written for this benchmark and separate
from the classifier's seed sentences in llmos/safety/data/seed.jsonl) holds English and Chinese
texts labelled with one category or "none"; the "none" texts include dark fiction (villains'
threats, war, grief, murder plots) marked `fiction: true`. For each category and language:

- precision: of the texts the policy flagged with the category, the share labelled with it;
- recall: of the texts labelled with the category, the share flagged with it;
- fiction passed: fiction not blocked; fiction clean: fiction with no finding at all.

A text counts as flagged with a category when a finding of that category acts (warn, redact or
block). Cost per streamed token: StreamGuard.feed over the tokens of real text (the first
8,000 characters of Tiny Shakespeare and the Chinese fiction of the labelled set, cut by the
gemma3-270m tokenizer when it is installed, else into words and spaces), the median over the
repeats, with the classifier off and on (on: one embedding per finished sentence). The
classifier runs on English sentences only by default (`classifier.languages`); the third
quality row shows why.
Results: tables on stdout, JSON in benchmarks/results/safety.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import regex
from common import RESULTS, ROOT, cpu_name, print_table, revision, write_json

LABELLED = ROOT / "benchmarks" / "data" / "safety" / "labelled.jsonl"
SHAKESPEARE = ROOT / "benchmarks" / "data" / "tinyshakespeare.txt"


def load_labelled() -> list[dict]:
    return [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate(rows: list[dict], policy, classifier: bool) -> dict:
    from llmos.safety import CATEGORIES, check_text

    verdicts = [check_text(r["text"], policy, classifier=classifier) for r in rows]
    table = {}
    for lang in ("en", "zh", "all"):
        chosen = [(r, v) for r, v in zip(rows, verdicts) if lang in ("all", r["lang"])]
        per = {}
        for c in CATEGORIES:
            tp = sum(1 for r, v in chosen if r["label"] == c and c in v.categories)
            fp = sum(1 for r, v in chosen if r["label"] != c and c in v.categories)
            fn = sum(1 for r, v in chosen if r["label"] == c and c not in v.categories)
            per[c] = {"support": tp + fn, "tp": tp, "fp": fp, "fn": fn,
                      "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None}
        harmful = [(r, v) for r, v in chosen if r["label"] != "none"]
        fiction = [v for r, v in chosen if r["fiction"]]
        none = [v for r, v in chosen if r["label"] == "none"]
        table[lang] = {
            "categories": per,
            "harmful_caught": sum(1 for _, v in harmful if v.categories) / len(harmful),
            "none_flagged": sum(1 for v in none if v.categories) / len(none),
            "fiction": len(fiction),
            "fiction_passed": sum(1 for v in fiction if not v.blocked) / len(fiction),
            "fiction_clean": sum(1 for v in fiction if not v.categories) / len(fiction),
        }
    misses = [{"text": r["text"], "label": r["label"], "got": v.categories}
              for r, v in zip(rows, verdicts) if (r["label"] == "none") != (not v.categories)
              or (r["label"] != "none" and r["label"] not in v.categories)]
    return {"table": table, "mistakes": misses}


def pieces(text: str) -> tuple[list[str], str]:
    """The text cut into tokens: gemma3-270m's when installed (offsets), else words and spaces."""
    from llmos.weights import store

    for home in (store.models_dir(), ROOT / ".test-home" / "models"):
        path = home / "gemma3-270m" / "tokenizer.json"
        if path.exists():
            from tokenizers import Tokenizer

            enc = Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False)
            cuts = sorted({0, len(text), *(s for s, _ in enc.offsets)})
            return [text[a:b] for a, b in zip(cuts, cuts[1:])], "gemma3-270m"
    return regex.findall(r"\s*[\w']+|\s*[^\w\s]|\s+", text), "words"


def stream_cost(tokens: list[str], policy, classifier: bool, repeats: int) -> dict:
    from llmos.safety import StreamGuard

    times = []
    for _ in range(repeats):
        guard = StreamGuard(policy, classifier=classifier)
        t0 = time.perf_counter()
        out = "".join(guard.feed(t) for t in tokens) + guard.finish()
        times.append(time.perf_counter() - t0)
    return {"us_per_token": statistics.median(times) / len(tokens) * 1e6, "tokens": len(tokens),
            "blocked": guard.blocked, "released_chars": len(out), "findings": len(guard.verdict.findings)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "safety.json"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the embedder (1: steady on a shared machine)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from llmos.safety import CATEGORIES, check_text, load_policy
    from llmos.safety.classifier import get_classifier

    policy = load_policy(None)
    rows = load_labelled()
    t0 = time.perf_counter()
    get_classifier()
    fit_s = time.perf_counter() - t0
    results = {"machine": cpu_name(), "revision": revision(), "torch_threads": args.threads, "items": len(rows),
               "by_lang": {lang: sum(1 for r in rows if r["lang"] == lang) for lang in ("en", "zh")},
               "classifier_load_or_fit_s": round(fit_s, 2), "quality": {}, "stream": {}}

    both = replace(policy, classifier_languages=("en", "zh"))
    for name, pol, clf in (("rules", policy, False), ("rules+classifier", policy, True),
                           ("rules+classifier on zh too", both, True)):
        res = evaluate(rows, pol, clf)
        results["quality"][name] = res
        print(f"\n## {name}")
        header = ["category"] + [f"{lang} {m}" for lang in ("en", "zh") for m in ("P", "R", "n")]
        body = []
        for c in CATEGORIES:
            line = [c]
            for lang in ("en", "zh"):
                s = res["table"][lang]["categories"][c]
                line += [f"{s['precision']:.2f}" if s["precision"] is not None else "-",
                         f"{s['recall']:.2f}" if s["recall"] is not None else "-", s["support"]]
            body.append(line)
        print_table(header, body)
        for lang in ("en", "zh"):
            t = res["table"][lang]
            print(f"{lang}: harmful caught {t['harmful_caught']:.2f}, 'none' flagged {t['none_flagged']:.2f}, "
                  f"fiction passed {t['fiction_passed']:.2f} (clean {t['fiction_clean']:.2f}) of {t['fiction']}")

    en = SHAKESPEARE.read_text(encoding="utf-8")[:8000]
    zh = "".join(r["text"] for r in rows if r["lang"] == "zh" and r["fiction"]) * 4
    print("\n## cost per streamed token (median of repeats)")
    body = []
    for lang, text in (("en", en), ("zh", zh)):
        tokens, cut = pieces(text)
        whole = check_text(text, policy, classifier=False)
        streamed = stream_cost(tokens, policy, False, 1)
        results["stream"][lang] = {"tokenizer": cut, "chars": len(text), "tokens": len(tokens),
                                   "whole_text_action": whole.action}
        for name, clf in (("rules", False), ("rules+classifier", True)):
            r = stream_cost(tokens, replace(policy, stream_classifier=clf), clf, args.repeats)
            results["stream"][lang][name] = r
            body.append([lang, cut, len(tokens), name, f"{r['us_per_token']:.1f}", r["findings"]])
        results["stream"][lang]["same_as_check_text"] = streamed["released_chars"] == len(whole.text)
    print_table(["text", "tokens by", "tokens", "detectors", "µs/token", "findings"], body)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
