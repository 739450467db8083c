"""Serving load: `llmos serve` under many clients, measured the way vLLM's serving benchmark does.

    python benchmarks/serve.py                          # 32 prompts: one at a time, then 16 at once
    python benchmarks/serve.py --rate 2                 # Poisson arrivals at 2 requests/s (16 at most in flight)
    python benchmarks/serve.py --soak 600               # and a 10-minute run at 16 clients, memory sampled
    python benchmarks/serve.py --soak 600 --soak-only --concurrency 64 --max-batch 16 --disconnect 0.3 \
        --out benchmarks/results/serve_soak.json      # 64 clients, 30% of them leaving mid-stream
    python benchmarks/serve.py --engine-only --out benchmarks/results/serve_engine.json   # no HTTP

The script starts the server in its own process on a free port on 127.0.0.1, and sends N
completion requests of a fixed shape: an input of --input-len tokens (slices of Tiny
Shakespeare), --output-len tokens out (`ignore_eos`, so every request has the same length),
sampled at temperature 0.8, streamed. The same requests run twice: sequentially (one client),
then with up to --concurrency in flight, either all at once (--rate inf) or as Poisson arrivals.
For each it reports request throughput, output tok/s, time to first token (TTFT) and time per
output token after the first (TPOT) at p50/p99, failures, and the server's resident memory.
The soak run keeps --concurrency clients busy for --soak seconds and compares the server's
memory in its first and last minute. With --disconnect P, each request's client leaves
mid-stream with probability P (after a random number of tokens, sometimes before the first):
those that stayed must all succeed, and once the clients stop, the server's /metrics must show
no row in use and no token in flight (every abandoned row freed). Results: a table on stdout
and JSON in benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time

from common import RESULTS, ROOT, cpu_name, print_table, revision, write_json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_prompts(model: str, n: int, input_len: int) -> list[str]:
    """n different prompts of input_len tokens each (by the model's own tokenizer)."""
    from tokenizers import Tokenizer

    from llmos.weights.store import resolve

    tok = Tokenizer.from_file(str(resolve(model) / "tokenizer.json"))
    text_file = ROOT / "benchmarks" / "data" / "tinyshakespeare.txt"
    text = text_file.read_text() if text_file.exists() else " ".join(f"line {i} of a long story." for i in range(50000))
    ids = tok.encode(text, add_special_tokens=False).ids
    rng = random.Random(0)
    starts = [rng.randrange(0, len(ids) - input_len) for _ in range(n)]
    return [tok.decode(ids[s : s + input_len]) for s in starts]


class Server:
    def __init__(self, model: str, max_batch: int, precision: str, max_queue: int = 1024):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "llmos", "serve", "-m", model, "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--precision", precision]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 300):
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.proc.stderr.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not start in time")

    def rss(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client, url: str, prompt: str, output_len: int, seed: int, leave_after: int | None = None) -> dict:
    """Stream one completion; note when it was sent, when its first and last tokens came.
    leave_after: close the connection after this many streamed chunks (a client going away)."""
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.8, "seed": seed, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return {"ok": False, "error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
            seen = 0
            async for line in resp.aiter_lines():
                if leave_after is not None and seen >= leave_after:
                    return {"ok": True, "left": True, "tokens": 0}  # closing the stream drops the connection
                seen += 1
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = time.perf_counter()
    except Exception as e:  # a failed request is counted, not fatal
        return {"ok": False, "error": repr(e)}
    end = time.perf_counter()
    if first is None or tokens != output_len:
        return {"ok": False, "error": f"got {tokens} tokens, expected {output_len}"}
    return {"ok": True, "start": t0, "ttft": first - t0, "tpot": (end - first) / max(1, tokens - 1),
            "latency": end - t0, "tokens": tokens}


async def run_load(url: str, prompts: list[str], output_len: int, concurrency: int, rate: float, seed0: int = 0) -> dict:
    """Send every prompt; at most `concurrency` in flight; arrivals all at once (rate inf) or Poisson."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    gate = asyncio.Semaphore(concurrency)
    rng = random.Random(seed0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def limited(i, prompt):
            async with gate:
                return await one_request(client, url, prompt, output_len, seed0 + i)

        tasks = []
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            tasks.append(asyncio.create_task(limited(i, prompt)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return summarize(results, wall)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(results), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "wall_s": wall, "request_per_s": len(ok) / wall, "output_tok_s": tokens / wall,
        **{f"{name}_p{q}_ms": 1000 * pct([r[name] for r in ok], q) for name in ("ttft", "tpot") for q in (50, 99)},
        "latency_p50_s": pct([r["latency"] for r in ok], 50),
    }


def gauges(url: str) -> dict[str, float]:
    """The server's unlabelled /metrics values (rows in use, tokens in flight, queue depth...)."""
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("llmos_") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


async def soak(server: Server, prompts: list[str], output_len: int, concurrency: int, seconds: float,
               disconnect: float = 0.0) -> dict:
    """Keep `concurrency` clients busy for `seconds`, a `disconnect` share of them leaving
    mid-stream; sample the server's memory and rows in use every 2 s; at the end, check that
    every row was freed."""
    import httpx

    samples: list[tuple[float, float, float]] = []
    done = failed = left = tokens = 0
    errors: set[str] = set()
    rng = random.Random(1)
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(w):
            nonlocal done, failed, left, tokens
            i = w
            while time.perf_counter() < stop_at:
                leave = rng.randrange(0, output_len) if rng.random() < disconnect else None
                r = await one_request(client, server.url, prompts[i % len(prompts)], output_len, 10_000 + i, leave)
                done += 1
                left += bool(r.get("left"))
                failed += not r["ok"]
                if not r["ok"]:
                    errors.add(r["error"])
                tokens += r.get("tokens", 0)
                i += concurrency

        async def sampler():
            while time.perf_counter() < stop_at:
                g = await asyncio.to_thread(gauges, server.url)
                samples.append((time.perf_counter() - t0, server.rss(), g.get("llmos_running_sequences", 0)))
                await asyncio.sleep(2)

        await asyncio.gather(sampler(), *(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    deadline = time.time() + 10  # the last abandoned rows are freed at the next step
    while True:
        end = gauges(server.url)
        if (end["llmos_running_sequences"] == 0 and end["llmos_tokens_in_flight"] == 0) or time.time() > deadline:
            break
        time.sleep(0.2)
    first = [m for t, m, _ in samples if t < 60]
    last = [m for t, m, _ in samples if t > samples[-1][0] - 60]
    return {"seconds": wall, "requests": done, "left_mid_stream": left, "stayed": done - left, "failed": failed,
            "errors": sorted(errors)[:5], "output_tok_s": tokens / wall,
            "rss_first_minute_mib": statistics.median(first), "rss_last_minute_mib": statistics.median(last),
            "rss_max_mib": max(m for _, m, _ in samples),
            "rows_in_use_max": max(r for _, _, r in samples),
            "rows_in_use_after": end["llmos_running_sequences"], "tokens_in_flight_after": end["llmos_tokens_in_flight"],
            "generation_requests_total": end["llmos_generation_requests_total"],
            "rss_samples": [(round(t, 1), round(m, 1), r) for t, m, r in samples]}


def engine_only(model: str, precision: str, input_len: int, steps: int = 64) -> dict:
    """The engine's decode steps in this process, without HTTP or threads: 1 row against 16 rows."""
    from dataclasses import replace

    import torch

    from llmos.engine.generate import Engine, Request
    from llmos.llm import LLM

    torch.set_grad_enabled(False)
    llm = LLM.load(model, precision=precision)
    ids = llm.tokenizer.encode(make_prompts(model, 1, input_len)[0])[:input_len]
    out = {}
    for rows in (1, 16):
        engine = Engine(llm.model, max_batch=16, max_len=input_len + steps + 8)
        params = llm.sampling(max_tokens=steps + 4, temperature=0.8)
        for i in range(rows):
            engine.add(Request(ids, replace(params, seed=i, stop_token_ids=[])))
        engine.step()  # admission: every prefill
        engine.step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        out[rows] = 1000 * (time.perf_counter() - t0) / steps
    return {"ms_per_step_1": out[1], "ms_per_step_16": out[16], "speedup": 16 * out[1] / out[16]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rate", type=float, default=float("inf"), help="requests/s, Poisson arrivals (default: all at once)")
    ap.add_argument("--soak", type=float, default=0, help="seconds of sustained load at --concurrency (0: skip)")
    ap.add_argument("--soak-only", action="store_true", help="skip the sequential/concurrent comparison")
    ap.add_argument("--disconnect", type=float, default=0.0,
                    help="soak: share of clients that leave mid-stream, at a random token (0-1)")
    ap.add_argument("--max-batch", type=int, default=None, help="the server's rows (default: --concurrency)")
    ap.add_argument("--engine-only", action="store_true", help="time the engine's decode steps in-process, no HTTP")
    ap.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = ap.parse_args()

    from llmos.weights.store import resolve

    resolve(args.model)  # pull it first, outside any timing
    if args.engine_only:
        r = engine_only(args.model, args.precision, args.input_len)
        print(f"scheduler without HTTP: {r['ms_per_step_1']:.1f} ms per step for 1 row, {r['ms_per_step_16']:.1f} ms for 16 rows: "
              f"{r['speedup']:.2f}x the tokens per second")
        write_json(args.out, {"model": args.model, "cpu": cpu_name(), "revision": revision(), **r})
        return
    prompts = make_prompts(args.model, args.num_prompts, args.input_len)
    server = Server(args.model, args.max_batch or max(args.concurrency, 1), args.precision)
    try:
        server.wait_ready()
        asyncio.run(run_load(server.url, prompts[:2], 8, 2, float("inf"), seed0=99))  # warm-up
        rss_start = server.rss()
        results = {"model": args.model, "precision": args.precision, "cpu": cpu_name(), "revision": revision(),
                   "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                   "concurrency": args.concurrency, "rate": str(args.rate), "rss_start_mib": rss_start,
                   "max_batch": args.max_batch or max(args.concurrency, 1), "disconnect": args.disconnect}
        if not args.soak_only:
            print(f"sequential: {len(prompts)} requests, one at a time", flush=True)
            results["sequential"] = asyncio.run(run_load(server.url, prompts, args.output_len, 1, float("inf")))
            print(f"concurrent: up to {args.concurrency} in flight, rate {args.rate}", flush=True)
            results["concurrent"] = asyncio.run(run_load(server.url, prompts, args.output_len, args.concurrency, args.rate))
            results["rss_after_mib"] = server.rss()
            results["speedup"] = results["concurrent"]["output_tok_s"] / results["sequential"]["output_tok_s"]
        if args.soak:
            print(f"soak: {args.concurrency} clients for {args.soak:.0f} s", flush=True)
            results["soak"] = asyncio.run(soak(server, prompts, args.output_len, args.concurrency, args.soak,
                                               args.disconnect))
    finally:
        server.stop()

    rows = []
    for name in ("sequential", "concurrent") if not args.soak_only else ():
        r = results[name]
        rows.append([name, f"{r['requests'] - r['failed']}/{r['requests']}", f"{r['request_per_s']:.2f}",
                     f"{r['output_tok_s']:.1f}", f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}",
                     f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f}", f"{r['wall_s']:.0f}"])
    if rows:
        print()
        print_table(["run", "ok", "req/s", "output tok/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms", "wall s"], rows)
        print(f"\nconcurrent / sequential output tok/s: {results['speedup']:.2f}x (target >= 5x)")
        print(f"server RSS: {rss_start:.0f} MiB after warm-up, {results['rss_after_mib']:.0f} MiB after both runs")
    if args.soak:
        s = results["soak"]
        print(f"soak {s['seconds']:.0f} s: {s['requests']} requests ({s['left_mid_stream']} left mid-stream), "
              f"{s['failed']} failed, {s['output_tok_s']:.1f} tok/s; "
              f"RSS first minute {s['rss_first_minute_mib']:.0f} MiB, last minute {s['rss_last_minute_mib']:.0f} MiB, "
              f"max {s['rss_max_mib']:.0f} MiB; rows in use at most {s['rows_in_use_max']:.0f}, "
              f"after the clients stopped {s['rows_in_use_after']:.0f} (tokens in flight {s['tokens_in_flight_after']:.0f})")
        for e in s["errors"]:
            print("  error:", e)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
