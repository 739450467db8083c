"""Fine-tuning: does adapting a bundled model to a writer's corpus pay, how fast does it train
against transformers + PEFT, and does instruction tuning teach an answer format.

    python benchmarks/finetune.py --phase heldout       # SmolLM2 (and --models gemma3-270m)
    python benchmarks/finetune.py --phase throughput    # against transformers (+ PEFT), same batch
    python benchmarks/finetune.py --phase sft           # held-out instruction pairs, before/after
    python benchmarks/finetune.py --phase multitask     # lambda settings x (LM loss, recall@1, accuracy)

heldout: Tiny Shakespeare prepared with the model's own tokenizer (its last 10% held out), the
base model's loss over the whole held-out part, then `llmos finetune` for --minutes of wall
time with LoRA and with every weight, each evaluated the same way. throughput: training steps
of batch 4 x 256 tokens in child processes (so peak memory is each one's own), LoRA rank 8 on
the attention and MLP projections for both; --repeats rounds, LLMOS and the peer alternating,
and the median of the rounds' medians. sft: the shop questions of benchmarks/data/shop as
prompt/completion pairs, 12 held out; the loss on the held-out answers' tokens before and after.
multitask: Tiny Shakespeare cut into its nine plays (each found by the first speech of a
character only it has) and the plays into passages of about 1,500 characters; a passage's source
is its play and its label the play's genre (tragedy, history, comedy). 10% of the passages held
out. For each lambda setting, `llmos finetune --objective multitask --lora R --group-by play` for
--mt-minutes; then, on the held-out passages: the LM loss, recall@1 (is a passage's nearest
other passage from the same play?) with the style embedding and with the plain mean hidden
state, and the genre accuracy of the label head.
Tables on stdout, JSON in benchmarks/results/finetune_*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, cpu_name, gguf_for, print_table, revision, write_json

SHAKESPEARE = ROOT / "benchmarks" / "data" / "tinyshakespeare.txt"
SHOP = ROOT / "benchmarks" / "data" / "shop" / "questions.jsonl"
WORK = Path(os.environ.get("LLMOS_BENCH_DIR", ROOT / ".bench-finetune"))


def llmos(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "llmos", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"llmos {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def load_plain(name_or_path: str):
    """A model as training sees it: float32, adapters merged."""
    from llmos.model import ModelConfig, Transformer
    from llmos.weights.store import load_weights, resolve

    path = resolve(name_or_path)
    meta = json.loads((path / "config.json").read_text())
    model = Transformer(ModelConfig.from_dict(meta["model"]))
    state = load_weights(path, meta)
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state)
    return model.eval()


def heldout(model: str, data: Path) -> dict:
    from llmos.train.data import TokenData
    from llmos.train.trainer import heldout_loss

    t0 = time.perf_counter()
    r = heldout_loss(load_plain(model), TokenData(data), block=256)
    return {**r, "eval_s": time.perf_counter() - t0}


def final_metrics(run: Path) -> dict:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "tokens_per_s" in r]
    final = next(r for r in reversed(lines) if r.get("final"))
    return {"steps": final["step"], "train_seconds": final["elapsed_s"],
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steps[1:] or steps)}


def phase_heldout(args) -> dict:
    out = {"minutes": args.minutes, "models": {}}
    rows = []
    for model in args.models.split(","):
        data = WORK / f"shake-{model}"
        if not (data / "meta.json").is_file():
            llmos("prepare", str(SHAKESPEARE), "-o", str(data), "--tokenizer", model)
        base = heldout(model, data)
        res = {"base": base}
        rows.append([model, "base model", "-", f"{base['loss']:.3f}", f"{base['ppl']:.2f}", "-", "-"])
        for kind, extra in (("lora", ["--lora", str(args.rank)]), ("full", ["--lr", str(args.full_lr)])):
            run = WORK / f"run-{model}-{kind}"
            if run.exists():
                import shutil

                shutil.rmtree(run)
            t0 = time.perf_counter()
            llmos("finetune", str(data), "-m", model, "-o", str(run), "--time-limit", f"{args.minutes}m",
                  "--eval-interval", "50", "--eval-iters", "4", *extra)
            wall = time.perf_counter() - t0
            r = {**heldout(str(run), data), **final_metrics(run), "wall_s": wall,
                 "adapter_bytes": sum(p.stat().st_size for p in (run / (run / "LATEST").read_text()).glob("*.safetensors"))}
            r["ppl_drop"] = 1 - r["ppl"] / base["ppl"]
            res[kind] = r
            rows.append([model, f"{kind} ({' '.join(extra)})", r["steps"], f"{r['loss']:.3f}", f"{r['ppl']:.2f}",
                         f"{100 * r['ppl_drop']:.1f}%", f"{r['tokens_per_s_median']:.0f}"])
        out["models"][model] = res
    print_table(["model", "run", "steps", "held-out loss", "perplexity", "drop vs base", "train tok/s"], rows)
    return out


# -- throughput -------------------------------------------------------------------------------


def child_steps(engine: str, model: str, lora: bool, batch: int, block: int, steps: int) -> dict:
    """Runs in a child process: `steps` optimizer steps on random tokens; seconds per step."""
    import torch

    torch.manual_seed(0)
    if engine == "llmos":
        m = load_plain(model).train()
        if lora:
            from llmos.train.lora import LoRAConfig, apply_lora

            apply_lora(m, LoRAConfig(8))
        vocab = m.config.vocab_size

        def loss_of(x):
            logits = m(x[:, :-1])
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    else:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        gguf = gguf_for(model)
        m = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        if lora:
            from peft import LoraConfig, get_peft_model

            m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        m.train()
        vocab = m.config.vocab_size

        def loss_of(x):
            return m(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # transformers shifts the labels itself
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        x = torch.randint(vocab, (batch, block + 1))
        t0 = time.perf_counter()
        loss_of(x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    s = statistics.median(times[1:])
    return {"s_per_step": s, "tokens_per_s": batch * block / s, "trainable": sum(p.numel() for p in params),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def phase_throughput(args) -> dict:
    out, rows = {"batch": args.batch, "block": args.block, "steps": args.steps, "models": {}}, []
    out["repeats"] = args.repeats
    for model in args.models.split(","):
        runs: dict[str, list] = {}
        for _ in range(args.repeats):  # interleaved, so both sides see the same machine
            for lora in (True, False):
                for engine in ("llmos", "hf"):
                    cmd = [sys.executable, __file__, "--child", f"{engine},{model},{int(lora)}", "--batch",
                           str(args.batch), "--block", str(args.block), "--steps", str(args.steps)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                    if proc.returncode:
                        raise SystemExit(f"child failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
                    runs.setdefault(f"{engine}_{'lora' if lora else 'full'}", []).append(
                        json.loads(proc.stdout.strip().splitlines()[-1]))
        res = {}
        for key, rs in runs.items():
            res[key] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                        "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "trainable": rs[0]["trainable"],
                        "runs": rs}
        for kind in ("lora", "full"):
            ours, peer = res[f"llmos_{kind}"], res[f"hf_{kind}"]
            res[f"ratio_{kind}"] = ours["tokens_per_s"] / peer["tokens_per_s"]
            rows.append([model, kind, f"{ours['tokens_per_s']:.0f}", f"{peer['tokens_per_s']:.0f}",
                         f"{res[f'ratio_{kind}']:.2f}x", f"{ours['peak_rss_mib']:.0f}", f"{peer['peak_rss_mib']:.0f}"])
        out["models"][model] = res
    print_table(["model", "training", "LLMOS tok/s", "transformers(+PEFT) tok/s", "ratio", "LLMOS peak RSS MiB",
                 "peer peak RSS MiB"], rows)
    return out


# -- the multi-task objective ----------------------------------------------------------------

# The plays of Tiny Shakespeare in file order, each found by the first speech of a character
# that only it has (a few lines around each boundary may go to the neighbour), and their genres.
PLAYS = [("Coriolanus", None, "tragedy"), ("Richard III", "GLOUCESTER:", "history"),
         ("Richard II", "KING RICHARD II:", "history"), ("Romeo and Juliet", "SAMPSON:", "tragedy"),
         ("Henry VI", "WARWICK:", "history"), ("The Winter's Tale", "ARCHIDAMUS:", "comedy"),
         ("Measure for Measure", "DUKE VINCENTIO:", "comedy"), ("The Taming of the Shrew", "LUCENTIO:", "comedy"),
         ("The Tempest", "PROSPERO:", "comedy")]


def play_passages(chars: int = 1500) -> list[dict]:
    import re

    text = SHAKESPEARE.read_text()
    starts = [0]
    for _, marker, _ in PLAYS[1:]:
        m = re.compile(rf"^{re.escape(marker)}$", re.M).search(text, starts[-1] + 1)
        if m is None:
            raise SystemExit(f"no {marker} after offset {starts[-1]}: the corpus is not Tiny Shakespeare")
        starts.append(text.rfind("\n\n", 0, m.start()) + 2)
    records = []
    for (play, _, genre), a, b in zip(PLAYS, starts, starts[1:] + [len(text)]):
        speeches, current = text[a:b].split("\n\n"), ""
        for speech in speeches:
            current = f"{current}\n\n{speech}" if current else speech
            if len(current) >= chars:
                records.append({"text": current, "play": play, "label": genre})
                current = ""
        if len(current) > chars // 3:
            records.append({"text": current, "play": play, "label": genre})
    return records


def heldout_style(model: str, data: Path, records: list[dict]) -> dict:
    """On the held-out passages: LM loss, recall@1 (style embedding and mean hidden state), genre accuracy."""
    import torch

    from llmos.llm import LLM
    from llmos.train.data import TokenData
    from llmos.train.multitask import recall_at_1
    from llmos.train.trainer import heldout_loss

    t0 = time.perf_counter()
    llm = LLM.load(model, precision="fp32")
    texts, plays = [r["text"] for r in records], [r["play"] for r in records]
    with torch.inference_mode():
        pooled = torch.cat([llm._pooled(texts[k : k + 8]) for k in range(0, len(texts), 8)])
    out = {"lm_loss": heldout_loss(load_plain(model), TokenData(data), "val", block=256)["loss"],
           "recall_mean_hidden": recall_at_1(pooled, plays)}
    if llm.heads is not None:
        with torch.inference_mode():
            out["recall_style"] = recall_at_1(llm.heads.embed(pooled), plays)
            if llm.heads.classify is not None:
                guess = llm.heads.classify(pooled).argmax(1).tolist()
                out["genre_accuracy"] = sum(llm.heads.labels[g] == r["label"] for g, r in zip(guess, records)) / len(records)
    out["eval_s"] = time.perf_counter() - t0
    return out


def phase_multitask(args) -> dict:
    model = args.models.split(",")[0]
    folder = WORK / "multitask"
    folder.mkdir(parents=True, exist_ok=True)
    records = play_passages()
    corpus = folder / "plays.jsonl"
    corpus.write_text("".join(json.dumps({**r, "id": k}) + "\n" for k, r in enumerate(records)))
    data = folder / f"data-{model}"
    if not (data / "meta.json").is_file():
        llmos("prepare", str(corpus), "-o", str(data), "--tokenizer", model, "--group-by", "play", "--no-dedup")
    # the held-out passages, as prepare split them (whole records, seeded)
    from llmos.data.clean import CleanOptions, read_documents
    from llmos.data.prepare import split_documents

    docs = list(read_documents([corpus], CleanOptions(), []))
    _, val_pairs = split_documents(docs, 0.1, 1337)
    held = [{"text": t, "play": docs[i].meta["play"], "label": docs[i].meta["label"]} for t, i in val_pairs]
    settings = [(1.0, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.5), (1.0, 0.5, 0.5), (1.0, 2.0, 0.5)]
    out = {"model": model, "passages": len(records), "heldout_passages": len(held), "plays": [p for p, _, _ in PLAYS],
           "minutes": args.mt_minutes, "rank": args.rank, "batch": args.mt_batch, "block": args.mt_block, "settings": []}
    base = heldout_style(model, data, held)
    rows = [["base model", "-", f"{base['lm_loss']:.3f}", "-", f"{base['recall_mean_hidden']:.3f}", "-", "-"]]
    out["base"] = base
    for lam_lm, lam_cl, lam_task in settings:
        run = folder / f"run-{lam_lm}-{lam_cl}-{lam_task}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        llmos("finetune", str(data), "-m", model, "-o", str(run), "--objective", "multitask", "--lora", str(args.rank),
              "--lambda-lm", str(lam_lm), "--lambda-cl", str(lam_cl), "--lambda-task", str(lam_task),
              "--batch-size", str(args.mt_batch), "--block-size", str(args.mt_block), "--time-limit", f"{args.mt_minutes}m",
              "--eval-interval", "25", "--eval-iters", "2")
        r = {"lambda_lm": lam_lm, "lambda_cl": lam_cl, "lambda_task": lam_task, **final_metrics(run),
             **heldout_style(str(run), data, held)}
        out["settings"].append(r)
        rows.append([f"λ=({lam_lm:g}, {lam_cl:g}, {lam_task:g})", r["steps"], f"{r['lm_loss']:.3f}",
                     f"{r['recall_style']:.3f}", f"{r['recall_mean_hidden']:.3f}",
                     f"{r['genre_accuracy']:.3f}" if "genre_accuracy" in r else "-", f"{r['tokens_per_s_median']:.0f}"])
    print_table(["setting (λ_lm, λ_cl, λ_task)", "steps", "held-out LM loss", "recall@1 style embedding",
                 "recall@1 mean hidden", "genre accuracy", "train tok/s"], rows)
    return out


# -- instruction tuning -----------------------------------------------------------------------


def phase_sft(args) -> dict:
    import torch

    from llmos.llm import LLM
    from llmos.train.data import TokenData
    from llmos.train.trainer import heldout_loss

    model = args.models.split(",")[0]
    questions = [json.loads(line) for line in SHOP.read_text().splitlines() if line.strip()]
    random.Random(0).shuffle(questions)
    held, train = questions[:12], questions[12:]
    folder = WORK / "sft"
    folder.mkdir(parents=True, exist_ok=True)
    pairs = folder / "train.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": q["question"], "completion": q["gold"]}) + "\n" for q in train))
    test = folder / "heldout.jsonl"
    test.write_text("".join(json.dumps({"prompt": q["question"], "completion": q["gold"]}) + "\n" for q in held))
    # held-out pairs get their own dataset (all of it the validation split)
    data_test = folder / "data-heldout"
    if not (data_test / "meta.json").is_file():
        llmos("prepare", str(test), "-o", str(data_test), "--tokenizer", model, "--val-fraction", "0.5",
              "--no-dedup")
    run = folder / "run"
    if run.exists():
        import shutil

        shutil.rmtree(run)

    def score(model_name):
        data = TokenData(data_test)
        m = load_plain(model_name)
        losses = [heldout_loss(m, data, split)["loss"] for split in ("train", "val")]
        llm = LLM.load(model_name, precision="fp32")
        with torch.no_grad():
            samples = [llm.generate([{"role": "user", "content": q["question"]}],
                                    llm.sampling(temperature=0, max_tokens=24)).completions[0].text.strip()
                       for q in held[:3]]
        return {"heldout_answer_loss": statistics.mean(losses), "samples": samples}

    before = score(model)
    llmos("finetune", str(pairs), "-m", model, "-o", str(run), "--lora", str(args.rank), "--max-steps",
          str(args.sft_steps), "--eval-interval", "10", "--block-size", "128", "--val-fraction", "0.1")
    after = score(str(run))
    rows = [["before", f"{before['heldout_answer_loss']:.3f}", before["samples"][0]],
            ["after", f"{after['heldout_answer_loss']:.3f}", after["samples"][0]]]
    print_table(["model", "held-out answer loss", f"answer to: {held[0]['question']} (gold: {held[0]['gold']})"], rows)
    return {"model": model, "train_pairs": len(train), "heldout_pairs": len(held), "steps": args.sft_steps,
            "questions": [q["question"] for q in held[:3]], "gold": [q["gold"] for q in held[:3]],
            "before": before, "after": after, **final_metrics(run)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["heldout", "throughput", "sft", "multitask"], default="heldout")
    ap.add_argument("--models", default="smollm2-135m-instruct")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--full-lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--mt-minutes", type=float, default=4)
    ap.add_argument("--mt-batch", type=int, default=16)
    ap.add_argument("--mt-block", type=int, default=128)
    ap.add_argument("--child")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        engine, model, lora = args.child.split(",")
        print(json.dumps(child_steps(engine, model, lora == "1", args.batch, args.block, args.steps)))
        return
    import torch

    WORK.mkdir(parents=True, exist_ok=True)
    result = {"phase": args.phase, "cpu": cpu_name(), "threads": torch.get_num_threads(), "revision": revision(),
              **{"heldout": phase_heldout, "throughput": phase_throughput, "sft": phase_sft,
                 "multitask": phase_multitask}[args.phase](args)}
    write_json(args.out or RESULTS / f"finetune_{args.phase}.json", result)


if __name__ == "__main__":
    main()
