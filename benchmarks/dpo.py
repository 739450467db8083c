"""DPO on preference pairs whose sides are known without a human: does a model trained on
them prefer the chosen answers of held-out prompts, and keep the constraint more often when it
writes freely?

    python benchmarks/dpo.py                          # ~30 minutes on 2 cores
    python benchmarks/dpo.py --prompts 40 --steps 40  # a quicker look

The constraint is stated in each prompt: answer in at most --limit words. The bundled
SmolLM2-135M-Instruct writes --samples answers to each of --prompts prompts (one topic each,
temperature 1.0, top-p 0.95, --max-tokens, weights in --precision for both models); an answer
within the limit is "kept", one over it "broken". Each prompt with
both gives up to two pairs (kept chosen, broken rejected). The pairs are split by prompt (so by
topic): 75% train a LoRA adapter with `--objective dpo` through the one training loop; the rest
are held out.

Measured: on held-out pairs, the preference accuracy (implicit reward of chosen above rejected)
and the reward margin, before training (the model is its own reference: 50%) and after, and
the plain log-probability accuracy (chosen above rejected per token, meaningful before too); the
drift, as the language-model loss on held-out text (the end of Tiny Shakespeare) before and
after; and in free generation on every held-out prompt, the share of answers that keep the
limit, from the base model (its samples above) and from the trained one (new samples, same
settings). Results: a table on stdout and JSON in benchmarks/results/dpo.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, ROOT, cpu_name, print_table, revision, write_json

MODEL = "smollm2-135m-instruct"
ADJECTIVES = ["a quiet", "an old", "a crowded", "a flooded", "a frozen", "a forgotten", "a burning", "a tiny",
              "a haunted", "a sunlit", "a broken", "a secret"]
NOUNS = ["harbour", "clock tower", "market", "library", "orchard", "train station", "lighthouse", "garden",
         "bridge", "kitchen"]
TEMPLATES = ["Describe {topic} in at most {limit} words.",
             "In no more than {limit} words, tell me about {topic}.",
             "Write about {topic}. Use {limit} words or fewer.",
             "Give me a picture of {topic} in {limit} words at most."]


def prompts(n: int, limit: int, seed: int) -> list[str]:
    topics = [f"{a} {b}" for a in ADJECTIVES for b in NOUNS]
    random.Random(seed).shuffle(topics)
    if n > len(topics):
        raise SystemExit(f"--prompts is at most {len(topics)} (one topic each)")
    return [TEMPLATES[i % len(TEMPLATES)].format(topic=t, limit=limit) for i, t in enumerate(topics[:n])]


def words(text: str) -> int:
    return len(text.split())


def sample(llm, prompt_texts: list[str], n: int, max_tokens: int, seed: int, label: str) -> dict[str, list[str]]:
    out = {}
    t0 = time.perf_counter()
    for k, p in enumerate(prompt_texts):
        params = llm.sampling(temperature=1.0, top_p=0.95, max_tokens=max_tokens, seed=seed + k)
        result = llm.generate([{"role": "user", "content": p}], params, n=n)
        out[p] = [c.text.strip() for c in sorted(result.completions, key=lambda c: c.index)]
        if (k + 1) % 10 == 0:
            print(f"  {label}: {k + 1}/{len(prompt_texts)} prompts, {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def kept_rate(answers: dict[str, list[str]], limit: int) -> dict:
    flat = [a for texts in answers.values() for a in texts]
    return {"answers": len(flat), "kept": sum(words(a) <= limit for a in flat),
            "kept_share": sum(words(a) <= limit for a in flat) / max(len(flat), 1),
            "mean_words": sum(words(a) for a in flat) / max(len(flat), 1)}


def heldout_text_loss(llm, text: str, tokens: int) -> float:
    from llmos.eval.metrics import text_nll

    ids = llm.tokenizer.encode(text)[:tokens]
    total, count = text_nll(llm.model, ids, 256)
    return total / count


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt")
    ap.add_argument("--limit", type=int, default=20, help="the word limit stated in each prompt")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lora", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp16", help="of both models when they write (the same for both)")
    ap.add_argument("--work", help="folder for the data and the run (default: a temporary folder)")
    ap.add_argument("--out", default=str(RESULTS / "dpo.json"))
    args = ap.parse_args()
    from llmos.data.prefs import Pair, prepare_preferences
    from llmos.llm import LLM
    from llmos.train.config import FINETUNE_DEFAULTS, build_train_config
    from llmos.train.trainer import Trainer

    work = Path(args.work or tempfile.mkdtemp(prefix="llmos-dpo-"))
    work.mkdir(parents=True, exist_ok=True)
    base = LLM.load(MODEL, precision=args.precision)
    texts = prompts(args.prompts, args.limit, args.seed)
    t0 = time.perf_counter()
    # the base model's answers, kept in --work for a rerun with the same settings (they take a while)
    cache = work / "base_answers.json"
    key = {k: getattr(args, k) for k in ("prompts", "samples", "limit", "max_tokens", "seed", "precision")}
    saved = json.loads(cache.read_text()) if cache.is_file() else {}
    if saved.get("settings") == key:
        before, sample_s = saved["answers"], saved["seconds"]
        print(f"base model: answers read from {cache}", flush=True)
    else:
        print(f"base model: {args.samples} answers to each of {len(texts)} prompts", flush=True)
        before = sample(base, texts, args.samples, args.max_tokens, args.seed, "base")
        sample_s = time.perf_counter() - t0
        cache.write_text(json.dumps({"settings": key, "answers": before, "seconds": sample_s}, ensure_ascii=False))

    pairs = []
    for p, answers in before.items():
        kept = [a for a in answers if words(a) <= args.limit and a]
        broken = [a for a in answers if words(a) > args.limit]
        for c, r in list(zip(kept, broken))[:2]:
            pairs.append(Pair([{"role": "user", "content": p}], c, r, "import", MODEL, {"limit": args.limit}))
    data = work / "data"
    report = prepare_preferences(pairs, MODEL, data, val_fraction=0.25, seed=args.seed)
    train_prompts = {json.loads(line)["prompt"][0]["content"]
                     for line in (data / "train.pairs.jsonl").read_text().splitlines()}
    heldout = [p for p in texts if p not in train_prompts]
    print(f"{len(pairs)} pairs from {sum(1 for p in before if any(x.prompt[0]['content'] == p for x in pairs))} "
          f"prompts: {report['train_pairs']} train, {report['val_pairs']} held out; "
          f"{len(heldout)} held-out prompts for free generation", flush=True)

    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = build_train_config(run, defaults=FINETUNE_DEFAULTS["dpo-lora"], flags=dict(
        init_from=MODEL, objective="dpo", lora=args.lora, beta=args.beta, lr=args.lr, min_lr=args.lr / 10,
        max_steps=args.steps, eval_interval=max(args.steps // 3, 1), eval_iters=64, batch_size=4, block_size=128,
        seed=args.seed))
    trainer = Trainer(data, run, cfg)
    evals = []
    trainer.on_eval = lambda m: (evals.append({k: v for k, v in m.items() if isinstance(v, (int, float))}),
                                 print(f"  step {m['step']}: held-out preference accuracy {m['val_pref_acc']:.3f}, "
                                       f"margin {m['val_margin']:.3f}, log-prob accuracy {m['val_logp_acc']:.3f}",
                                       flush=True))
    t1 = time.perf_counter()
    trainer.run()
    trainer.close()
    train_s = time.perf_counter() - t1

    tuned = LLM.load(str(run), precision=args.precision)
    print(f"trained model: {args.samples} answers to each of {len(heldout)} held-out prompts", flush=True)
    after = sample(tuned, heldout, args.samples, args.max_tokens, args.seed + 10_000, "trained")
    text = (ROOT / "benchmarks" / "data" / "tinyshakespeare.txt").read_text()[-20_000:]
    drift = {"base": heldout_text_loss(base, text, 2048), "trained": heldout_text_loss(tuned, text, 2048)}

    first, last = evals[0], evals[-1]
    keep_before = kept_rate({p: before[p] for p in heldout}, args.limit)
    keep_after = kept_rate(after, args.limit)
    rows = [
        ["held-out preference accuracy (implicit reward)", f"{first['val_pref_acc']:.3f}", f"{last['val_pref_acc']:.3f}"],
        ["held-out reward margin", f"{first['val_margin']:.3f}", f"{last['val_margin']:.3f}"],
        ["held-out log-prob accuracy (per token)", f"{first['val_logp_acc']:.3f}", f"{last['val_logp_acc']:.3f}"],
        ["held-out chosen answers' loss (nats/token)", f"{first['val_chosen_nll']:.3f}", f"{last['val_chosen_nll']:.3f}"],
        ["held-out text loss, Tiny Shakespeare (nats/token)", f"{drift['base']:.3f}", f"{drift['trained']:.3f}"],
        [f"free generation: answers within {args.limit} words", f"{keep_before['kept_share']:.3f}",
         f"{keep_after['kept_share']:.3f}"],
        ["free generation: mean words", f"{keep_before['mean_words']:.1f}", f"{keep_after['mean_words']:.1f}"],
    ]
    print()
    print_table(["measure", "before", "after"], rows)
    write_json(Path(args.out), {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "revision": revision(), "model": MODEL,
        "settings": vars(args), "pairs": report, "heldout_prompts": len(heldout),
        "evaluations": evals, "drift_text_loss": drift,
        "free_generation": {"before": keep_before, "after": keep_after},
        "seconds": {"sampling_base": sample_s, "training": train_s},
        "examples": {p: {"before": before[p][:2], "after": after[p][:2]} for p in heldout[:5]},
    })


if __name__ == "__main__":
    main()
