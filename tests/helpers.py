"""Test fixtures that are real files: tiny GGUF models written with gguf-py, so conversion,
loading and generation run through the same code paths as the bundled models."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """GPT-2 style byte-level tokens (256 byte symbols, a few merges) plus chat specials."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o n", "e r", "Ġ s"]
    merged = [m.replace(" ", "") for m in merges]
    return SPECIALS + alphabet + merged, merges


def write_tiny_gguf(path: Path, *, n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96,
                    context=512, seed=0, quantize_embeddings=True, arch="llama",
                    layer_types: dict[str, str] | None = None, rope_freqs: np.ndarray | None = None,
                    rope_scaling: tuple[str, float] | None = None, head_dim: int | None = None,
                    window: int | None = None, longrope: tuple[list, list, int] | None = None,
                    meta: dict | None = None) -> Path:
    """layer_types: GGUF block type per layer tensor kind ({"attn_q": "Q4_0", ...}; "*" for
    every kind); the rest stay float32. rope_freqs: Llama 3.1's per-frequency RoPE divisors;
    rope_scaling: (llama.cpp's scaling type, factor), such as ("linear", 4.0). window: a sliding
    window (phi3, gemma2). longrope: Phi-3's (long factors, short factors, original context).
    meta: more metadata, {key without the architecture: value} (ints as uint32, floats as float32)."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens, merges = byte_level_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(context)
    w.add_embedding_length(d_model)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_head)
    if arch == "gpt2":  # no RoPE, LayerNorm
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_head_count_kv(n_kv_head)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(d_model // n_head)
    w.add_vocab_size(vocab)
    if rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        w.add_rope_scaling_factor(rope_scaling[1])
    hd = head_dim or d_model // n_head
    if arch in ("qwen3", "gemma2"):
        w.add_key_length(hd)
        w.add_value_length(hd)
    if window:
        w.add_sliding_window(window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
    if longrope:
        w.add_rope_scaling_orig_ctx_len(longrope[2])
    for key, value in (meta or {}).items():
        (w.add_uint32 if isinstance(value, int) else w.add_float32)(f"{arch}.{key}", value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)  # transformers sizes Phi-3's padding row from it (its default is past this vocabulary)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def t(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    emb = t(vocab, d_model, scale=0.5)
    if quantize_embeddings and d_model % 32 == 0:
        from gguf import quants

        q = quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor("token_embd.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor("token_embd.weight", emb)
    w.add_tensor("output_norm.weight", 1 + t(d_model, scale=0.1))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    if longrope:
        w.add_tensor("rope_factors_long.weight", np.asarray(longrope[0], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(longrope[1], dtype=np.float32))

    def matrix(name: str, kind: str, value: np.ndarray):
        block_type = (layer_types or {}).get(kind) or (layer_types or {}).get("*")
        if block_type is None:
            w.add_tensor(name, value)
            return
        from gguf import quants

        qt = gguf.GGMLQuantizationType[block_type]
        try:
            data = quants.quantize(value, qt)
        except (quants.QuantError, NotImplementedError):  # a type gguf-py cannot write: random blocks of the right size
            block, size = gguf.GGML_QUANT_SIZES[qt]
            data = rng.integers(0, 256, (value.shape[0], value.shape[1] // block * size), dtype=np.uint8)
        w.add_tensor(name, data, raw_dtype=qt)

    if arch == "gpt2":  # learned positions; fused q/k/v, LayerNorms and biases everywhere
        w.add_tensor("output_norm.bias", t(d_model, scale=0.1))
        w.add_tensor("position_embd.weight", t(context, d_model, scale=0.3))
        for i in range(n_layer):
            for kind, rows, cols in (("attn_qkv", 3 * d_model, d_model), ("attn_output", d_model, d_model),
                                     ("ffn_up", d_ff, d_model), ("ffn_down", d_model, d_ff)):
                matrix(f"blk.{i}.{kind}.weight", kind, t(rows, cols))
                w.add_tensor(f"blk.{i}.{kind}.bias", t(rows, scale=0.1))
            for kind in ("attn_norm", "ffn_norm"):
                w.add_tensor(f"blk.{i}.{kind}.weight", 1 + t(d_model, scale=0.1))
                w.add_tensor(f"blk.{i}.{kind}.bias", t(d_model, scale=0.1))
    for i in range(n_layer if arch != "gpt2" else 0):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + t(d_model, scale=0.1))
        if arch == "phi3":  # q/k/v fused
            matrix(f"blk.{i}.attn_qkv.weight", "attn_qkv", t((n_head + 2 * n_kv_head) * hd, d_model))
        else:
            matrix(f"blk.{i}.attn_q.weight", "attn_q", t(n_head * hd, d_model))
            matrix(f"blk.{i}.attn_k.weight", "attn_k", t(n_kv_head * hd, d_model))
            matrix(f"blk.{i}.attn_v.weight", "attn_v", t(n_kv_head * hd, d_model))
        matrix(f"blk.{i}.attn_output.weight", "attn_output", t(d_model, n_head * hd))
        if arch == "qwen2":  # biases on q, k and v
            for kind, rows in (("attn_q", n_head * hd), ("attn_k", n_kv_head * hd), ("attn_v", n_kv_head * hd)):
                w.add_tensor(f"blk.{i}.{kind}.bias", t(rows, scale=0.3))
        if arch == "qwen3":  # per-head QK-norm
            w.add_tensor(f"blk.{i}.attn_q_norm.weight", 1 + t(hd, scale=0.2))
            w.add_tensor(f"blk.{i}.attn_k_norm.weight", 1 + t(hd, scale=0.2))
        if arch == "gemma2":  # sandwich norms
            w.add_tensor(f"blk.{i}.post_attention_norm.weight", 1 + t(d_model, scale=0.1))
            w.add_tensor(f"blk.{i}.post_ffw_norm.weight", 1 + t(d_model, scale=0.1))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + t(d_model, scale=0.1))
        if arch == "phi3":  # gate and up fused
            matrix(f"blk.{i}.ffn_up.weight", "ffn_up", t(2 * d_ff, d_model))
        else:
            matrix(f"blk.{i}.ffn_gate.weight", "ffn_gate", t(d_ff, d_model))
            matrix(f"blk.{i}.ffn_up.weight", "ffn_up", t(d_ff, d_model))
        matrix(f"blk.{i}.ffn_down.weight", "ffn_down", t(d_model, d_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.server.config.app.state.scheduler.close()


def llmos(*args, home, stdin=None, timeout=300):
    """Run the `llmos` command as a real process with its own LLMOS_HOME."""
    env = {**os.environ, "LLMOS_HOME": str(home), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "llmos", *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=timeout)


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def home_with_embedder(home: Path, embedder_dir: Path) -> Path:
    """A user directory (LLMOS_HOME) holding the knowledge-base encoder of the shared test store."""
    (home / "embedders").mkdir()
    os.symlink(embedder_dir, home / "embedders" / "all-minilm-l6-v2")
    return home


def write_jsonl(path, records):
    """One JSON object per line; returns the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
