"""`llmos export --format hf`: a checkpoint as a Hugging Face Llama folder (config.json,
model.safetensors, tokenizer files), which transformers, vLLM, TGI and llama.cpp's converter
load. Our llama-architecture Transformer is the same computation as LlamaForCausalLM: only
names change, and the fused q/k/v and gate/up matrices are split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from llmos.model import ModelConfig

FORMATS = ("hf",)


class ExportError(ValueError):
    pass


def hf_config(cfg: ModelConfig, meta: dict, tokenizer) -> dict:
    def token_id(name):
        tok = meta.get("tokenizer", {}).get(name)
        return tokenizer.token_to_id(tok) if tok else None

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta} if not cfg.rope_scaling else
        {**{k: v for k, v in cfg.rope_scaling.items() if k != "type"}, "rope_type": cfg.rope_scaling["type"],
         "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": token_id("bos_token"),
        "eos_token_id": token_id("eos_token"),
        "torch_dtype": "float32",
    }


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, hp = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[p + "attn.wqkv.weight"].split([q_dim, kv_dim, kv_dim])
        gate, up = state[p + "mlp.w13.weight"].split([cfg.d_ff, cfg.d_ff])
        out.update({
            hp + "self_attn.q_proj.weight": q, hp + "self_attn.k_proj.weight": k,
            hp + "self_attn.v_proj.weight": v, hp + "self_attn.o_proj.weight": state[p + "attn.wo.weight"],
            hp + "mlp.gate_proj.weight": gate, hp + "mlp.up_proj.weight": up,
            hp + "mlp.down_proj.weight": state[p + "mlp.w2.weight"],
            hp + "input_layernorm.weight": state[p + "attn_norm.weight"],
            hp + "post_attention_layernorm.weight": state[p + "mlp_norm.weight"],
        })
    return {k: v.contiguous() for k, v in out.items()}


def export(checkpoint: Path, out: Path, fmt: str = "hf") -> Path:
    from safetensors.torch import load_file, save_file

    from llmos.tokenizer import Tokenizer

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    meta = json.loads((checkpoint / "config.json").read_text())
    cfg = ModelConfig.from_dict(meta["model"])
    if cfg.arch != "llama" or cfg.sliding_window is not None:
        raise ExportError(f"--format hf exports llama-architecture models; this one is {cfg.arch}"
                          + (" with a sliding window" if cfg.sliding_window else ""))
    if cfg.qkv_bias or cfg.qk_norm:
        raise ExportError(f"--format hf exports plain Llama models; this one has "
                          f"{'q/k/v biases (Qwen 2)' if cfg.qkv_bias else 'QK-norm (Qwen 3)'}")
    if cfg.rope_scaling and cfg.rope_scaling["type"] not in ("linear", "llama3"):
        raise ExportError(f"RoPE scaling {cfg.rope_scaling['type']!r} is not exported yet (linear and llama3 are)")
    if not cfg.causal:
        raise ExportError("this is a masked-LM encoder (bidirectional), not a causal LM; it cannot become LlamaForCausalLM")
    if abs(cfg.attn_scale - cfg.head_dim**-0.5) > 1e-9:
        raise ExportError("a custom attention scale has no Llama equivalent")
    tok = Tokenizer.from_dir(checkpoint, meta)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new -o folder")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = load_file(str(checkpoint / "model.safetensors"))
    save_file(hf_state_dict(state, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config(cfg, meta, tok), indent=2))
    shutil.copyfile(checkpoint / "tokenizer.json", tmp / "tokenizer.json")
    info = meta.get("tokenizer", {})
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
                  "clean_up_tokenization_spaces": False}
    for key in ("bos_token", "eos_token", "mask_token"):
        if info.get(key):
            tok_config[key] = info[key]
    if meta.get("prompt_style", {}).get("chat_template"):
        tok_config["chat_template"] = meta["prompt_style"]["chat_template"]
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False))
    gen = {k: v for k, v in meta.get("generation", {}).items() if k in ("temperature", "top_k", "top_p")}
    (tmp / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True}, indent=2))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
