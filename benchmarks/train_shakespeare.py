"""Character-level Shakespeare: nanoGPT's CPU "baby GPT", the n-gram baseline, throughput against
a plain PyTorch loop, bf16 against fp32, and the best validation loss in 10 minutes.

    python benchmarks/train_shakespeare.py                 # everything (~20 minutes on 2 cores)
    python benchmarks/train_shakespeare.py --only baby,ngram
    python benchmarks/train_shakespeare.py --only headline --minutes 10
    python benchmarks/train_shakespeare.py --only peer,headline --minutes 10   # against nanoGPT's recipe, same budget

Data: benchmarks/data/tinyshakespeare.txt, prepared with `--tokenizer char` (the validation set
is the last 10% of the text, cut at a line break, as in nanoGPT). Validation losses are in nats
per character, measured at the end on 200 batches (nanoGPT's periodic estimate uses 20).
Results: a table on stdout and JSON in benchmarks/results/train_shakespeare.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RESULTS, ROOT, cpu_name, print_table, write_json

CORPUS = ROOT / "benchmarks" / "data" / "tinyshakespeare.txt"

# nanoGPT's config/train_shakespeare_char.py with its README's CPU overrides.
BABY = dict(preset="baby-gpt", batch_size=12, block_size=64, max_steps=2000, lr=1e-3, min_lr=1e-4,
            warmup_steps=100, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_iters=20)
# The 10-minute recipe: the baby GPT's shape with context 128, Muon for the hidden matrices at a
# higher learning rate; chosen by the runs recorded in docs/benchmarks.md.
HEADLINE = dict(preset="baby-gpt", model=dict(max_seq_len=128), optimizer="muon", batch_size=16, block_size=128,
                max_steps=10**9, lr=8e-3, min_lr=8e-4, warmup_steps=100, beta2=0.99, weight_decay=0.3,
                grad_clip=1.0, eval_interval=1000, eval_iters=20)


def prepare_data(work: Path) -> Path:
    from llmos.data.prepare import PrepareConfig, prepare

    out = work / "shake-char"
    if not (out / "meta.json").exists():
        prepare(PrepareConfig([str(CORPUS)], str(out), tokenizer="char"))
    return out


@torch.no_grad()
def final_val_loss(model, data, block: int, iters: int = 200, batch: int = 12) -> float:
    model.eval()
    g = torch.Generator().manual_seed(1234)
    losses = []
    for _ in range(iters):
        x, y = data.batch("val", batch, block, g)
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def train_run(data_dir: Path, out: Path, recipe: dict, time_limit: float | None = None) -> dict:
    from llmos.train.data import TokenData
    from llmos.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(**{**recipe, "time_limit": time_limit})
    trainer = Trainer(data_dir, out, cfg)
    t0 = time.perf_counter()
    last = trainer.run()
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r]
    return {
        "steps": last["step"], "wall_s": wall, "params": trainer.model.num_params(),
        "val_loss_periodic": last["val_loss"],
        "val_loss": final_val_loss(trainer.model, TokenData(data_dir), trainer.block),
        "tokens_per_s_median": sorted(tps)[len(tps) // 2] if tps else None,
        "tokens": trainer.tokens_seen,
    }


def plain_loop_tokens_per_s(data_dir: Path, steps: int = 200) -> float:
    """The same model and batch in the plainest loop: no eval, logging or checkpoints."""
    from llmos.model import ModelConfig, Transformer
    from llmos.train.data import TokenData

    data = TokenData(data_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("baby-gpt", vocab_size=data.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(0)

    def step():
        x, y = data.batch("train", 12, 64, g)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(10):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * 12 * 64 / (time.perf_counter() - t0)


def dtype_tokens_per_s(data_dir: Path, work: Path, steps: int = 150) -> dict:
    out = {}
    for dtype in ("fp32", "bf16"):
        r = train_run(data_dir, work / f"dtype-{dtype}", {**BABY, "max_steps": steps, "eval_interval": 10**6,
                                                          "dtype": dtype, "log_interval": 10})
        out[dtype] = r["tokens_per_s_median"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="ngram,baby,plain,dtype,peer,headline")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-time budget of the headline run")
    ap.add_argument("--recipe", help="JSON overrides of the headline recipe")
    ap.add_argument("--work", help="folder for data and runs (default: a temporary folder)")
    ap.add_argument("--out", default=str(RESULTS / "train_shakespeare.json"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="llmos-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_data(work)
    results = {"threads": torch.get_num_threads(), "cpu": cpu_name()}
    if Path(args.out).exists():
        results = {**json.loads(Path(args.out).read_text()), **results}
    rows = []
    if "ngram" in only:
        from llmos.train.ngram import evaluate_dataset

        results["ngram"] = {str(n): evaluate_dataset(data_dir, n) for n in (3, 5, 7)}
        for n, r in results["ngram"].items():
            rows.append([f"{n}-gram Kneser-Ney", "-", "-", f"{r['val_loss']:.3f}", "-", "-"])
    if "baby" in only:
        r = train_run(data_dir, work / "baby", BABY)
        results["baby_gpt"] = r
        rows.append(["baby GPT, nanoGPT recipe (2000 it)", f"{r['params'] / 1e6:.2f}M", f"{r['wall_s']:.0f}",
                     f"{r['val_loss']:.3f}", f"{r['tokens_per_s_median']:,.0f}", "target <= 1.88"])
    if "plain" in only:
        plain = plain_loop_tokens_per_s(data_dir)
        ours = train_run(data_dir, work / "throughput", {**BABY, "max_steps": 200, "eval_interval": 10**6,
                                                         "log_interval": 10})["tokens_per_s_median"]
        results["throughput"] = {"plain_loop_tokens_per_s": plain, "trainer_tokens_per_s": ours, "ratio": ours / plain}
        rows.append(["throughput: trainer vs plain loop", "-", "-", "-", f"{ours:,.0f} / {plain:,.0f}", f"{ours / plain:.2f}x"])
    if "dtype" in only:
        d = dtype_tokens_per_s(data_dir, work)
        results["autocast"] = d
        rows.append(["baby GPT fp32 vs bf16 autocast", "-", "-", "-", f"{d['fp32']:,.0f} / {d['bf16']:,.0f}",
                     f"bf16 {d['bf16'] / d['fp32']:.2f}x"])
    if "peer" in only:  # the baby GPT recipe, its schedule stretched over the same wall-time budget
        recipe = {**BABY, "max_steps": 10**9, "eval_interval": 1000}
        r = train_run(data_dir, work / "peer", recipe, time_limit=args.minutes * 60)
        results["peer"] = {**r, "recipe": recipe, "minutes": args.minutes}
        rows.append([f"nanoGPT baby GPT recipe, {args.minutes:g} minutes", f"{r['params'] / 1e6:.2f}M", f"{r['wall_s']:.0f}",
                     f"{r['val_loss']:.3f}", f"{r['tokens_per_s_median']:,.0f}", "same machine, same budget"])
    if "headline" in only:
        recipe = {**HEADLINE, **json.loads(args.recipe or "{}")}
        r = train_run(data_dir, work / "headline", recipe, time_limit=args.minutes * 60)
        results["headline"] = {**r, "recipe": recipe, "minutes": args.minutes}
        rows.append([f"best in {args.minutes:g} minutes", f"{r['params'] / 1e6:.2f}M", f"{r['wall_s']:.0f}",
                     f"{r['val_loss']:.3f}", f"{r['tokens_per_s_median']:,.0f}", "nanoGPT scaled: 1.52"])
    header = ["run", "params", "wall s", "val loss", "tok/s", "note"]
    print_table(header, rows)
    write_json(args.out, results)



if __name__ == "__main__":
    main()
