"""GGUF -> LLMOS checkpoint folder: dequantize the weights once, map their names onto model.py.

A checkpoint folder holds `config.json` (model config, prompt style, generation defaults,
licence), `model.safetensors` and `tokenizer.json`. GGUF files are read with the `gguf`
package, which parses the format without executing anything from the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from llmos.model import ModelConfig

SUPPORTED_ARCHS = ("llama", "gemma3")


class ConversionError(ValueError):
    """The file is not a GGUF model this converter supports."""


def read_gguf(path: Path):
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors on truncated or foreign files
        raise ConversionError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    return reader


def gguf_metadata(reader) -> dict:
    meta = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in (
            "tokens", "merges", "token_type", "scores"
        ):
            continue  # large arrays: the tokenizer converter reads them itself
        try:
            meta[key] = f.contents()
        except Exception:
            continue
    return meta


def config_from_gguf(meta: dict) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConversionError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    try:
        n_head = int(get("attention.head_count"))
        d_model = int(get("embedding_length"))
        n_layer = int(get("block_count"))
    except TypeError:
        raise ConversionError(f"the GGUF lacks {arch} hyperparameters (head count, width, depth)") from None
    common = dict(
        arch=arch,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=int(get("attention.head_count_kv", n_head)),
        d_model=d_model,
        d_ff=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
    )
    if arch == "gemma3":
        head_dim = int(get("attention.key_length"))
        # Gemma 3 text models: every 6th layer global (RoPE base from the file), the others a
        # sliding window with RoPE base 10k; queries scaled by 1/sqrt(head_dim) ("query_pre_attn_scalar").
        common.update(
            head_dim=head_dim, rope_local_theta=10_000.0,
            sliding_window=int(get("attention.sliding_window", 512)), global_every=6,
            attn_scale=head_dim**-0.5,
        )
    return ModelConfig(**common)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BLOCK = re.compile(r"blk\.(\d+)\.(.+)\.weight")
_SIMPLE = {
    "attn_norm": "attn_norm.weight",
    "ffn_norm": "mlp_norm.weight",
    "post_attention_norm": "post_attn_norm.weight",
    "post_ffw_norm": "post_mlp_norm.weight",
    "attn_q_norm": "attn.q_norm.weight",
    "attn_k_norm": "attn.k_norm.weight",
    "attn_output": "attn.wo.weight",
    "ffn_down": "mlp.w2.weight",
}


def gguf_state_dict(reader, config: ModelConfig, progress: Callable[[int], None] | None = None):
    """Dequantize every tensor to float32 and return a state dict for model.Transformer."""
    from gguf import quants

    parts: dict[int, dict[str, np.ndarray]] = {}
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        if t.name == "token_embd.weight":
            sd["embed.weight"] = torch.from_numpy(np.array(w))
        elif t.name == "output_norm.weight":
            sd["norm.weight"] = torch.from_numpy(np.array(w))
        elif t.name == "output.weight":
            sd["lm_head.weight"] = torch.from_numpy(np.array(w))
        elif m := _BLOCK.fullmatch(t.name):
            layer, kind = int(m.group(1)), m.group(2)
            if kind in _SIMPLE:
                sd[f"blocks.{layer}.{_SIMPLE[kind]}"] = torch.from_numpy(np.array(w))
            elif kind in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
                if config.arch == "llama" and kind == "attn_q":
                    w = _unpermute(w, config.n_head)
                elif config.arch == "llama" and kind == "attn_k":
                    w = _unpermute(w, config.n_kv_head)
                parts.setdefault(layer, {})[kind] = w
            else:
                raise ConversionError(f"unexpected tensor {t.name} in a {config.arch} GGUF")
        else:
            raise ConversionError(f"unexpected tensor {t.name} in a {config.arch} GGUF")
        if progress:
            progress(1)
    for layer, p in parts.items():
        try:
            qkv = np.concatenate([p["attn_q"], p["attn_k"], p["attn_v"]])
            gate_up = np.concatenate([p["ffn_gate"], p["ffn_up"]])
        except KeyError as e:
            raise ConversionError(f"layer {layer} lacks tensor {e.args[0]}") from None
        sd[f"blocks.{layer}.attn.wqkv.weight"] = torch.from_numpy(qkv)
        sd[f"blocks.{layer}.mlp.w13.weight"] = torch.from_numpy(gate_up)
    config.vocab_size = sd["embed.weight"].shape[0]
    config.tie_embeddings = "lm_head.weight" not in sd
    return sd


def gguf_tokenizer(gguf_path: Path) -> tuple[object, dict]:
    """Convert the GGUF's tokenizer to a HF `tokenizers` object; also return its special tokens
    and chat template. Uses transformers' GGUF converters (pull time only)."""
    import logging

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    info = {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
    }
    return tok.backend_tokenizer, info


def write_json_atomic(path: Path, data: dict):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    tmp.replace(path)
