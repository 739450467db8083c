"""GGUF -> LLMOS checkpoint folder: the weights mapped onto model.py, quantized blocks kept as stored.

A checkpoint folder holds `config.json` (model config, prompt style, generation defaults,
licence), `model.safetensors` and `tokenizer.json`. GGUF files are read with the `gguf`
package, which parses the format without executing anything from the file, but trusts every
count, length and offset in it: `check_layout` walks the header first with each of them checked
against the file's size, and the hyperparameters and tensor shapes are checked against each
other before anything is dequantized, so a corrupt or hostile file is a one-line error, never a
huge allocation or an endless loop.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from llmos.model import ModelConfig, check_rope_scaling

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2")  # Mistral's GGUFs say "llama"

# What a GGUF may declare. Real models stay far below: Gemma 3 has 262144 tokens, a 32768-token
# context and ~800k metadata array items (its tokenizer), and a few hundred tensors.
MAX_CONTEXT = 1 << 20  # the RoPE tables and the KV cache grow with it
MAX_VOCAB = 1 << 20
MAX_LAYERS = 1024
MAX_SIZE = 1 << 20  # any other hyperparameter (width, heads)
MAX_ARRAY_ITEMS = 1 << 22  # all metadata arrays together: gguf-py makes a numpy view per item
MAX_ENTRIES = 1 << 16  # metadata keys; tensors
MAX_DIMS = 4  # ggml's limit

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class ConversionError(ValueError):
    """The file is not a GGUF model this converter supports (the message does not name the file:
    the caller does)."""


class _Header:
    """A cursor over a mapped GGUF file that refuses to step past its end."""

    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos, self.order, self.items = buf, size, 0, "<", 0

    def need(self, n: int, what: str):
        if n > self.size - self.pos:
            raise ConversionError(f"{what} at byte {self.pos} takes {n} bytes, past the end of the file "
                                  f"({self.size} bytes): it is truncated or corrupt")

    def read(self, fmt: str, what: str):
        n = struct.calcsize(self.order + fmt)
        self.need(n, what)
        values = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += n
        return values[0] if len(values) == 1 else values

    def string(self, what: str) -> bytes:
        n = self.read("Q", f"the length of {what}")
        self.need(n, what)
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def value(self, vtype: int, key: str, depth: int = 0):
        """Step over one value; return it if it is a scalar (None for strings and arrays)."""
        if vtype in _SCALAR:
            return self.read(_SCALAR[vtype], f"the value of {key}")
        if vtype == _STRING:
            self.string(f"the value of {key}")
            return None
        if vtype != _ARRAY or depth > 2:
            raise ConversionError(f"{key} has unknown value type {vtype}")
        itype, count = self.read("IQ", f"the array header of {key}")
        self.items += count
        if self.items > MAX_ARRAY_ITEMS:
            raise ConversionError(f"{key} is an array of {count} items; the metadata arrays may hold "
                                  f"{MAX_ARRAY_ITEMS} in all")
        if itype in _SCALAR:
            self.need(count * struct.calcsize(_SCALAR[itype]), f"the {count}-item array {key}")
            self.pos += count * struct.calcsize(_SCALAR[itype])
            return None
        self.need(count * (8 if itype == _STRING else 12), f"the {count}-item array {key}")  # the smallest items
        if itype == _STRING:  # a tokenizer's vocabulary: the hot loop, kept tight
            length, pos = struct.Struct(self.order + "Q").unpack_from, self.pos
            for _ in range(count):
                if self.size - pos < 8 or self.size - pos - 8 < length(self.buf, pos)[0]:
                    self.pos = pos
                    self.string(f"a string of {key}")  # raises, saying where and how long
                pos += 8 + length(self.buf, pos)[0]
            self.pos = pos
            return None
        for _ in range(count):
            self.value(itype, key, depth + 1)
        return None


def check_layout(path: Path):
    """Walk a GGUF's header and tensor table, checking every count, length and offset against
    the file's size and the bounds above; raise ConversionError on the first that does not fit."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    if size < 24:
        raise ConversionError(f"{size} bytes: too short for a GGUF header")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        h = _Header(buf, size)
        if buf[:4] != b"GGUF":
            raise ConversionError("it does not start with the GGUF magic number")
        h.pos = 4
        version = h.read("I", "the version")
        if version & 0xFFFF == 0:  # written on a big-endian machine (gguf-py reads both)
            h.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise ConversionError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = h.read("QQ", "the tensor and key counts")
        for count, what, smallest in ((n_kv, "metadata keys", 13), (n_tensors, "tensors", 24)):
            if count > MAX_ENTRIES:
                raise ConversionError(f"it declares {count} {what}; at most {MAX_ENTRIES} are supported")
            h.need(count * smallest, f"the {count} {what}")
        keys, alignment = set(), 32
        for _ in range(n_kv):
            key = _text(h.string("a metadata key"), "a metadata key")
            if key in keys:
                raise ConversionError(f"the metadata key {key} appears twice")
            keys.add(key)
            vtype = h.read("I", f"the type of {key}")
            value = h.value(vtype, key)
            if key == "general.alignment":
                if vtype != _UINT32 or not value or value & (value - 1):
                    raise ConversionError(f"general.alignment must be a power of two (uint32), got {value!r}")
                alignment = value
        tensors, names = [], set()
        for _ in range(n_tensors):
            name = _text(h.string("a tensor name"), "a tensor name")
            if name in names:
                raise ConversionError(f"the tensor {name} appears twice")
            names.add(name)
            n_dims = h.read("I", f"the dimension count of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise ConversionError(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} are valid)")
            dims = h.read("Q" * n_dims, f"the shape of {name}")
            dims = dims if isinstance(dims, tuple) else (dims,)
            ttype, offset = h.read("IQ", f"the type and offset of {name}")
            tensors.append((name, dims, ttype, offset))
        data_start = -(-h.pos // alignment) * alignment
        for name, dims, ttype, offset in tensors:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise ConversionError(f"tensor {name} has unknown type {ttype}") from None
            if min(dims) < 1 or dims[0] % block:
                raise ConversionError(f"tensor {name} has shape {list(dims)}, which its type "
                                      f"{GGMLQuantizationType(ttype).name} cannot hold")
            n_bytes = math.prod(dims) // block * type_size
            if data_start + offset + n_bytes > size:
                raise ConversionError(f"the data of tensor {name} ({n_bytes} bytes at byte {data_start + offset}) "
                                      f"runs past the end of the file ({size} bytes): it is truncated or corrupt")


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConversionError(f"{what} is not UTF-8 text") from None


def read_gguf(path: Path):
    """A gguf-py reader for a file whose layout has been checked (ConversionError otherwise)."""
    import gguf

    try:
        check_layout(path)
    except ConversionError as e:
        raise ConversionError(f"not a readable GGUF file: {e}") from None
    except (OSError, ValueError) as e:  # unreadable, or an empty file mmap refuses
        raise ConversionError(f"not a readable GGUF file ({type(e).__name__}: {e})") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # whatever the checks above missed
        raise ConversionError(f"not a readable GGUF file ({type(e).__name__}: {e})") from e
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
    """The model config from a GGUF's metadata; each hyperparameter present, of its type and in
    bounds (ConversionError names the first that is not)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConversionError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    norm_eps = "attention.layer_norm_epsilon" if arch == "gpt2" else "attention.layer_norm_rms_epsilon"
    required = ["block_count", "embedding_length", "attention.head_count", "feed_forward_length",
                "context_length", norm_eps]
    if arch in ("gemma2", "gemma3", "qwen3"):
        required.append("attention.key_length")
    missing = [f"{arch}.{key}" for key in required if meta.get(f"{arch}.{key}") is None]
    if missing:
        raise ConversionError(f"the GGUF lacks the metadata {', '.join(missing)}")

    def count(key, default=None, limit=MAX_SIZE):
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ConversionError(f"{arch}.{key} is {value!r}; it must be a whole number from 1 to {limit}")
        return value

    def positive(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ConversionError(f"{arch}.{key} is {value!r}; it must be a positive number")
        return float(value)

    n_head = count("attention.head_count")
    common = dict(
        arch=arch if arch in ("gemma2", "gemma3", "gpt2") else "llama",  # Qwen, Phi-3: llama, options on
        n_layer=count("block_count", limit=MAX_LAYERS),
        n_head=n_head,
        n_kv_head=count("attention.head_count_kv", n_head),
        d_model=count("embedding_length"),
        d_ff=count("feed_forward_length"),
        max_seq_len=count("context_length", limit=MAX_CONTEXT),
        rope_theta=positive("rope.freq_base", 10000.0),
        norm_eps=positive(norm_eps),
    )
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        common.update(rope_scaling={"type": "linear", "factor": positive("rope.scaling.factor")})
    elif scaling == "yarn":
        common.update(rope_scaling=_yarn(meta, arch, positive, common["max_seq_len"]))
    elif scaling not in (None, "none"):
        raise ConversionError(f"{arch}.rope.scaling.type is {scaling!r}; supported: linear, yarn, and Llama 3.1's "
                              f"per-frequency factors (a rope_freqs tensor)")
    if arch == "qwen2":
        common.update(qkv_bias=True)
    if arch == "phi3" and meta.get("phi3.attention.sliding_window") is not None:  # every layer windowed
        common.update(sliding_window=count("attention.sliding_window", limit=MAX_CONTEXT),
                      global_every=common["n_layer"] + 1)
    if arch == "gemma2":
        head_dim, n_layer = count("attention.key_length"), common["n_layer"]
        # Even layers see a sliding window, odd ones everything; scores and logits soft-capped.
        # The query scale is not in the file: llama.cpp uses 1/sqrt(head_dim), and for the 27B
        # model (46 layers) 1/sqrt(width / heads), which is what each model's config says.
        scale = (common["d_model"] / n_head) ** -0.5 if n_layer == 46 else head_dim**-0.5
        common.update(
            head_dim=head_dim, sliding_window=count("attention.sliding_window", 4096, MAX_CONTEXT),
            layer_types=["sliding" if i % 2 == 0 else "global" for i in range(n_layer)], attn_scale=scale,
            attn_softcap=positive("attn_logit_softcapping", 50.0), final_softcap=positive("final_logit_softcapping", 30.0),
        )
    if arch == "qwen3":
        common.update(qk_norm=True, head_dim=count("attention.key_length"))
    if arch == "gemma3":
        head_dim = count("attention.key_length")
        # Gemma 3 text models: every 6th layer global (RoPE base from the file), the others a
        # sliding window with RoPE base 10k; queries scaled by 1/sqrt(head_dim) ("query_pre_attn_scalar").
        common.update(
            head_dim=head_dim, rope_local_theta=10_000.0,
            sliding_window=count("attention.sliding_window", 512, MAX_CONTEXT), global_every=6,
            attn_scale=head_dim**-0.5,
        )
    try:
        return ModelConfig(**common)
    except ValueError as e:
        raise ConversionError(f"its hyperparameters do not fit together: {e}") from None


def gguf_arch(reader) -> str:
    field = reader.fields.get("general.architecture")
    return field.contents() if field is not None else "?"


def check_tensors(reader, config: ModelConfig):
    """Every tensor named and shaped as the config says (and the vocabulary sizes agreeing),
    checked before any tensor is dequantized."""
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}  # innermost last
    if "token_embd.weight" not in shapes:
        raise ConversionError("the GGUF has no token_embd.weight tensor")
    vocab = shapes["token_embd.weight"][0]
    if vocab > MAX_VOCAB:
        raise ConversionError(f"its vocabulary has {vocab} tokens; at most {MAX_VOCAB} are supported")
    arch = gguf_arch(reader)
    declared = reader.fields.get(f"{arch}.vocab_size")
    if declared is not None and declared.contents() != vocab:
        raise ConversionError(f"{arch}.vocab_size is {declared.contents()!r}, but token_embd.weight "
                              f"has {vocab} rows")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ConversionError("the GGUF has no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens.data) > vocab:
        raise ConversionError(f"its tokenizer has {len(tokens.data)} tokens, but token_embd.weight only {vocab} rows")
    d, hd, ff = config.d_model, config.head_dim, config.d_ff
    q, kv = config.n_head * hd, config.n_kv_head * hd
    if config.arch == "gpt2":  # fused q/k/v, LayerNorms and biases everywhere, learned positions
        layer = {"attn_norm": (d,), "attn_qkv": (q + 2 * kv, d), "attn_output": (d, q), "ffn_norm": (d,),
                 "ffn_up": (ff, d), "ffn_down": (d, ff)}
        per_layer = {**{f"{k}.weight": v for k, v in layer.items()}, **{f"{k}.bias": v[:1] for k, v in layer.items()}}
        expected = {"token_embd.weight": (vocab, d), "position_embd.weight": (config.max_seq_len, d),
                    "output_norm.weight": (d,), "output_norm.bias": (d,)}
        return _check_shapes(shapes, expected, per_layer, {"output.weight": (vocab, d)}, config, arch)
    if arch == "phi3":  # q/k/v fused in attn_qkv, gate and up in ffn_up
        per_layer = dict(attn_norm=(d,), attn_qkv=(q + 2 * kv, d), attn_output=(d, q), ffn_norm=(d,),
                         ffn_up=(2 * ff, d), ffn_down=(d, ff))
    else:
        per_layer = dict(attn_norm=(d,), attn_q=(q, d), attn_k=(kv, d), attn_v=(kv, d), attn_output=(d, q),
                         ffn_norm=(d,), ffn_gate=(ff, d), ffn_up=(ff, d), ffn_down=(d, ff))
    if config.qk_norm:
        per_layer.update(attn_q_norm=(hd,), attn_k_norm=(hd,))
    if config.gemma:
        per_layer.update(post_attention_norm=(d,), post_ffw_norm=(d,))
    per_layer = {f"{kind}.weight": shape for kind, shape in per_layer.items()}
    if config.qkv_bias:
        per_layer.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
    expected = {"token_embd.weight": (vocab, d), "output_norm.weight": (d,)}
    optional = {"output.weight": (vocab, d), "rope_freqs.weight": (hd // 2,),
                "rope_factors_long.weight": (hd // 2,), "rope_factors_short.weight": (hd // 2,)}
    _check_shapes(shapes, expected, per_layer, optional, config, arch)


def _check_shapes(shapes: dict, expected: dict, per_layer: dict, optional: dict, config: ModelConfig, arch: str):
    """Every tensor expected (globally, or per layer as blk.N.<name>) present, nothing else."""
    for i in range(config.n_layer):
        expected.update({f"blk.{i}.{name}": shape for name, shape in per_layer.items()})
    for name, shape in shapes.items():
        want = expected.get(name) or optional.get(name)
        if want is None:
            raise ConversionError(f"unexpected tensor {name} in a {arch} GGUF with {config.n_layer} layers")
        if shape != want:
            raise ConversionError(f"tensor {name} has shape {list(shape)}, but the metadata calls for {list(want)}")
    missing = [name for name in expected if name not in shapes]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConversionError(f"the GGUF lacks the tensor(s) {', '.join(missing[:3])}{more}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_BLOCK = re.compile(r"blk\.(\d+)\.(.+)\.weight")
_BIAS = re.compile(r"blk\.(\d+)\.(attn_[qkv])\.bias")
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


_GPT2_TENSOR = re.compile(r"blk\.(\d+)\.(attn_norm|attn_qkv|attn_output|ffn_norm|ffn_up|ffn_down)\.(weight|bias)")
_GPT2 = {"attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "attn_qkv": "attn.wqkv", "attn_output": "attn.wo",
         "ffn_up": "mlp.w13", "ffn_down": "mlp.w2"}
FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}


def _tensor(t) -> tuple[int | None, np.ndarray]:
    """(block type, (rows, bytes) uint8) for a quantized tensor; (None, float32 array) otherwise."""
    from llmos.kernels import BLOCK_TYPES

    shape = [int(n) for n in reversed(t.shape)]  # GGUF lists dims innermost first
    kind = int(t.tensor_type)
    if kind in FLOAT_TYPES:
        from gguf import quants

        return None, quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
    if kind not in BLOCK_TYPES:
        supported = ", ".join(list(FLOAT_TYPES.values()) + [name for name, _, _ in BLOCK_TYPES.values()])
        raise ConversionError(f"tensor {t.name} is stored as {t.tensor_type.name}, which LLMOS does not compute "
                              f"with; supported: {supported}")
    _, block, nbytes = BLOCK_TYPES[kind]
    if shape[-1] % block:
        raise ConversionError(f"tensor {t.name} has rows of {shape[-1]} weights, not a multiple of "
                              f"{t.tensor_type.name}'s block of {block}")
    rows = int(np.prod(shape[:-1]))
    data = np.asarray(t.data).view(np.uint8).reshape(-1)
    if data.size != rows * shape[-1] // block * nbytes:
        raise ConversionError(f"tensor {t.name} holds {data.size} bytes, not the {rows * shape[-1] // block * nbytes} "
                              f"its shape and type call for")
    return kind, data.reshape(rows, -1)


def gguf_tensors(reader, config: ModelConfig, progress: Callable[[int], None] | None = None):
    """The GGUF's tensors mapped onto model.Transformer, quantized ones left as they are stored.

    Returns (float tensors, {name: [(block type, (rows, bytes) uint8), ...]}): the q/k/v and
    gate/up projections become the row groups of one fused weight.
    """
    check_tensors(reader, config)
    arch = gguf_arch(reader)
    parts: dict[int, dict[str, tuple]] = {}
    longrope: dict[str, list[float]] = {}
    state: dict[str, torch.Tensor] = {}
    quant: dict[str, list] = {}

    def put(name: str, kind, w):
        if kind is None:
            state[name] = torch.from_numpy(np.array(w))
        else:
            quant[name] = [(kind, torch.from_numpy(np.array(w)))]

    for t in reader.tensors:
        kind, w = _tensor(t)
        if t.name == "token_embd.weight":
            put("embed.weight", kind, w)
        elif t.name in ("output_norm.weight", "output_norm.bias"):
            put("norm." + t.name.rsplit(".", 1)[1], kind, w)
        elif t.name == "position_embd.weight":
            put("pos_embed.weight", kind, w)
        elif arch == "gpt2" and (m := _GPT2_TENSOR.fullmatch(t.name)):
            if m.group(3) == "bias" and kind is not None:
                raise ConversionError(f"{t.name} must be stored as floats")
            put(f"blocks.{m.group(1)}.{_GPT2[m.group(2)]}.{m.group(3)}", kind, w)
        elif t.name == "output.weight":
            put("lm_head.weight", kind, w)
        elif t.name == "rope_freqs.weight":  # Llama 3.1's stretched RoPE: a divisor per frequency
            if kind is not None:
                raise ConversionError("rope_freqs.weight must be stored as floats")
            config.rope_scaling = {"type": "factors", "factors": [float(v) for v in np.asarray(w).reshape(-1)]}
        elif t.name in ("rope_factors_long.weight", "rope_factors_short.weight"):  # Phi-3's LongRoPE
            if kind is not None:
                raise ConversionError(f"{t.name} must be stored as floats")
            longrope[t.name.split("_")[2].split(".")[0]] = [float(v) for v in np.asarray(w).reshape(-1)]
        elif m := _BIAS.fullmatch(t.name):
            parts.setdefault(int(m.group(1)), {})[m.group(2) + "_bias"] = (kind, w)
        elif m := _BLOCK.fullmatch(t.name):
            layer, name = int(m.group(1)), m.group(2)
            if name in _SIMPLE:
                put(f"blocks.{layer}.{_SIMPLE[name]}", kind, w)
            elif arch == "phi3" and name in ("attn_qkv", "ffn_up"):  # already fused, in our order
                put(f"blocks.{layer}.{'attn.wqkv' if name == 'attn_qkv' else 'mlp.w13'}.weight", kind, w)
            elif name in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
                # A row permutation: it applies to quantized rows as it does to float ones.
                if arch == "llama" and name == "attn_q":  # llama.cpp permutes llama's q/k only
                    w = _unpermute(w, config.n_head)
                elif arch == "llama" and name == "attn_k":
                    w = _unpermute(w, config.n_kv_head)
                parts.setdefault(layer, {})[name] = (kind, w)
            else:
                raise ConversionError(f"unexpected tensor {t.name} in a {arch} GGUF")
        else:
            raise ConversionError(f"unexpected tensor {t.name} in a {arch} GGUF")
        if progress:
            progress(1)
    for layer, p in parts.items():
        if config.qkv_bias:
            biases = [p.get(f"attn_{n}_bias") for n in "qkv"]
            if any(b is None or b[0] is not None for b in biases):
                raise ConversionError(f"layer {layer}'s q/k/v biases are missing or not float")
            state[f"blocks.{layer}.attn.wqkv.bias"] = torch.from_numpy(np.concatenate([b[1] for b in biases]))
        for fused, names in (("attn.wqkv", ("attn_q", "attn_k", "attn_v")), ("mlp.w13", ("ffn_gate", "ffn_up"))):
            try:
                pieces = [p[n] for n in names]
            except KeyError as e:
                raise ConversionError(f"layer {layer} lacks tensor {e.args[0]}") from None
            name = f"blocks.{layer}.{fused}.weight"
            if all(kind is None for kind, _ in pieces):
                state[name] = torch.from_numpy(np.concatenate([w for _, w in pieces]))
            elif any(kind is None for kind, _ in pieces):
                raise ConversionError(f"layer {layer} mixes float and quantized tensors in {', '.join(names)}")
            else:
                from llmos.weights.quant import fuse

                quant[name] = fuse([(kind, torch.from_numpy(np.array(w))) for kind, w in pieces])
    if longrope:
        config.rope_scaling = _longrope(reader, arch, config, longrope)
    if config.rope_scaling:
        try:
            check_rope_scaling(config.rope_scaling, config.head_dim)
        except ValueError as e:
            raise ConversionError(f"its RoPE scaling: {e}") from None
    config.vocab_size = next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    config.tie_embeddings = "lm_head.weight" not in state and "lm_head.weight" not in quant
    return state, quant


def _yarn(meta: dict, arch: str, positive, context: int) -> dict:
    """YaRN from a GGUF's metadata, as model.py's rope_scaling (the dict rope_from_hf builds from a
    config.json). llama.cpp multiplies cos and sin by 1 + 0.1 ln(factor), the magnitude the
    reference code derives, and by `yarn_attn_factor` on top (1 when absent); its ramp between
    interpolated and kept frequencies is the reference's, scaled by `yarn_ext_factor` (1 here).
    DeepSeek-style `yarn_log_multiplier` changes the magnitude differently: refused, not guessed."""
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if isinstance(original, bool) or not isinstance(original, int) or not 1 <= original <= context:
        raise ConversionError(f"{arch}.rope.scaling.original_context_length is {original!r}; YaRN needs the "
                              f"pretraining context (at most the context length, {context})")
    factor = positive("rope.scaling.factor")
    for key, allowed in (("yarn_ext_factor", 1.0), ("yarn_log_multiplier", 0.0)):
        value = meta.get(f"{arch}.rope.scaling.{key}", allowed)
        if value != allowed:
            raise ConversionError(f"{arch}.rope.scaling.{key} is {value!r}; only YaRN with {key} {allowed:g} "
                                  f"(or absent) is supported")
    magnitude = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": positive("rope.scaling.yarn_beta_fast", 32.0),
            "beta_slow": positive("rope.scaling.yarn_beta_slow", 1.0),
            "attention_factor": positive("rope.scaling.yarn_attn_factor", 1.0) * magnitude, "truncate": True}


def _longrope(reader, arch: str, config: ModelConfig, factors: dict) -> dict:
    """Phi-3's LongRoPE from a GGUF: the factor tensors, the original context and the
    attention factor from the metadata (derived as the reference code does when absent)."""
    if len(factors) != 2:
        raise ConversionError("a GGUF with LongRoPE needs both rope_factors_long and rope_factors_short")
    field = reader.fields.get(f"{arch}.rope.scaling.original_context_length")
    original = field.contents() if field is not None else None
    if not isinstance(original, int) or not 1 <= original <= config.max_seq_len:
        raise ConversionError(f"{arch}.rope.scaling.original_context_length is {original!r}; LongRoPE needs the "
                              f"pretraining context (at most the context length)")
    field = reader.fields.get(f"{arch}.rope.scaling.attn_factor")
    attention = field.contents() if field is not None else None
    if attention is None:
        factor = config.max_seq_len / original
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"type": "longrope", "long_factor": factors["long"], "short_factor": factors["short"],
            "original_max_position_embeddings": original, "attention_factor": float(attention)}


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
