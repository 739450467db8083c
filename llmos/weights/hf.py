"""A Hugging Face model folder (config.json, safetensors weights, tokenizer.json) -> an LLMOS
checkpoint folder: Llama 1/2/3.x, Mistral, Qwen 2 / 2.5, Qwen 3, Phi-3, Gemma 2, Gemma 3 (text
models, and the text part of the multimodal ones) and GPT-2.

The folder's weights may be one model.safetensors or shards listed in
model.safetensors.index.json; only safetensors are read (never pickled .bin files). Names map
onto model.py, q/k/v and gate/up are fused. What the architecture needs beyond plain Llama is a
config field: biases on q/k/v (Qwen 2), per-head QK-norm (Qwen 3), a sliding window (Mistral),
soft-capping and sandwich norms (Gemma 2), stretched RoPE; GPT-2 is its own `arch`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from llmos.model import ModelConfig

FAMILY = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "gemma3", "gpt2")

# What transformers' Gemma3TextConfig assumes for a key its config.json leaves out: the
# multimodal Gemma 3 folders (4B, 12B, 27B) write only what differs in their `text_config`
# (google/gemma-3-4b-it's omits the head counts, head_dim and the vocabulary size).
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096, "tie_word_embeddings": True,
}


class HFError(ValueError):
    """The folder is not a model this importer supports (the caller names the folder)."""


def is_hf_folder(path: Path) -> bool:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and "model_type" in cfg and "model" not in cfg


def config_from_hf(cfg: dict) -> ModelConfig:
    kind = cfg.get("model_type")
    if kind not in FAMILY:
        raise HFError(f"model_type {kind!r} is not supported; supported: {', '.join(FAMILY)}")
    if kind == "gemma3":  # image and text: the text model is read, the vision tower left out
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise HFError("its config.json (model_type gemma3) has no text_config")
        cfg, kind = {**GEMMA3_TEXT_DEFAULTS, **text}, "gemma3_text"
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise HFError(f"partial_rotary_factor {cfg['partial_rotary_factor']} (RoPE on part of each head) is not supported yet")
    if kind in ("gemma2", "gemma3_text"):
        return _gemma_config(cfg, kind)
    if kind == "gpt2":
        return _gpt2_config(cfg)
    try:
        theta, scaling = rope_from_hf(cfg)
        n_head = int(cfg["num_attention_heads"])
        window = cfg.get("sliding_window") if kind in ("mistral", "phi3") or cfg.get("use_sliding_window") else None
        n_layer = int(cfg["num_hidden_layers"])
        context = int(cfg.get("max_position_embeddings", 2048))
        if scaling and scaling["type"] == "dynamic":  # the config gives the original context; this stretches it
            context = int(context * max(scaling["factor"], 1.0))
        return ModelConfig(
            arch="llama", vocab_size=int(cfg["vocab_size"]), n_layer=n_layer, n_head=n_head,
            n_kv_head=int(cfg.get("num_key_value_heads") or n_head), d_model=int(cfg["hidden_size"]),
            head_dim=cfg.get("head_dim"), d_ff=int(cfg["intermediate_size"]),
            max_seq_len=context, rope_theta=theta, rope_scaling=scaling,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=int(window) if window else None, global_every=n_layer + 1,
            qkv_bias=kind == "qwen2" or bool(cfg.get("attention_bias", False)), qk_norm=kind == "qwen3",
        )
    except HFError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise HFError(f"its config.json does not describe a {kind} model ({type(e).__name__}: {e})") from None


def _gemma_config(cfg: dict, kind: str) -> ModelConfig:
    """Gemma 2: sandwich norms, GELU, a sliding window on alternate layers, soft-capped scores.
    Gemma 3 (text): five sliding layers to one global, QK-norm, and a RoPE base (and scaling) of
    the global layers' own."""
    try:
        n_layer = int(cfg["num_hidden_layers"])
        local = None
        if kind == "gemma2":
            theta, scaling = rope_from_hf(cfg)
            pattern = 2
        else:
            params = cfg.get("rope_parameters")
            if isinstance(params, dict) and "full_attention" in params:  # transformers 5: per layer type
                theta, scaling = rope_from_hf({**cfg, "rope_parameters": params["full_attention"]})
                local, local_scaling = rope_from_hf({**cfg, "rope_parameters": params.get("sliding_attention", {})})
                if local_scaling:
                    raise HFError("RoPE scaling on Gemma 3's sliding-window layers is not supported")
            else:
                theta, scaling = rope_from_hf({"rope_theta": 1_000_000.0, **cfg})
                local = float(cfg.get("rope_local_base_freq", 10_000.0))
            pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        kinds = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                           for i in range(n_layer)]
        return ModelConfig(
            arch="gemma2" if kind == "gemma2" else "gemma3", rope_local_theta=local, vocab_size=int(cfg["vocab_size"]),
            n_layer=n_layer, n_head=int(cfg["num_attention_heads"]), n_kv_head=int(cfg["num_key_value_heads"]),
            d_model=int(cfg["hidden_size"]), head_dim=int(cfg["head_dim"]),
            d_ff=int(cfg["intermediate_size"]), max_seq_len=int(cfg.get("max_position_embeddings", 8192)),
            rope_theta=theta, rope_scaling=scaling, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), sliding_window=int(cfg["sliding_window"]),
            layer_types=["sliding" if k == "sliding_attention" else "global" for k in kinds],
            attn_scale=float(cfg.get("query_pre_attn_scalar", cfg["head_dim"])) ** -0.5,
            attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"),
        )
    except HFError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise HFError(f"its config.json does not describe a {kind} model ({type(e).__name__}: {e})") from None


