"""How close the quantized path is to the float32 weights it came from.

    python benchmarks/quantized_quality.py                                   # SmolLM2
    python benchmarks/quantized_quality.py --models smollm2-135m-instruct,gemma3-270m

Held-out Tiny Shakespeare (its last 40,000 characters), 2,000 teacher-forced tokens fed through
a KV cache 16 at a time (the integer kernels' path and the engine's cache, float16 for quantized
weights, as decoding uses them), once with the dequantized weights and a float32 cache and once
at the default precision: top-1 agreement of the two
and each one's perplexity. Results: a table and benchmarks/results/quantized_quality.json.
"""

from __future__ import annotations

import argparse
import math

from common import RESULTS, ROOT, cpu_name, print_table, revision, write_json


def logits_for(model, ids, chunk: int = 16):
    import torch

    from llmos.engine.generate import cache_dtype
    from llmos.model import KVCache

    cache, out = KVCache.allocate(model.config, 1, len(ids) + 1, cache_dtype(model)), []  # the engine's cache
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            piece = torch.tensor([ids[start : start + chunk]])
            out.append(model(piece, cache=cache, kv_len=start + piece.shape[1])[0])
    return torch.cat(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--out", default=str(RESULTS / "quantized_quality.json"))
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from llmos.weights.store import load_checkpoint, resolve

    text = (ROOT / "benchmarks" / "data" / "tinyshakespeare.txt").read_text()[-40000:]
    rows, results = [], {}
    for name in args.models.split(","):
        path = resolve(name)
        runs = {}
        for precision in ("fp32", "auto"):
            loaded = load_checkpoint(path, precision)
            ids = loaded.tokenizer.encode(text)[: args.tokens + 1]
            runs[precision] = (logits_for(loaded.model, ids[:-1]), loaded.precision)
        targets = torch.tensor(ids[1:])
        ppl = {p: math.exp(F.cross_entropy(logits, targets).item()) for p, (logits, _) in runs.items()}
        agreement = (runs["fp32"][0].argmax(-1) == runs["auto"][0].argmax(-1)).float().mean().item()
        results[name] = dict(tokens=len(targets), precision=runs["auto"][1], top1_agreement=agreement,
                             ppl_fp32=ppl["fp32"], ppl_quantized=ppl["auto"])
        rows.append([name, runs["auto"][1], len(targets), f"{agreement:.2%}", f"{ppl['fp32']:.3f}", f"{ppl['auto']:.3f}",
                     f"{ppl['auto'] / ppl['fp32'] - 1:+.3%}"])
    print_table(["model", "precision", "tokens", "top-1 agreement", "ppl fp32", "ppl quantized", "ppl change"], rows)
    write_json(args.out, {"models": results, "threads": torch.get_num_threads(), "cpu": cpu_name(),
                          "revision": revision()})


if __name__ == "__main__":
    main()
