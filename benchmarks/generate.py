"""Generation speed: the LLMOS engine against llama.cpp (and transformers), same GGUF, same prompt.

    python benchmarks/generate.py                      # both bundled models
    python benchmarks/generate.py --models smollm2-135m-instruct --repeats 5
    python benchmarks/generate.py --engines llamacpp,llmos,hf_fp32

Each engine runs in its own child process (so peak RSS is its own), loads the model, then times
a 128-token prompt with 256 new tokens, greedy, `--repeats` times; the table reports medians.
llama.cpp is llama-cpp-python (`pip install -e '.[bench]'`, built from source) on the same GGUF
file with the same thread count; transformers loads the GGUF dequantized to float32. LLMOS runs
at its default precision (`llmos`: the GGUF's quantized blocks), at fp16 and fp32, and `-n 8`
(8 sampled candidates sharing one prefill) for aggregate throughput. The ratio column divides
by llama.cpp's single stream measured in the same run. Peak RSS is each child's own: LLMOS
holds one model at a time across its repeated loads, and llama.cpp's child imports neither torch
nor LLMOS. "RSS bound" is the target for LLMOS rows: GGUF size + the KV cache of this run's
384 positions (8 rows for -n 8) + 300 MiB.
Results: a table on stdout and JSON in benchmarks/results/generate.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

from common import RESULTS, ROOT, cpu_name, gguf_for, print_table, revision, write_json

PROMPT_TOKENS, NEW_TOKENS = 128, 256


def prompt_ids(tokenizer_encode) -> list[int]:
    text = (ROOT / "benchmarks" / "data" / "tinyshakespeare.txt")
    text = text.read_text()[:4000] if text.exists() else "Once upon a time there was a story. " * 80
    return tokenizer_encode(text)[:PROMPT_TOKENS]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_llmos(model: str, precision: str, repeats: int, n: int) -> dict:
    import torch

    from llmos.engine.generate import Request, cache_dtype, run
    from llmos.engine.sampling import SamplingParams
    from llmos.weights.store import load_checkpoint, resolve

    import os

    os.environ["LLMOS_PREFIX_CACHE_TOKENS"] = "0"  # every repeat prefills its prompt cold
    path = resolve(model)
    loads, loaded = [], None
    for _ in range(repeats):  # the median of several loads (page cache warm after the first)
        loaded = None  # one model in memory at a time, as in a real process: the peak RSS is one model's
        gc.collect()
        t0 = time.perf_counter()
        loaded = load_checkpoint(path, precision)
        loads.append(time.perf_counter() - t0)
    load_s = statistics.median(loads)
    ids = prompt_ids(loaded.tokenizer.encode)
    if n == 1:
        params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)
    else:
        params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=NEW_TOKENS, seed=0)
    def generate(params, n):
        req = Request(ids, params, n)
        for _ in run(loaded.model, req):
            pass
        return req.timings

    runs = []
    with torch.inference_mode():
        generate(SamplingParams(temperature=0, max_tokens=8), 1)  # warm-up
        for _ in range(repeats):
            t = generate(params, n)
            runs.append(dict(
                ttft_s=t.first_token_s, prefill_tok_s=len(ids) / t.prefill_s,
                decode_tok_s=t.decode_tokens / t.decode_s,
            ))
    c = loaded.model.config  # the KV cache of one stream of this benchmark's length, in the engine's dtype
    kv = c.n_layer * 2 * c.n_kv_head * c.head_dim * (PROMPT_TOKENS + NEW_TOKENS) * cache_dtype(loaded.model).itemsize
    return dict(load_s=load_s, runs=runs, peak_rss_mib=peak_rss_mib(), kv_cache_mib=n * kv / 2**20)


def profile_llmos(model: str, steps: int = 64) -> dict:
    """Where a decode step's time goes: torch.profiler over `steps` single-token steps after a
    128-token prefill, self CPU time per operation, in ms per step."""
    import os

    import torch
    from torch.profiler import profile

    from llmos.engine.generate import cache_dtype
    from llmos.model import KVCache
    from llmos.weights.store import load_checkpoint, resolve

    os.environ["LLMOS_PREFIX_CACHE_TOKENS"] = "0"
    loaded = load_checkpoint(resolve(model), "auto")
    m, ids = loaded.model, prompt_ids(loaded.tokenizer.encode)
    cache = KVCache.allocate(m.config, 1, len(ids) + steps + 8, cache_dtype(m))  # the engine's cache
    with torch.inference_mode():
        m(torch.tensor([ids]), cache=cache, kv_len=len(ids))
        def decode():
            for i in range(steps):
                m(torch.tensor([[ids[i % len(ids)]]]), cache=cache, kv_len=len(ids) + 1 + i)

        decode()  # warm-up (the same positions are written again below)
        t0 = time.perf_counter()
        decode()
        wall = (time.perf_counter() - t0) / steps * 1e3  # without the profiler's own cost
        with profile() as prof:
            decode()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / steps / 1e3
    rows = [dict(op=e.key, ms_per_step=e.self_cpu_time_total / steps / 1e3, calls_per_step=e.count / steps)
            for e in ops[:8]]
    return dict(steps=steps, wall_ms_per_step=wall, profiled_ms_per_step=total, ops=rows)


def run_llamacpp(gguf: str, repeats: int, threads: int) -> dict:
    """In a process that imports neither torch nor LLMOS (the parent finds the GGUF and the
    thread count), so that its peak RSS is llama.cpp's own."""
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    # n_batch=1: llama-cpp-python 0.3.36's batched prefill (any n_batch above 1) crashes with a
    # segmentation fault on these machines, so its prompt is read one token at a time.
    llm = Llama(model_path=str(gguf), n_ctx=PROMPT_TOKENS + NEW_TOKENS + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=1, verbose=False)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(lambda s: llm.tokenize(s.encode(), add_bos=False))

    def last_logits():  # the context's logits of the last token evaluated
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    def generate(new_tokens):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(last_logits()))
        first = time.perf_counter()
        for _ in range(new_tokens - 1):  # greedy: the argmax of the last logits, as the other engines
            llm.eval([token])
            token = int(np.argmax(last_logits()))
        return first - t0, time.perf_counter() - first

    generate(8)  # warm-up
    runs = []
    for _ in range(repeats):
        ttft, decode = generate(NEW_TOKENS)
        runs.append(dict(ttft_s=ttft, prefill_tok_s=len(ids) / ttft, decode_tok_s=(NEW_TOKENS - 1) / decode))
    return dict(load_s=load_s, runs=runs, peak_rss_mib=peak_rss_mib(), threads=threads, n_batch=1)


