"""Hyperparameter search against the hand-tuned recipe, on character-level Tiny Shakespeare.

    python benchmarks/sweep_shakespeare.py                     # 24 trials of 2 minutes, then 10 + 10 minutes (~40 min)
    python benchmarks/sweep_shakespeare.py --trials 6 --trial-minutes 0.5 --final-minutes 1   # a quick look
    python benchmarks/sweep_shakespeare.py --trials 12 --trial-minutes 10 --random-trials 5 \
        --pruner-startup 3 --prune-after 0.4      # trials as long as the target run (~65 min)
    python benchmarks/sweep_shakespeare.py --work W --trials 12 --trial-minutes 10 --random-trials 5 \
        --pruner-startup 3 --prune-after 0.4 --multivariate   # 12 more trials in W's study, multivariate TPE
    python benchmarks/sweep_shakespeare.py --space muon-16x128 --trials 12 --trial-minutes 10 --random-trials 5 \
        --pruner-startup 3 --prune-after 0.4 --multivariate   # a smaller space: Muon, batch 16, context 128 fixed
    python benchmarks/sweep_shakespeare.py --work W --trials 0 --final-seed 1 --space muon-16x128 ...
                                           # W's best against the hand-tuned recipe again, from seed 1

The sweep runs through llmos.train.sweep (the library under `llmos sweep`): TPE sampling (8
random trials first by default), median pruning, over the pretraining options of SPACE below, each trial
training for --trial-minutes of wall time. Two worker processes share one study in SQLite.
Then the sweep's best options and the hand-tuned 10-minute recipe (HEADLINE of
benchmarks/train_shakespeare.py) train for --final-minutes each, at the same time, and both
are measured with the same 200 validation batches (train_shakespeare.final_val_loss, each at
its own context length, as the trials were).

Every training here, trials and final runs, has one thread in one of two processes running
side by side, so each sees the same machine: one core, and a neighbour busy on the other.
The final runs keep the measurement settings of HEADLINE (evaluation every 1000 steps, 20
batches) whatever the sweep used for pruning. Results: a table on stdout and JSON in
benchmarks/results/sweep_shakespeare.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from common import RESULTS, cpu_name, print_table, revision, write_json
from train_shakespeare import HEADLINE, prepare_data

# Searched: ranges around what small character models train well with, wider than the
# hand-tuned recipe on every side (it sits inside, not at the centre of each range).
SPACE = {
    "optimizer": ["adamw", "muon"],
    "lr": {"low": 5e-4, "high": 2e-2, "log": True},
    "batch_size": [8, 16, 32],
    "block_size": [64, 128, 256],
    "weight_decay": {"low": 0.0, "high": 0.5},
    "warmup_steps": {"low": 0, "high": 200, "step": 50},
    "model.n_layer": [3, 4, 6],
    "model.d_model": [96, 128, 192],
}
# The fourth budget's space: what every one of the best trials of the two long studies shared
# is fixed (Muon, batch 16, context 128: the top four of their 24 trials), the rest searched
# over the same ranges as SPACE.
NARROW_FIXED = {"optimizer": "muon", "batch_size": 16, "block_size": 128}
SPACES = {"full": (SPACE, {}),
          "muon-16x128": ({k: v for k, v in SPACE.items() if k not in NARROW_FIXED},
                          {**NARROW_FIXED, "model": {"max_seq_len": 128}})}
# Fixed: the baby GPT preset with a context that holds every block_size; min_lr is lr/10 (the
# default, which HEADLINE also uses); evaluations often enough for the pruner to compare trials,
# on 8 batches (each evaluation is spent out of the trial's minutes: 20 batches of 32 x 256
# would take a large model's trial half a minute).
BASE = {"preset": "baby-gpt", "model": {"max_seq_len": 256}, "max_steps": 10**9, "beta2": 0.99, "grad_clip": 1.0,
        "eval_interval": 100, "eval_iters": 8, "sample_tokens": 8, "log_interval": 50}
# How the final runs are measured, for both sides.
MEASURE = {"max_steps": 10**9, "eval_interval": 1000, "eval_iters": 20}


def sweep_file(work: Path, data: Path, args) -> Path:
    import yaml

    pruner = {"name": args.pruner}
    if args.pruner == "median":
        pruner.update(startup_trials=args.pruner_startup, warmup=args.prune_after)
    space, fixed = SPACES[args.space]
    doc = {"data": str(data.resolve()), "output": "sweep", "base": {**BASE, **fixed, "time_limit": args.trial_minutes * 60},
           "space": space, "metric": "val_loss", "direction": "minimize", "trials": max(args.trials, 1),  # 0: replay only
           "pruner": pruner, "sampler": {"name": "tpe", "startup_trials": args.random_trials,
                                                      **({"multivariate": True, "constant_liar": True} if args.multivariate else {})}, "seed": args.seed,
           "study": "shakespeare"}
    path = work / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sweep_worker(path: str, worker: int, trials: int) -> int:
    """One of the processes sharing the study: one thread, its own sampler seed."""
    import torch

    from llmos.train.sweep import describe_params, load_spec, run_sweep

    torch.set_num_threads(1)
    spec = load_spec(path)
    spec.seed = spec.seed + 1000 * worker

    def line(row, best):
        value = f"{row['value']:.4f}" if row["value"] is not None else f"({row['last']:.4f})" if row["last"] else "-"
        print(f"[worker {worker}] trial {row['number']}: {row['state'].lower()} {value} after {row['steps']} steps, "
              f"{row['seconds'] or 0:.0f} s; {describe_params(row['params'])}" + (f"  {row['error']}" if row["error"] else ""),
              flush=True)

    run_sweep(spec, trials=trials, on_trial=line)
    return worker


def final_run(data: str, out: str, recipe: dict, minutes: float) -> dict:
    import torch

    from train_shakespeare import train_run

    torch.set_num_threads(1)
    return train_run(Path(data), Path(out), recipe, time_limit=minutes * 60)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=24, help="trials to run now, shared by the workers (a study resumed in --work keeps its earlier ones)")
    ap.add_argument("--trial-minutes", type=float, default=2.0, help="wall-time budget of each trial")
    ap.add_argument("--final-minutes", type=float, default=10.0, help="wall-time budget of each final run")
    ap.add_argument("--random-trials", type=int, default=8, help="TPE's random trials before it models the results")
    ap.add_argument("--multivariate", action="store_true",
                    help="TPE models the options jointly, and the workers do not draw the same point (constant liar)")
    ap.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    ap.add_argument("--pruner-startup", type=int, default=4, help="median pruning: completed trials before any is pruned")
    ap.add_argument("--prune-after", type=float, default=0.25,
                    help="median pruning: the share of a trial's budget before it can be pruned")
    ap.add_argument("--space", choices=sorted(SPACES), default="full",
                    help="full: every option of SPACE searched; muon-16x128: optimizer, batch and context fixed "
                         "to what the best trials of the earlier studies shared")
    ap.add_argument("--workers", type=int, default=2, help="processes sharing the study (one thread each)")
    ap.add_argument("--seed", type=int, default=0, help="the sampler's seed (worker k adds 1000 k)")
    ap.add_argument("--work", help="folder for data, the study and runs (default: a temporary folder)")
    ap.add_argument("--final-seed", type=int, default=0,
                    help="the training seed of both final runs (with --trials 0 and the same --work: the "
                         "same comparison again, from other initial weights and batches)")
    ap.add_argument("--out", default=str(RESULTS / "sweep_shakespeare.json"))
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="llmos-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    load_before = os.getloadavg()  # the machine is shared: what else ran shows here
    path = sweep_file(work, data, args)

    from llmos.train.sweep import best_options, load_spec, open_study, sorted_rows, summary, write_results

    spec = load_spec(path)
    held = len(open_study(spec).trials)  # created here once, so that the workers only join it; or resumed
    shares = [args.trials // args.workers + (w < args.trials % args.workers) for w in range(args.workers)]
    t0 = time.perf_counter()
    ctx = get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        for done in [pool.submit(sweep_worker, str(path), w, n) for w, n in enumerate(shares) if n]:
            done.result()
    sweep_s = time.perf_counter() - t0
    study = open_study(spec)
    rows, best = summary(study)
    if best is None:
        sys.exit("no trial completed: nothing to compare")
    best_yaml, plot_png = write_results(study, spec.output)

    tuned = {**best_options(study), **MEASURE, "seed": args.final_seed}
    tuned.pop("time_limit", None)
    hand = {**HEADLINE, **MEASURE, "seed": args.final_seed}
    load_final = os.getloadavg()
    t1 = time.perf_counter()
    with ProcessPoolExecutor(2, mp_context=ctx) as pool:  # side by side: the same conditions for both
        tag = f"-seed{args.final_seed}" if args.final_seed else ""
        sweep_job = pool.submit(final_run, str(data), str(work / f"final-sweep{tag}"), tuned, args.final_minutes)
        hand_job = pool.submit(final_run, str(data), str(work / f"final-hand{tag}"), hand, args.final_minutes)
        mine, theirs = sweep_job.result(), hand_job.result()
    final_s = time.perf_counter() - t1

    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    table = [[f"trial {r['number']}", r["state"].lower(),
              f"{r['value']:.4f}" if r["value"] is not None else f"({r['last']:.4f})" if r["last"] is not None else "-",
              r["steps"], f"{r['seconds'] or 0:.0f}", " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in r["params"].items())]
             for r in sorted_rows(rows, "minimize")]
    print_table(["trial", "state", "val loss", "steps", "s", "options"], table)
    print()
    print_table(["final run", "params", "steps", "tokens", "val loss (200 batches)"], [
        [f"sweep's best (trial {best['number']})", f"{mine['params'] / 1e6:.2f}M", mine["steps"], f"{mine['tokens']:,}",
         f"{mine['val_loss']:.4f}"],
        ["hand-tuned HEADLINE", f"{theirs['params'] / 1e6:.2f}M", theirs["steps"], f"{theirs['tokens']:,}",
         f"{theirs['val_loss']:.4f}"],
    ])
    diff = mine["val_loss"] - theirs["val_loss"]
    print(f"\nsweep minus hand-tuned: {diff:+.4f} nats/char ({'better' if diff < 0 else 'worse'}); "
          f"sweep {sweep_s / 60:.1f} min, final runs {final_s / 60:.1f} min")
    command = "python benchmarks/sweep_shakespeare.py " + " ".join(sys.argv[1:])
    write_json(args.out, {
        "cpu": cpu_name(), "revision": revision(), "date": time.strftime("%Y-%m-%d"),
        "load_average": {"start": load_before, "before_final": load_final, "end": os.getloadavg()},
        "budget": {"trials": args.trials, "trials_held_before": held, "trial_minutes": args.trial_minutes, "workers": args.workers,
                   "random_trials": args.random_trials, "space": args.space, "multivariate": args.multivariate, "pruner": args.pruner,
                   "threads_per_process": 1, "final_minutes": args.final_minutes, "final_seed": args.final_seed, "sweep_wall_s": round(sweep_s),
                   "final_wall_s": round(final_s)},
        "sweep_file": path.read_text(), "counts": counts,
        "trials": [{k: r[k] for k in ("number", "state", "value", "last", "steps", "seconds", "params", "error")}
                   for r in rows],
        "best": {"number": best["number"], "value": best["value"], "params": best["params"], "options": tuned},
        "final": {"sweep": {**mine, "recipe": tuned}, "hand_tuned": {**theirs, "recipe": hand},
                  "difference": diff, "ratio": mine["val_loss"] / theirs["val_loss"]},
        "outputs": {"best_yaml": str(best_yaml), "plot": str(plot_png)},
        "commands": {"benchmark": command.strip(), "sweep_alone": f"llmos sweep {path}",
                     "train_best": f"llmos train {data} -o runs/best --config {best_yaml} --time-limit "
                                   f"{args.final_minutes:g}m"},
    })


if __name__ == "__main__":
    main()
