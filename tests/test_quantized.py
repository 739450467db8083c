"""Quantized GGUF weights kept as blocks: the C++ kernels against gguf-py's decoder and float
matrix products, conversion and loading of quantized tiny models, unsupported block types, and
the quality guard on a bundled model (teacher-forced, against its float32 weights)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import llmos, write_tiny_gguf
import llmos.kernels as kernels
from llmos.weights import store

kernels.load()
PATHS = sorted({torch.ops.llmos.set_kernel_path(p) for p in (0, 1, 2)})  # those this CPU has
torch.ops.llmos.set_kernel_path(2)


def random_blocks(block_type: int, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random GGUF blocks with small, finite float16 scales (random bits elsewhere)."""
    rng = np.random.default_rng(seed)
    _, block, nbytes = kernels.BLOCK_TYPES[block_type]
    b = rng.integers(0, 256, size=(rows, k // block, nbytes), dtype=np.uint8)
    scales = lambda n: rng.uniform(-0.05, 0.05, size=(rows, k // block, n)).astype(np.float16).view(np.uint8)
    if block_type in (2, 6, 8):  # d
        b[..., :2] = scales(1)
    elif block_type in (3, 7, 12, 13):  # d and m (or dmin)
        b[..., :4] = scales(2)
    else:  # Q6_K: d last
        b[..., 208:210] = scales(1)
    return b.reshape(rows, -1)


def reference(block_type: int, w: np.ndarray, k: int) -> torch.Tensor:
    from gguf import GGMLQuantizationType, quants

    return torch.from_numpy(quants.dequantize(w, GGMLQuantizationType(block_type)).reshape(-1, k).astype(np.float32))


@pytest.mark.parametrize("block_type", sorted(kernels.BLOCK_TYPES))
def test_dequantize_matches_gguf_py(block_type):
    w = random_blocks(block_type, 37, 512)
    ids = torch.tensor([5, 0, 36, 5])
    want = reference(block_type, w, 512)
    assert torch.equal(kernels.dequantize(torch.from_numpy(w), block_type, 512), want)
    assert torch.equal(kernels.dequantize(torch.from_numpy(w), block_type, 512, ids), want[ids])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block_type", sorted(kernels.BLOCK_TYPES))
@pytest.mark.parametrize("m", [1, 3, 6, 8, 13])
def test_qmm_matches_the_float_product(block_type, path, m):
    # rows not a multiple of the 4-row tiles nor of the 16-row lanes (AVX-512, 32-weight blocks,
    # from 4 activation rows on), m across the 8/4/2/1 tiles
    k, rows = 512, 45
    w = random_blocks(block_type, rows, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x[0, 7] = 40.0  # an outlier, as real hidden states have: the two-level activations keep the rest
    want = x.double() @ reference(block_type, w, k).double().T
    torch.ops.llmos.set_kernel_path(path)
    try:
        got = kernels.qmm(x, [torch.from_numpy(w)], [block_type]).double()
    finally:
        torch.ops.llmos.set_kernel_path(2)
    err = ((got - want).norm() / want.norm()).item()
    assert err < (1e-6 if path == 0 else 2e-4), f"{kernels.PATHS[path]}: relative error {err:.2e}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("block_type", [t for t, (_, size, _) in sorted(kernels.BLOCK_TYPES.items()) if size == 32])
@pytest.mark.parametrize("m", [1, 8])
def test_qmm_with_an_odd_number_of_32_weight_blocks(block_type, path, m):
    """K = 96: three blocks per row, so the AVX-512 path (which takes blocks in pairs) falls back
    to 256-bit registers; the result must not change."""
    k, rows = 96, 45
    w = random_blocks(block_type, rows, k, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7))
    want = x.double() @ reference(block_type, w, k).double().T
    torch.ops.llmos.set_kernel_path(path)
    try:
        got = kernels.qmm(x, [torch.from_numpy(w)], [block_type]).double()
    finally:
        torch.ops.llmos.set_kernel_path(2)
    err = ((got - want).norm() / want.norm()).item()
    assert err < (1e-6 if path == 0 else 2e-4), f"{kernels.PATHS[path]}: relative error {err:.2e}"


def test_qmm_row_groups_of_different_types_sit_side_by_side():
    k = 256
    groups = [(2, random_blocks(2, 8, k, 1)), (14, random_blocks(14, 5, k, 2)), (8, random_blocks(8, 3, k, 3))]
    x = torch.randn(2, k)
    got = kernels.qmm(x, [torch.from_numpy(w) for _, w in groups], [t for t, _ in groups])
    want = x @ torch.cat([reference(t, w, k) for t, w in groups]).T
    assert got.shape == (2, 16)
    for cols in (slice(0, 8), slice(8, 13), slice(13, 16)):  # each group in its place, to 2e-4
        assert (got[:, cols] - want[:, cols]).norm() / want[:, cols].norm() < 2e-4


def test_a_long_prompt_decodes_the_weights_a_slice_of_rows_at_a_time(monkeypatch):
    """From DEQUANTIZE_ROWS activation rows on, QLinear decodes its weights to float32 in slices
    of rows (here 64, forced small) across its groups, into one output."""
    from llmos.weights import quant

    k = 256
    w1, w2 = random_blocks(2, 150, k, seed=1), random_blocks(8, 70, k, seed=2)
    layer = quant.QLinear([(2, torch.from_numpy(w1)), (8, torch.from_numpy(w2))], k)
    monkeypatch.setattr(quant, "DEQUANTIZE_FLOATS", 64 * k)
    x = torch.randn(quant.DEQUANTIZE_ROWS + 3, k)
    want = x.double() @ torch.cat([reference(2, w1, k), reference(8, w2, k)]).double().T
    got = layer(x)
    assert got.shape == (len(x), 220)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_qmm_rejects_mismatched_shapes():
    w = torch.from_numpy(random_blocks(2, 4, 64))
    with pytest.raises(RuntimeError, match="must be contiguous uint8"):
        kernels.qmm(torch.randn(1, 96), [w], [2])
    with pytest.raises(RuntimeError, match="not supported"):
        kernels.qmm(torch.randn(1, 64), [w], [10])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("d", [32, 36, 72])  # 36: not a multiple of the 8 SIMD lanes; 72: 64 columns and 8
def test_fused_inference_ops_match_torch(path, d):
    x, w = torch.randn(3, 5, 96) * 10, torch.randn(96)
    q = torch.randn(2, 6, 1, d)
    cache_k, cache_v = torch.randn(2, 3, 40, d), torch.randn(2, 3, 40, d)
    k, v = cache_k[:, :, 5:30], cache_v[:, :, 5:30]  # a window of the cache (strided views), 25 positions
    want = F.scaled_dot_product_attention(q, k, v, scale=0.2, enable_gqa=True)
    torch.ops.llmos.set_kernel_path(path)
    try:
        assert torch.allclose(torch.ops.llmos.rms_norm(x, w, 1e-6), F.rms_norm(x, (96,), w, 1e-6), atol=1e-5)
        assert torch.allclose(torch.ops.llmos.decode_attention(q, k, v, 0.2), want, atol=1e-5)
        # a float16 cache: read as it is, against SDPA on the same (rounded) keys and values
        kh, vh = cache_k.half()[:, :, 5:30], cache_v.half()[:, :, 5:30]
        want_h = F.scaled_dot_product_attention(q, kh.float(), vh.float(), scale=0.2, enable_gqa=True)
        assert torch.allclose(torch.ops.llmos.decode_attention(q, kh, vh, 0.2), want_h, atol=1e-5)
        assert not torch.allclose(want_h, want, atol=1e-5)  # the rounding shows: the check above can tell
        # keys and values with different position strides, as views of a projection's output are
        kf = torch.randn(2, 25, 5, d)[:, :, 1:4].transpose(1, 2)  # (2, 3, 25, d), positions 5 d apart
        vf = torch.randn(2, 25, 7, d)[:, :, 2:5].transpose(1, 2)  # positions 7 d apart
        assert kf.stride(2) != vf.stride(2)
        want_f = F.scaled_dot_product_attention(q, kf, vf, scale=0.2, enable_gqa=True)
        assert torch.allclose(torch.ops.llmos.decode_attention(q, kf, vf, 0.2), want_f, atol=1e-5)
    finally:
        torch.ops.llmos.set_kernel_path(2)


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("qgguf") / "q.gguf", seed=3,
                           layer_types={"*": "Q4_0", "attn_v": "Q8_0", "ffn_down": "Q5_1"})


@pytest.mark.parametrize("path", PATHS)
def test_the_nucleus_op_is_the_float64_nucleus_among_tokens_above_the_floor(path):
    torch.manual_seed(0)
    V = 50001  # not a multiple of 8
    logits = torch.cat([torch.randn(3, V) * 6, torch.randn(2, V) * 0.5])  # two flat rows: mass short of p at 1e-4
    logits[1, 7:] = float("-inf")
    logits[2, 3] = 40.0  # one token holds nearly all the mass
    logits = torch.cat([logits, torch.full((1, V), float("-inf"))])  # nothing finite: never settled
    p = 0.9
    torch.ops.llmos.set_kernel_path(path)
    try:
        rows, cols, settled = torch.ops.llmos.nucleus(logits, p, p - 1e-6, 1e-4)
    finally:
        torch.ops.llmos.set_kernel_path(2)
    assert settled.tolist() == [True, True, True, False, False, False]
    probs = logits[:3].double().softmax(-1)
    values, order = probs.sort(dim=-1, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, values.cumsum(-1) - values < p)
    want = keep.nonzero()  # row by row, columns in order
    assert torch.equal(rows, want[:, 0]) and torch.equal(cols, want[:, 1])
    with pytest.raises(RuntimeError, match="floor must be > 0"):
        torch.ops.llmos.nucleus(logits, p, p, 0.0)


def test_draw_among_is_the_inverse_cdf_of_the_kept_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 1000) * 3
    logits[1, 5] = float("-inf")  # a kept token at -inf is never drawn
    logits[2] = float("-inf")  # nothing finite: -1
    rows = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    cols = torch.tensor([3, 10, 500, 999, 5, 6, 7, 1, 2])
    for seed in range(200):
        u = torch.rand(3, generator=torch.Generator().manual_seed(seed))
        got = torch.ops.llmos.draw_among(logits, rows, cols, u).tolist()
        for r in (0, 1):
            ids = cols[rows == r]
            cdf = logits[r, ids].double().softmax(-1).cumsum(-1)
            want = ids[torch.searchsorted(cdf, u[r].double() * cdf[-1], right=True).clamp(max=len(ids) - 1)]
            assert got[r] == want.item() and got[r] != 5, (seed, r)
        assert got[2] == -1
    with pytest.raises(RuntimeError, match="rows must be sorted"):
        torch.ops.llmos.draw_among(logits, torch.tensor([1, 0]), torch.tensor([0, 0]), torch.rand(3))


def test_top_p_from_the_kernels_keeps_the_textbook_nucleus():
    """With the kernels loaded, top-p's first floor is the nucleus op: the result is the
    sort-everything nucleus of a float64 softmax (rows that settle at each floor)."""
    from llmos.engine import sampling as S

    assert kernels.ready()
    torch.manual_seed(1)
    logits = torch.cat([torch.randn(4, 30000) * 8, torch.randn(2, 30000) * 3, torch.randn(2, 30000)])
    for p in (0.5, 0.9, 0.95):
        probs = logits.double().softmax(-1)
        values, order = probs.sort(dim=-1, descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, values.cumsum(-1) - values < p)
        assert torch.equal(S.top_p_filter(logits, p), logits.masked_fill(~keep, float("-inf"))), p


def test_a_quantized_gguf_is_stored_as_blocks_and_runs_on_them(quantized_gguf):
    from llmos.llm import LLM
    from llmos.weights.quant import QEmbedding, QLinear

    path = store.resolve(str(quantized_gguf))
    meta = json.loads((path / "config.json").read_text())
    assert meta["quantization"] == "Q4_0/Q5_1/Q8_0 (Q8_0 embeddings)"
    assert (path / "model.safetensors").stat().st_size < quantized_gguf.stat().st_size * 1.2
    q = store.load_checkpoint(path)  # auto
    assert q.precision == "quantized"
    attn = q.model.blocks[0].attn.wqkv
    assert isinstance(attn, QLinear) and attn.block_types == [2, 8]  # q and k fused (Q4_0), v (Q8_0)
    assert isinstance(q.model.embed, QEmbedding) and isinstance(q.model.lm_head, QLinear)
    exact = store.load_checkpoint(path, "fp32")
    ids = torch.tensor([list(range(3, 40))])
    with torch.inference_mode():
        for rows in (ids[:, :8], ids):  # the integer kernels (few rows) and decoded weights (many)
            a, b = q.model(rows), exact.model(rows)
            assert torch.allclose(a, b, atol=1e-3 * b.abs().max().item()), (a - b).abs().max()
    text = LLM(q).generate("the", LLM(q).sampling(temperature=0, max_tokens=12)).completions[0].text
    ref = LLM(exact).generate("the", LLM(exact).sampling(temperature=0, max_tokens=12)).completions[0].text
    assert text == ref


def test_training_and_export_see_float_weights(quantized_gguf):
    path = store.resolve(str(quantized_gguf))
    state = store.load_weights(path, json.loads((path / "config.json").read_text()))
    assert all(t.dtype == torch.float32 for t in state.values())
    assert state["blocks.0.attn.wqkv.weight"].shape == (64 + 2 * 32, 64)


def test_quantized_precision_on_a_float_checkpoint_says_what_to_use(tiny_dir, tmp_path):
    float_dir = tmp_path / "float"
    float_dir.mkdir()
    state = store.load_weights(tiny_dir, json.loads((tiny_dir / "config.json").read_text()))
    from safetensors.torch import save_file

    save_file(state, str(float_dir / "model.safetensors"))
    for name in ("config.json", "tokenizer.json"):
        (float_dir / name).write_bytes((tiny_dir / name).read_bytes())
    assert store.load_checkpoint(float_dir).precision == "fp16"
    with pytest.raises(store.ModelError, match="no quantized weights.*fp16"):
        store.load_checkpoint(float_dir, "quantized")


def test_an_unsupported_block_type_is_one_line_exit_2_and_nothing_stored(tmp_path, session_home):
    gguf_path = write_tiny_gguf(tmp_path / "q2k.gguf", d_model=256, n_head=4, n_kv_head=2, d_ff=256,
                                layer_types={"attn_q": "Q2_K"})
    before = set(store.models_dir().glob("*")) if store.models_dir().exists() else set()
    proc = llmos("generate", "hello", "--model", str(gguf_path), "--max-tokens", "2", home=session_home)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
    assert "stored as Q2_K" in errors[0] and "supported: " in errors[0] and "Q4_K" in errors[0]
    after = set(store.models_dir().glob("*")) if store.models_dir().exists() else set()
    assert after == before  # no checkpoint, no .partial folder


@pytest.mark.bundled
@pytest.mark.slow
def test_quality_guard_on_the_bundled_model(smollm2_dir):
    """Decoding's path (the integer kernels, the engine's float16 KV cache, 16 rows at a time)
    against the float32 weights and cache: top-1 agreement over 2,000 teacher-forced tokens and held-out perplexity."""
    from pathlib import Path

    from llmos.engine.generate import cache_dtype
    from llmos.model import KVCache

    text = (Path(__file__).parents[1] / "benchmarks" / "data" / "tinyshakespeare.txt").read_text()[-40000:]
    runs = {}
    for precision in ("fp32", "quantized"):
        loaded = store.load_checkpoint(smollm2_dir, precision)
        ids = loaded.tokenizer.encode(text)[:2001]
        model, logits = loaded.model, []
        cache = KVCache.allocate(model.config, 1, 2048, cache_dtype(model))  # the engine's: float16 when quantized
        with torch.inference_mode():
            for start in range(0, 2000, 16):
                chunk = torch.tensor([ids[start : start + 16]])
                logits.append(model(chunk, cache=cache, kv_len=start + chunk.shape[1])[0])
        runs[precision] = torch.cat(logits)[:2000]
    targets = torch.tensor(ids[1:2001])
    agreement = (runs["fp32"].argmax(-1) == runs["quantized"].argmax(-1)).float().mean().item()
    ppl = {p: math.exp(F.cross_entropy(logits, targets).item()) for p, logits in runs.items()}
    assert agreement >= 0.98, agreement
    assert abs(ppl["quantized"] / ppl["fp32"] - 1) <= 0.02, ppl


def quantized_copy(model, block_type: str = "Q8_0"):
    """The model with every block's linear layers quantized (gguf-py) into QLinear modules."""
    import gguf
    from gguf import quants

    from llmos.weights.quant import QLinear

    qt = gguf.GGMLQuantizationType[block_type]
    for block in model.blocks:
        for owner, name in ((block.attn, "wqkv"), (block.attn, "wo"), (block.mlp, "w13"), (block.mlp, "w2")):
            w = getattr(owner, name).weight.detach().numpy()
            setattr(owner, name, QLinear([(int(qt), torch.from_numpy(quants.quantize(w, qt)))], w.shape[1]))
    model._fused = None
    return model


@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("arch", ["llama", "gemma3", "dynamic"])
def test_fused_decode_layers_match_the_module_path(arch, path, kv):
    """decode_layer (one C++ call per block) against Block.forward, on rows at their own
    positions, past a sliding window for Gemma 3 (QK-norm, sandwich norms, GELU), past the
    original context of a dynamic NTK model (tables for the longest row's length); on every
    kernel path this CPU has (their norms, attention and activations differ too); with a float32
    and a float16 cache."""
    from llmos.model import KVCache, ModelConfig, Transformer

    extra = dict(head_dim=32, rope_local_theta=10_000.0, sliding_window=6, global_every=2) if arch == "gemma3" else {}
    if arch == "dynamic":
        arch, extra = "llama", dict(rope_scaling={"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 10})
    config = ModelConfig(arch=arch, vocab_size=96, n_layer=3, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                         max_seq_len=64, **extra)
    torch.manual_seed(0)
    model = quantized_copy(Transformer(config).eval())
    if arch == "gemma3":
        for n in model.modules():  # norms away from 1, so a wrong one shows
            if type(n).__name__ == "RMSNorm":
                n.weight.data = 1 + 0.3 * torch.randn_like(n.weight)
    prompt = torch.randint(0, 96, (2, 9))

    def decode(fused: bool):
        import llmos.model as module

        model._fused = None if fused else False
        cache = KVCache.allocate(config, 2, 32, kv)
        out = []
        with torch.inference_mode():
            model(prompt, cache=cache, kv_len=9)
            for step in range(5):  # row 1 runs two positions behind row 0
                pos = torch.tensor([[9 + step], [7 + step]])
                out.append(model(torch.tensor([[3 + step], [40 + step]]), input_pos=pos, cache=cache))
            assert module._fast() and bool(model._fused) == fused
        return torch.cat(out, 1), cache

    torch.ops.llmos.set_kernel_path(path)
    try:
        (fused, fc), (plain, pc) = decode(True), decode(False)
    finally:
        torch.ops.llmos.set_kernel_path(2)
    assert torch.allclose(fused, plain, atol=2e-4 * plain.abs().max().item()), (fused - plain).abs().max()
    for a, b in zip(fc.k + fc.v, pc.k + pc.v):  # the caches hold the same keys and values
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3), (a - b).abs().max()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kv", [torch.float32, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_candidates_read_their_shared_prompt_from_the_first_row(arch, path, kv):
    """shared_prefix: the rows' first positions are read from row 0 alone. The logits equal
    those of every row reading its own copy, and scrambling the other rows' copies changes
    nothing, while without sharing the same scrambling does (so the rows do read row 0).
    Gemma 3's sliding layers (window 6) start their span inside the shared prompt."""
    from llmos.model import KVCache, ModelConfig, Transformer

    # Gemma 3: heads of 72 (64 columns and 8), a window that starts inside the prompt, then past it
    extra = dict(head_dim=72, rope_local_theta=10_000.0, sliding_window=6, global_every=2) if arch == "gemma3" else {}
    config = ModelConfig(arch=arch, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                         max_seq_len=64, **extra)
    torch.manual_seed(0)
    model = quantized_copy(Transformer(config).eval())
    prompt = torch.randint(0, 96, (1, 9))

    def decode(shared: int, scramble: int):
        cache = KVCache.allocate(config, 3, 32, kv)
        out = []
        with torch.inference_mode():
            model(prompt, cache=cache.rows(0, 1), kv_len=9)
            cache.copy_rows(0, slice(1, 3), 9)
            for t in cache.k + cache.v:
                t[1:, :, :scramble] = torch.randn_like(t[1:, :, :scramble])
            for step in range(8):  # positions 9 to 16: the window's first key passes position 8
                tokens = torch.tensor([[3 + step], [40 + step], [7 + step]])
                out.append(model(tokens, cache=cache, kv_len=10 + step, shared_prefix=shared))
        assert bool(model._fused)
        return torch.cat(out, 1)

    torch.ops.llmos.set_kernel_path(path)
    try:
        own = decode(0, 0)
        assert torch.equal(decode(8, 0), own)
        assert torch.equal(decode(8, 8), own)
        assert not torch.allclose(decode(0, 8), own, atol=1e-3)
    finally:
        torch.ops.llmos.set_kernel_path(2)


def test_the_engine_shares_the_prompt_of_one_requests_candidates_only(monkeypatch):
    """The engine asks for a shared prompt when the batch is one request's candidates (the
    prompt's last position left out), and not when rows of two requests decode together;
    sampled candidates come out the same as without sharing."""
    import llmos.engine.generate as engine
    from llmos.engine.sampling import SamplingParams
    from llmos.model import ModelConfig, Transformer

    config = ModelConfig(arch="llama", vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                         max_seq_len=64)
    torch.manual_seed(0)
    model = quantized_copy(Transformer(config).eval())
    model.kv_cache_dtype = torch.float16
    prompt = [5, 9, 11, 2, 40, 41, 7]
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=3)
    seen, decode_step = [], engine.decode_step

    def spy(*args, **kwargs):
        seen.append(args[4] if len(args) > 4 else kwargs.get("shared_prefix", 0))
        return decode_step(*args, **kwargs)

    monkeypatch.setattr(engine, "decode_step", spy)
    shared = [s.output for s in engine.generate(model, prompt, params, n=3)]
    assert seen and set(seen) == {len(prompt) - 1}
    monkeypatch.setattr(engine, "decode_step", lambda *a, **k: decode_step(*a[:4]))
    assert [s.output for s in engine.generate(model, prompt, params, n=3)] == shared
    assert len({tuple(o) for o in shared}) > 1  # the candidates differ: each row's own positions count

    # candidates that end at different steps: the rows left are moved down into the freed ones
    # (row 0 among them), and still read the prompt from row 0
    stopping = replace(params, max_tokens=14, stop_token_ids=list(range(0, 96, 5)))
    monkeypatch.setattr(engine, "decode_step", spy)
    seen.clear()
    early = engine.generate(model, prompt, stopping, n=5)
    assert len({len(s.output) for s in early}) > 2
    # shared while two or more candidates run; a last one alone reads its own row
    alone = seen.index(0) if 0 in seen else len(seen)
    assert alone > 1 and set(seen[:alone]) == {len(prompt) - 1} and set(seen[alone:]) <= {0}
    monkeypatch.setattr(engine, "decode_step", lambda *a, **k: decode_step(*a[:4]))
    assert [s.output for s in engine.generate(model, prompt, stopping, n=5)] == [s.output for s in early]

    # two requests in one batch: no sharing while both run; each alone again shares its own prompt
    eng = engine.Engine(model, max_batch=4, max_len=32)
    steps = []

    def rows_spy(*args, **kwargs):
        steps.append((args[4], {len(r.request.prompt) for r in eng.rows}, len(eng.rows)))
        return decode_step(*args, **kwargs)

    monkeypatch.setattr(engine, "decode_step", rows_spy)
    eng.add(engine.Request(prompt, params, 2))
    eng.add(engine.Request([1, 2, 3], replace(params, max_tokens=12), 2))
    with torch.inference_mode():
        while eng.has_work:
            eng.step()
    assert any(len(lengths) == 2 for _, lengths, _ in steps) and any(len(lengths) == 1 for _, lengths, _ in steps)
    for shared_len, lengths, n in steps:
        assert shared_len == (next(iter(lengths)) - 1 if len(lengths) == 1 and n > 1 else 0)


def test_one_token_without_a_cache_takes_the_decode_attention():
    """A one-token text scored or embedded without a cache reaches decode_attention with keys
    (after RoPE) and values (a view of the projection) at different position strides."""
    from llmos.model import ModelConfig, Transformer

    config = ModelConfig(arch="llama", vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=96,
                         max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ids = torch.tensor([[5], [17]])
    with torch.inference_mode():  # the kernels' paths
        fast = model(ids)
    plain = model(ids).detach()  # gradients on: torch's own attention
    assert torch.allclose(fast, plain, atol=1e-5)