def run_hf(model: str, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    gguf = gguf_for(model)
    cache = gguf.parent
    t0 = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(cache), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(cache), gguf_file=gguf.name)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(lambda s: tok(s).input_ids)])
    runs = []
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
            total = time.perf_counter() - t0
            runs.append(dict(ttft_s=ttft, prefill_tok_s=ids.shape[1] / ttft,
                             decode_tok_s=(NEW_TOKENS - 1) / (total - ttft)))
    return dict(load_s=load_s, runs=runs, peak_rss_mib=peak_rss_mib())


def child(args) -> dict:
    """Run one measurement in a fresh process; it prints JSON as its last line."""
    cmd = [sys.executable, __file__, "--child", args["engine"], "--models", args["model"],
           "--precision", args.get("precision", "auto"), "--repeats", str(args["repeats"]), "-n", str(args.get("n", 1))]
    if args["engine"] == "llamacpp":
        import torch

        cmd += ["--gguf", str(gguf_for(args["model"])), "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"benchmark child failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(runs, key):
    return statistics.median(r[key] for r in runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("-n", type=int, default=1)
    ap.add_argument("--engines", default="llamacpp,llmos,llmos_n8,llmos_fp16",
                    help="rows to run, comma-separated, from: llamacpp, llmos, llmos_n8, llmos_fp16, "
                         "llmos_fp16_n8, llmos_fp32, hf_fp32; the ratio column needs llamacpp")
    ap.add_argument("--child", choices=["llmos", "hf", "llamacpp"])
    ap.add_argument("--gguf", help=argparse.SUPPRESS)  # the llama.cpp child's file and threads
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--profile", action="store_true",
                    help="instead: where a default-precision decode step's time goes, per operation")
    ap.add_argument("--out", default=str(RESULTS / "generate.json"))
    args = ap.parse_args()
    if args.child == "llmos":
        print(json.dumps(run_llmos(args.models, args.precision, args.repeats, args.n)))
        return
    if args.child == "hf":
        print(json.dumps(run_hf(args.models, args.repeats)))
        return
    if args.child == "llamacpp":
        print(json.dumps(run_llamacpp(args.gguf, args.repeats, args.threads)))
        return

    import torch

    if args.profile:
        out = {"threads": torch.get_num_threads(), "cpu": cpu_name(), "revision": revision(), "models": {}}
        for model in args.models.split(","):
            p = out["models"][model] = profile_llmos(model)
            print(f"\n{model}: {p['wall_ms_per_step']:.1f} ms per decode step "
                  f"({p['profiled_ms_per_step']:.1f} ms under the profiler)")
            print_table(["operation", "ms per step", "calls per step"],
                        [[r["op"], f"{r['ms_per_step']:.2f}", f"{r['calls_per_step']:.0f}"] for r in p["ops"]])
        write_json(args.out if args.out != str(RESULTS / "generate.json") else RESULTS / "generate_profile.json", out)
        return

    rows, results = [], {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "threads": torch.get_num_threads(),
                         "cpu": cpu_name(), "revision": revision(), "models": {}}
    for model in args.models.split(","):
        jobs = {
            "llamacpp": dict(engine="llamacpp", model=model, repeats=args.repeats),
            "llmos": dict(engine="llmos", model=model, precision="auto", repeats=args.repeats),
            "llmos_n8": dict(engine="llmos", model=model, precision="auto", repeats=args.repeats, n=8),
            "llmos_fp16": dict(engine="llmos", model=model, precision="fp16", repeats=args.repeats),
            "llmos_fp16_n8": dict(engine="llmos", model=model, precision="fp16", repeats=args.repeats, n=8),
            "llmos_fp32": dict(engine="llmos", model=model, precision="fp32", repeats=args.repeats),
            "hf_fp32": dict(engine="hf", model=model, repeats=args.repeats),
        }
        wanted = args.engines.split(",")
        unknown = set(wanted) - set(jobs)
        if unknown:
            raise SystemExit(f"unknown --engines {', '.join(sorted(unknown))}; choose from {', '.join(jobs)}")
        r = {name: child(job) for name, job in jobs.items() if name in wanted}
        peer = median(r["llamacpp"]["runs"], "decode_tok_s") if "llamacpp" in r else None
        peer_prefill = median(r["llamacpp"]["runs"], "prefill_tok_s") if "llamacpp" in r else None
        gguf_mib = gguf_for(model).stat().st_size / 2**20
        for name, res in r.items():
            decode = median(res["runs"], "decode_tok_s")
            if "kv_cache_mib" in res:  # the bound: GGUF + KV cache + 300 MiB
                res["rss_budget_mib"] = gguf_mib + res["kv_cache_mib"] + 300
            res["median"] = {k: median(res["runs"], k) for k in ("ttft_s", "prefill_tok_s", "decode_tok_s")}
            res["decode_vs_llamacpp"] = decode / peer if peer else None
            res["prefill_vs_llamacpp"] = res["median"]["prefill_tok_s"] / peer_prefill if peer_prefill else None
            rows.append([model, name, f"{decode:.1f}", f"{decode / peer:.2f}x" if peer else "-",
                         f"{res['median']['prefill_tok_s']:.0f}", f"{res['median']['ttft_s']:.2f}",
                         f"{res['load_s']:.2f}", f"{res['peak_rss_mib']:.0f}",
                         f"{res['rss_budget_mib']:.0f}" if "rss_budget_mib" in res else "-"])
        results["models"][model] = r
    header = ["model", "engine", "decode tok/s", "vs llama.cpp", "prefill tok/s", "TTFT s", "load s", "peak RSS MiB",
              "RSS bound MiB"]
    print_table(header, rows)
    write_json(args.out, results)



if __name__ == "__main__":
    main()