def _gpt2_config(cfg: dict) -> ModelConfig:
    """GPT-2: learned positions, LayerNorm, GELU (tanh form), fused c_attn, biases everywhere."""
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise HFError(f"activation_function {act!r} is not supported for gpt2 (gelu_new is)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if cfg.get(flag):
            raise HFError(f"{flag} is not supported")
    if cfg.get("scale_attn_weights") is False:
        raise HFError("scale_attn_weights false (unscaled attention) is not supported")
    try:
        d = int(cfg["n_embd"])
        return ModelConfig(
            arch="gpt2", vocab_size=int(cfg["vocab_size"]), n_layer=int(cfg["n_layer"]), n_head=int(cfg["n_head"]),
            d_model=d, d_ff=int(cfg.get("n_inner") or 4 * d), max_seq_len=int(cfg["n_positions"]),
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise HFError(f"its config.json does not describe a gpt2 model ({type(e).__name__}: {e})") from None


def rope_from_hf(cfg: dict) -> tuple[float, dict | None]:
    """(RoPE base, model.py's rope_scaling) from a config.json: `rope_theta` and `rope_scaling` as
    older files write them, or `rope_parameters` as transformers 5 does. Defaults the reference
    code derives (YaRN's and LongRoPE's attention factor, the original context) are made explicit
    here, so model.py needs nothing but the dict."""
    params = cfg.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise HFError("rope_parameters per layer type are not supported for this model type")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    given = cfg.get("rope_scaling") or params
    kind = given.get("rope_type") or given.get("type") or "default"
    if kind == "default":
        return theta, None

    def get(key, default=None):
        value = given.get(key, cfg.get(key, default))
        if value is None:
            raise HFError(f"rope_scaling {kind!r} lacks {key}")
        return value

    max_len = int(cfg.get("max_position_embeddings", 2048))
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(get("factor"))}
    if kind == "llama3":
        return theta, {"type": "llama3", **{k: float(get(k)) for k in (
            "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    if kind == "yarn":
        original = int(get("original_max_position_embeddings"))
        factor = float(given.get("factor") or max_len / original)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = given.get("attention_factor")
        if attention is None:
            m, m_all = given.get("mscale"), given.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        return theta, {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                       "beta_fast": float(given.get("beta_fast") or 32), "beta_slow": float(given.get("beta_slow") or 1),
                       "attention_factor": float(attention), "truncate": bool(given.get("truncate", True))}
    if kind == "dynamic":  # transformers' threshold is max_position_embeddings, whatever else the file says
        return theta, {"type": "dynamic", "factor": float(get("factor")), "original_max_position_embeddings": max_len}
    if kind == "longrope":
        original = int(get("original_max_position_embeddings"))
        factor = float(given.get("factor") or max_len / original)
        attention = given.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        return theta, {"type": "longrope", "short_factor": [float(v) for v in get("short_factor")],
                       "long_factor": [float(v) for v in get("long_factor")],
                       "original_max_position_embeddings": original, "attention_factor": float(attention)}
    raise HFError(f"rope_scaling {kind!r} is not supported; supported: linear, llama3, yarn, longrope, dynamic")


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFError(f"model.safetensors.index.json cannot be read ({type(e).__name__}: {e})") from None
        files = [path / n for n in names]
        if any(Path(n).name != n or not f.is_file() for n, f in zip(names, files)):
            raise HFError("model.safetensors.index.json names shards that are not in the folder")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise HFError("it has no model.safetensors (nor an index of shards); .bin weights are not read")


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_SIMPLE = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
}


_GEMMA = {  # Gemma 2 and 3
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attn_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
}


# Multimodal Gemma 3: the text model's tensors under either layout transformers has saved
# (`language_model.model.*` before 4.52, `model.language_model.*` since); the rest is vision.
_TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                  "language_model.lm_head.": "lm_head."}
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _text_name(name: str) -> str | None:
    """The tensor's name in a text-only model, or None for a vision tensor (not read)."""
    if name.startswith(_VISION_PREFIXES):
        return None
    for prefix, short in _TEXT_PREFIXES.items():
        if name.startswith(prefix):
            return short + name[len(prefix):]
    return name


def hf_state_dict(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    raw: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                if (short := _text_name(name)) is not None:
                    raw[short] = sf.get_tensor(name)
    if config.arch == "gpt2":
        return _gpt2_state_dict(raw, config)
    state, parts = {}, {}
    simple = _GEMMA if config.gemma else _SIMPLE
    for name, w in raw.items():
        w = w.float()
        if config.gemma and name.endswith("norm.weight"):
            w = w + 1  # Gemma's RMSNorm scales by (1 + weight); model.py's by weight
        if name == "model.embed_tokens.weight":
            state["embed.weight"] = w
        elif name == "model.norm.weight":
            state["norm.weight"] = w
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                state["lm_head.weight"] = w
        elif m := _LAYER.fullmatch(name):
            layer, rest = int(m.group(1)), m.group(2)
            if rest in simple:
                state[f"blocks.{layer}.{simple[rest]}"] = w
            elif rest == "self_attn.qkv_proj.weight":  # Phi-3: already fused, in q, k, v order
                state[f"blocks.{layer}.attn.wqkv.weight"] = w
            elif rest == "mlp.gate_up_proj.weight":  # Phi-3: gate rows, then up rows
                state[f"blocks.{layer}.mlp.w13.weight"] = w
            elif rest.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
                parts.setdefault(layer, {})[rest] = w
            elif not rest.endswith("rotary_emb.inv_freq"):
                raise HFError(f"unexpected tensor {name}")
        else:
            raise HFError(f"unexpected tensor {name}")
    for layer, p in parts.items():
        try:
            state[f"blocks.{layer}.attn.wqkv.weight"] = torch.cat(
                [p[f"self_attn.{n}_proj.weight"] for n in "qkv"])
            if config.qkv_bias:
                state[f"blocks.{layer}.attn.wqkv.bias"] = torch.cat([p[f"self_attn.{n}_proj.bias"] for n in "qkv"])
            state[f"blocks.{layer}.mlp.w13.weight"] = torch.cat([p["mlp.gate_proj.weight"], p["mlp.up_proj.weight"]])
        except KeyError as e:
            raise HFError(f"layer {layer} lacks {e.args[0]}") from None
    return state


_GPT2_TOP = {"wte.weight": "embed.weight", "wpe.weight": "pos_embed.weight", "ln_f.weight": "norm.weight",
             "ln_f.bias": "norm.bias"}
_GPT2_LAYER = re.compile(r"(?:transformer\.)?h\.(\d+)\.(.+)")
_GPT2 = {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_attn": "attn.wqkv", "attn.c_proj": "attn.wo",
         "mlp.c_fc": "mlp.w13", "mlp.c_proj": "mlp.w2"}


def _gpt2_state_dict(raw: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2's names (with or without the `transformer.` prefix); its Conv1D matrices are stored
    (in, out) and become (out, in) like any nn.Linear."""
    state = {}
    for name, w in raw.items():
        w = w.float()
        short = name.removeprefix("transformer.")
        if short in _GPT2_TOP:
            state[_GPT2_TOP[short]] = w
        elif name == "lm_head.weight":
            if not config.tie_embeddings:
                state["lm_head.weight"] = w
        elif m := _GPT2_LAYER.fullmatch(name):
            layer, rest = int(m.group(1)), m.group(2)
            module, _, leaf = rest.rpartition(".")
            if module in _GPT2 and leaf in ("weight", "bias"):
                state[f"blocks.{layer}.{_GPT2[module]}.{leaf}"] = w.t().contiguous() if leaf == "weight" and "." in module else w
            elif rest not in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of old checkpoints
                raise HFError(f"unexpected tensor {name}")
        else:
            raise HFError(f"unexpected tensor {name}")
    return state


def stop_tokens(path: Path) -> list[str]:
    """The tokens that end a reply: generation_config.json's eos_token_id (one id or a list)."""
    from tokenizers import Tokenizer

    try:
        ids = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = ids if isinstance(ids, list) else [ids]
    return [t for t in (tok.id_to_token(i) for i in ids if isinstance(i, int)) if t]


def hf_tokenizer_info(path: Path) -> tuple[dict, str | None]:
    """Special tokens and the chat template, from tokenizer_config.json (when there is one); the
    template from chat_template.jinja or chat_template.json when that file has none."""
    try:
        tc = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        tc = {}

    def text(v):
        return v.get("content") if isinstance(v, dict) else v

    info = {"bos_token": text(tc.get("bos_token")), "eos_token": text(tc.get("eos_token")),
            "add_bos_token": bool(tc.get("add_bos_token", False))}
    template = tc.get("chat_template")
    if not isinstance(template, str):  # newer folders keep it in a file of its own
        try:
            template = (path / "chat_template.jinja").read_text()
        except OSError:
            try:
                template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
            except (OSError, ValueError, AttributeError):
                template = None
    return info, template if isinstance(template, str) and template.strip() else None
