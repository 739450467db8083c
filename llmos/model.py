"""The LLMOS Transformer: one file, used both to run pretrained models and to train new ones.

It covers the llama family (SmolLM2: grouped-query attention, RoPE, RMSNorm, SwiGLU, tied
embeddings), Gemma 3 (interleaved sliding-window and global layers with their own RoPE bases,
QK-norm, sandwich norms, scaled embeddings, GELU-tanh gates) and the small configurations that
`llmos train` builds from scratch. Everything that differs between them is a field of
`ModelConfig`; the modules below read those fields and nothing else.

Inference writes keys and values into a preallocated `KVCache` at explicit per-row positions,
so every row of a batch can be at its own point in its own sequence (continuous batching).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import llmos.kernels as kernels

PRESETS: dict[str, dict] = {
    # nanoGPT's shakespeare-char "baby GPT" sizes (4 layers, 4 heads, width 128, context 64).
    "baby-gpt": dict(n_layer=4, n_head=4, d_model=128, max_seq_len=64),
    "tiny": dict(n_layer=4, n_head=4, d_model=128, max_seq_len=256),
    "small": dict(n_layer=6, n_head=6, d_model=384, max_seq_len=256),
    "base": dict(n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "smollm2-135m": dict(
        vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536,
        max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5,
    ),
    "gemma3-270m": dict(
        arch="gemma3", vocab_size=262144, n_layer=18, n_head=4, n_kv_head=1, d_model=640,
        head_dim=256, d_ff=2048, max_seq_len=32768, rope_theta=1_000_000.0,
        rope_local_theta=10_000.0, sliding_window=512, global_every=6, norm_eps=1e-6,
        attn_scale=256**-0.5,
    ),
}


ARCHS = ("llama", "gemma2", "gemma3", "gpt2")


@dataclass
class ModelConfig:
    # "llama": pre-norm SwiGLU blocks, RoPE; "gemma2"/"gemma3": sandwich norms, GELU gates (and
    # QK-norm in 3); "gpt2": learned positions, LayerNorm, a plain GELU MLP, biases everywhere
    arch: str = "llama"
    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # fewer key/value heads than query heads = grouped-query attention
    d_model: int = 128
    head_dim: int | None = None
    d_ff: int | None = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # RoPE base of sliding-window layers (Gemma 3)
    sliding_window: int | None = None
    global_every: int = 1  # with a sliding window, every k-th layer still attends globally
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    causal: bool = True  # False gives bidirectional attention, for masked-LM training
    dropout: float = 0.0
    layer_types: list[str] = field(default_factory=list)  # derived: "global" | "sliding"
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen 2)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen 3; Gemma 3 always)
    attn_softcap: float | None = None  # attention scores squashed to (-c, c) by c * tanh(s / c) (Gemma 2)
    final_softcap: float | None = None  # the same for the output logits (Gemma 2)
    # RoPE stretched past the pretraining context: {"type": "linear" | "llama3" | "yarn" |
    # "longrope" | "factors", ...}; see rope_frequencies. Gemma 3's sliding layers keep plain RoPE.
    rope_scaling: dict | None = None

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}: use one of {', '.join(ARCHS)}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.arch == "gemma3":
            self.qk_norm = True
        if self.arch == "gpt2":
            self.qkv_bias = True
            if self.d_ff is None:
                self.d_ff = 4 * self.d_model
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ValueError(
                    f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}); "
                    f"choose a width that is a multiple of the head count"
                )
            self.head_dim = self.d_model // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.d_ff is None:
            # A gated MLP with 8/3 * d hidden units costs what a plain 4 * d MLP costs.
            self.d_ff = 32 * math.ceil(8 * self.d_model / 3 / 32)
        if self.attn_scale is None:
            self.attn_scale = self.head_dim**-0.5
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "global_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_types:
            self.layer_types = [
                "global" if self.sliding_window is None or (i + 1) % self.global_every == 0
                else "sliding"
                for i in range(self.n_layer)
            ]
        if len(self.layer_types) != self.n_layer:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.n_layer} layers")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling, self.head_dim)

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text())["model"])

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def gated(self) -> bool:
        """A gated MLP (gate and up fused in w13); GPT-2's w13 is its one input projection."""
        return self.arch != "gpt2"

    @property
    def rope(self) -> bool:
        return self.arch != "gpt2"  # GPT-2 learns a vector per position instead

    @property
    def gemma(self) -> bool:
        """Gemma 2 and 3: scaled embeddings, sandwich norms, GELU gates."""
        return self.arch in ("gemma2", "gemma3")


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32. Gemma's (1 + w) is folded into weight at conversion."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.shape = eps, (dim,)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and _fast():
            return torch.ops.llmos.rms_norm(x, self.weight, self.eps)  # one pass instead of six ops
        return F.rms_norm(x.float(), self.shape, self.weight.float(), self.eps).type_as(x)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    """RMSNorm, or GPT-2's LayerNorm (mean removed, with a bias)."""
    return nn.LayerNorm(dim, eps=config.norm_eps) if config.arch == "gpt2" else RMSNorm(dim, config.norm_eps)


def _fast() -> bool:
    """Inference with the C++ kernels loaded: fused norm and single-token attention apply."""
    return not torch.is_grad_enabled() and kernels.ready()


ROPE_SCALING_KEYS = {
    "linear": ("factor",),  # every frequency divided by factor (position interpolation)
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "attention_factor"),
    "factors": ("factors",),  # one divisor per frequency, as GGUF files store Llama 3.1's scaling
    # dynamic NTK: past the original context, the base grows with the sequence's length
    "dynamic": ("factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: dict, head_dim: int):
    kind = scaling.get("type") if isinstance(scaling, dict) else None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_SCALING_KEYS)}")
    for key in ROPE_SCALING_KEYS[kind]:
        value = scaling.get(key)
        if key in ("factors", "short_factor", "long_factor"):
            if not isinstance(value, list) or len(value) != head_dim // 2 or not all(
                    isinstance(v, (int, float)) and v > 0 for v in value):
                raise ValueError(f"rope_scaling {key} must be {head_dim // 2} positive numbers (one per frequency)")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"rope_scaling {kind} needs a positive number {key}, got {value!r}")


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None,
                     long: bool = False, length: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim/2,), factor on cos and sin) for RoPE base theta, stretched
    as `scaling` says. The formulas are those of the models' reference code: Llama 3.1's
    smoothed low-frequency division, YaRN's ramp between interpolated and extrapolated
    frequencies, LongRoPE's per-frequency factors (the long set when `long`), dynamic NTK's
    base raised for a sequence of `length` positions."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    kind = (scaling or {}).get("type")
    if kind == "dynamic":  # unchanged up to the original context, then base * (f L / L0 - (f - 1))^(d / (d - 2))
        factor, context = scaling["factor"], scaling["original_max_position_embeddings"]
        length = max(length or context, context)
        theta = theta * (factor * length / context - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / theta**exponents, 1.0
    inv_freq = 1.0 / theta**exponents
    if kind is None:
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "factors":
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32), 1.0
    if kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * theta**exponents), float(scaling["attention_factor"])
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelen - low) / (high - low)
        medium = ~(wavelen < context / high) & ~(wavelen > context / low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled), 1.0
    # YaRN: frequencies that turn fewer than beta_slow times over the original context are
    # interpolated, more than beta_fast times kept, a linear ramp between.
    factor, context = scaling["factor"], scaling["original_max_position_embeddings"]

    def dim_of(rotations):
        return head_dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(scaling["beta_fast"]), dim_of(scaling["beta_slow"])
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(scaling["attention_factor"])


def rope_tables(head_dim: int, max_len: int, theta: float, scaling: dict | None = None,
                length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions [0, max_len); `length`: the sequence's, for dynamic NTK."""
    positions = torch.arange(max_len, dtype=torch.float32)
    inv_freq, factor = rope_frequencies(head_dim, theta, scaling, length=length)
    angles = torch.outer(positions, inv_freq)  # (T, hd/2)
    if (scaling or {}).get("type") == "longrope":
        # Positions past the original context turn at the long factors' rates, as the reference
        # code does once a sequence grows that long (what is cached before keeps its rotation).
        start = int(scaling["original_max_position_embeddings"])
        if start < max_len:
            angles[start:] = torch.outer(positions[start:], rope_frequencies(head_dim, theta, scaling, long=True)[0])
    # The "rotate half" layout: dimension i pairs with i + hd/2. The sign of the rotation is
    # folded into the sine table, which saves a negation per call in apply_rope.
    cos, sin = angles.cos() * factor, angles.sin() * factor
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)  # (T, hd)


def apply_rope(x, cos, sin):
    """x: (B, T, H, hd); cos, sin: (B or 1, T, 1, hd) from rope_tables."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values for every layer, preallocated as (B, n_kv_head, max_len, head_dim).

    The token at position p is stored at index p, so the rows of a batch can advance
    independently (continuous batching) or in lockstep (candidates of one prompt). `rows` gives
    a view of a range of rows, which the model reads and writes like a cache of its own.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v  # one (B, n_kv_head, max_len, head_dim) tensor per layer

    @classmethod
    def allocate(cls, config: ModelConfig, batch_size: int, max_len: int, dtype=torch.float32, device=None) -> KVCache:
        # one block for every layer's keys and values, one allocation: the C library maps a block
        # this size from the system and returns it whole when the cache goes, instead of carving
        # 2 x n_layer pieces out of its heap that later allocations then fragment
        block = torch.zeros((2, config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim),
                            dtype=dtype, device=device)
        return cls(list(block[0].unbind(0)), list(block[1].unbind(0)))

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def rows(self, start: int, end: int) -> KVCache:
        """Rows [start, end) as a cache that shares this one's memory."""
        if start == 0 and end == self.batch_size:
            return self
        return KVCache([k[start:end] for k in self.k], [v[start:end] for v in self.v])

    def copy_rows(self, src: int, dst: int | slice, length: int):
        """Copy the first `length` positions of row src into row(s) dst: a shared prefill, or
        the last running row moved into a freed one."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def select(self, rows: torch.Tensor):
        """Keep (and repeat) the given rows, reallocating: beam reordering."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def write(self, layer: int, k, v, input_pos, span: AttnSpan):
        """k, v: (B, n_kv_head, T, hs) for the tokens at input_pos."""
        if span.shared:  # the T new tokens are the positions just before span.end, in every row
            self.k[layer][:, :, span.end - k.shape[2] : span.end] = k
            self.v[layer][:, :, span.end - k.shape[2] : span.end] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            # (B, T, nkv, hs) at (B, T). Contiguous first: index_put from the strided view into
            # the fused qkv output is an order of magnitude slower on a CPU.
            dtype = self.k[layer].dtype  # a float16 cache takes float32 keys and values
            self.k[layer][rows, :, input_pos] = k.transpose(1, 2).to(dtype).contiguous()
            self.v[layer][rows, :, input_pos] = v.transpose(1, 2).to(dtype).contiguous()


@dataclass
class AttnSpan:
    """What one forward pass attends to, shared by all layers of one kind (global or sliding)."""

    start: int = 0  # first cache index attended: a sliding window skips what lies before it
    end: int = 0  # one past the last cache index attended
    mask: torch.Tensor | None = None  # additive (B, 1, T, end - start); None: causal or full
    causal: bool = False  # use the fused causal kernel (queries and keys are the same tokens)
    shared: bool = True  # every row's new tokens sit at the same positions


def positions_in_segments(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) example ids -> each token's position within its example."""
    T = segments.shape[1]
    idx = torch.arange(T, device=segments.device).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - first


def segment_span(segments: torch.Tensor, window: int | None, causal: bool) -> AttnSpan:
    """Attention of packed examples: within an example, causal (and windowed) as usual."""
    T = segments.shape[1]
    same = segments[:, None, :, None] == segments[:, None, None, :]  # (B, 1, T, T)
    q = torch.arange(T, device=segments.device)[:, None]
    k = torch.arange(T, device=segments.device)[None, :]
    allowed = same & (k <= q) if causal else same
    if window:
        allowed = allowed & (k > q - window)
    return AttnSpan(0, T, allowed, shared=True)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config, self.layer = config, layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        # One matmul for q, k and v: fewer, larger kernels matter on a CPU.
        self.wqkv = nn.Linear(config.d_model, q_dim + 2 * kv_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(q_dim, config.d_model, bias=not config.gated)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(self, x, rope, span: AttnSpan, cache: KVCache | None, input_pos):
        B, T, _ = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.wqkv(x).view(B, T, nh + 2 * nkv, self.head_dim)
        if self.config.qk_norm:
            q, k, v = qkv.split([nh, nkv, nkv], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        else:
            qk, v = qkv.split([nh + nkv, nkv], dim=2)
        q, k = (apply_rope(qk, *rope) if rope else qk).split([nh, nkv], dim=2)  # (B, T, nh, hs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            cache.write(self.layer, k, v, input_pos, span)
            k = cache.k[self.layer][:, :, span.start : span.end]
            v = cache.v[self.layer][:, :, span.start : span.end]
        if (T == 1 and span.mask is None and q.dtype == torch.float32 and not self.config.attn_softcap
                and _fast()):
            y = torch.ops.llmos.decode_attention(q, k, v, self.config.attn_scale)  # (B, nh, 1, hs); a float32 or float16 cache
        else:
            if k.dtype != q.dtype:  # a float16 cache under float32 attention
                k, v = k.to(q.dtype), v.to(q.dtype)
            if self.config.attn_softcap:
                y = softcapped_attention(q, k, v, span, self.config.attn_scale, self.config.attn_softcap)
            else:
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=span.mask, is_causal=span.causal,
                    dropout_p=self.config.dropout if self.training else 0.0,
                    scale=self.config.attn_scale, enable_gqa=nh != nkv,
                )
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def softcapped_attention(q, k, v, span: AttnSpan, scale: float, cap: float):
    """Attention with scores c * tanh(s / c) before the softmax (SDPA has no such hook)."""
    if k.shape[1] != q.shape[1]:  # grouped-query: each key/value head serves several query heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.tanh((q @ k.transpose(-2, -1)).float() * scale / cap) * cap  # (B, nh, T, S)
    if span.mask is not None:
        scores = scores + (span.mask if span.mask.dtype != torch.bool else
                           torch.zeros_like(scores).masked_fill(~span.mask, float("-inf")))
    elif span.causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1), float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        # Gate and up, fused (GPT-2: up alone, with biases).
        self.w13 = nn.Linear(config.d_model, (2 if config.gated else 1) * config.d_ff, bias=not config.gated)
        self.w2 = nn.Linear(config.d_ff, config.d_model, bias=not config.gated)
        self.gemma, self.gated = config.gemma, config.gated

    def forward(self, x):
        if not self.gated:
            return self.w2(F.gelu(self.w13(x), approximate="tanh"))
        gate, up = self.w13(x).chunk(2, dim=-1)
        gate = F.gelu(gate, approximate="tanh") if self.gemma else F.silu(gate)
        return self.w2(gate * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config, config.d_model)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config, config.d_model)
        self.mlp = MLP(config)
        self.post_attn_norm = self.post_mlp_norm = None
        if config.gemma:  # Gemma normalises each sublayer's output too, before the residual add
            self.post_attn_norm = RMSNorm(config.d_model, config.norm_eps)
            self.post_mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.dropout = config.dropout

    def forward(self, x, rope, span, cache, input_pos):
        h = self.attn(self.attn_norm(x), rope, span, cache, input_pos)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout)
        return x + h


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # _weight skips nn.Embedding's own init: _init_weights below does it (and skips it on
        # the meta device, where it would drag in sympy for seconds).
        self.embed = nn.Embedding(config.vocab_size, config.d_model,
                                  _weight=torch.empty(config.vocab_size, config.d_model))
        if not config.rope:
            self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model,
                                          _weight=torch.empty(config.max_seq_len, config.d_model))
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._rope_cache: dict = {}
        self._fused: list | None = None  # per block, decode_layer's weight arguments (False: not fusable)
        # what an engine's KV cache holds; None: the dtype the model computes in (the loader
        # sets float16 for GGUF blocks kept quantized that decode through decode_layer, as
        # llama.cpp's default cache is float16)
        self.kv_cache_dtype: torch.dtype | None = None
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # GPT-2 style: N(0, 0.02), with residual projections scaled down by depth.
        if isinstance(module, (nn.Linear, nn.Embedding)) and not module.weight.is_meta:
            std = 0.02
            if isinstance(module, nn.Linear) and module.out_features == self.config.d_model:
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() skips the tied copy

    def _rope(self, local: bool, device, length: int):
        """cos and sin tables covering positions [0, length) at least. They grow by doubling as
        sequences get longer: sized for the whole context at once, Gemma's would take 134 MB.
        Dynamic NTK past the original context: tables for a sequence of exactly `length`."""
        c = self.config
        plain = local and c.rope_local_theta  # Gemma 3's sliding layers: their own base, never scaled
        theta, scaling = (c.rope_local_theta, None) if plain else (c.rope_theta, c.rope_scaling)
        if (scaling or {}).get("type") == "dynamic" and length > scaling["original_max_position_embeddings"]:
            key = (theta, "dynamic", device)  # the frequencies change with each length: the last one is kept
            tables = self._rope_cache.get(key)
            if tables is None or tables[0].shape[0] != length:
                tables = tuple(t.to(device) for t in rope_tables(c.head_dim, length, theta, scaling, length=length))
                self._rope_cache[key] = tables
            return tables
        key = (theta, bool(scaling), device)
        tables = self._rope_cache.get(key)
        if tables is None or tables[0].shape[0] < length:
            size = min(c.max_seq_len, max(1024, 1 << max(length - 1, 0).bit_length()))
            tables = tuple(t.to(device) for t in rope_tables(c.head_dim, size, theta, scaling))
            self._rope_cache[key] = tables
        return tables

    def _rope_length(self, input_pos, kv_len: int) -> int:
        """The length the RoPE tables are made for: kv_len, or for dynamic NTK the sequence's own
        length, its last position + 1 (the reference code's choice, the longest row of a batch)."""
        if (self.config.rope_scaling or {}).get("type") == "dynamic":
            return int(input_pos.max()) + 1
        return kv_len

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        kv_len: int | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        segments: torch.Tensor | None = None,
        shared_prefix: int = 0,
    ) -> torch.Tensor:
        """Logits (float32) for idx: (B, T) token ids.

        Without a cache (training, scoring) the tokens are positions 0..T-1. With a cache, keys
        and values are written into it and attention covers cached positions [0, kv_len):
        - input_pos None: every row's tokens are the last T positions before kv_len (prefill,
          and decoding candidates in lockstep);
        - input_pos (B, T): each row's own positions, all below kv_len (continuous batching).
        Positions must be below config.max_seq_len; the engine checks. last_only returns
        (B, 1, V): prefill only needs the next token's distribution. return_hidden gives the
        final normalised hidden states (B, T, C) instead of logits (text embeddings).
        segments (B, T), training only: short examples packed into one row, each run of equal
        ids one example; its positions start at 0 and its tokens attend within it only.
        shared_prefix: every row of the cache holds the same first `shared_prefix` positions
        (candidates of one prompt); decoding may read them from row 0 alone.
        """
        c = self.config
        B, T = idx.shape
        shared = input_pos is None
        if segments is not None:
            if cache is not None:
                raise ValueError("segments (packed examples) are for training and scoring, not with a KV cache")
            kv_len, input_pos = T, positions_in_segments(segments)
        elif cache is None:
            kv_len, input_pos = T, torch.arange(T, device=idx.device)[None]
        elif shared:
            if kv_len is None:
                raise ValueError("kv_len is required when decoding with a cache")
            input_pos = torch.arange(kv_len - T, kv_len, device=idx.device)[None]
        elif kv_len is None:
            kv_len = cache.max_len
        x = self.embed(idx)  # (B, T, C)
        if c.gemma:
            x = x * torch.tensor(c.d_model**0.5, dtype=x.dtype)
        if not c.rope:
            x = x + self.pos_embed(input_pos)
        rope_len = self._rope_length(input_pos, kv_len) if c.rope else kv_len
        if cache is not None and T == 1 and c.causal and _fast() and self._fused_blocks():
            x = self._decode_fused(x[:, 0], input_pos.reshape(-1).expand(B), cache, kv_len, rope_len,
                                   shared_prefix)[:, None]
            return self.norm(x) if return_hidden else self._logits(x)
        plan = {}
        for kind in set(c.layer_types):
            rope = None
            if c.rope:
                cos, sin = self._rope(kind == "sliding", idx.device, rope_len)  # positions are below it
                rope = (cos[input_pos][:, :, None].to(x.dtype), sin[input_pos][:, :, None].to(x.dtype))  # (B|1, T, 1, hd)
            window = c.sliding_window if kind == "sliding" else None
            if segments is not None:
                plan[kind] = (rope, segment_span(segments, window, c.causal))
            else:
                plan[kind] = (rope, self._span(input_pos, kv_len, window, shared, cache is None))
        for block, kind in zip(self.blocks, c.layer_types):
            x = block(x, *plan[kind], cache, input_pos)
        if last_only:
            x = x[:, -1:]
        if return_hidden:
            return self.norm(x)
        return self._logits(x)

    def _logits(self, x):
        logits = self.lm_head(self.norm(x)).float()
        if self.config.final_softcap:
            logits = torch.tanh(logits / self.config.final_softcap) * self.config.final_softcap
        return logits

    def _fused_blocks(self) -> bool:
        """Whether every block can decode in one C++ call: block-quantized projections, float32
        norms (the C++ kernels' `decode_layer`)."""
        if self._fused is None and (self.config.attn_softcap or not self.config.rope):
            self._fused = False  # decode_layer has no softcapping, no LayerNorm: the module path
        if self._fused is None:
            args = []
            for block in self.blocks:
                linears = (block.attn.wqkv, block.attn.wo, block.mlp.w13, block.mlp.w2)
                norms = [block.attn_norm, block.mlp_norm, block.post_attn_norm, block.post_mlp_norm,
                         getattr(block.attn, "q_norm", None), getattr(block.attn, "k_norm", None)]
                if not all(hasattr(m, "block_types") and getattr(m, "bias", None) is None for m in linears) or any(
                        n is not None and n.weight.dtype != torch.float32 for n in norms):
                    self._fused = False
                    break
                weights = [(m.block_weights, m.block_types) for m in linears]
                args.append(([n.weight if n is not None else None for n in norms], weights))
            else:
                self._fused = args
        return bool(self._fused)

    def _decode_fused(self, x, pos, cache: KVCache, kv_len: int, rope_len: int, shared: int):
        """One new token per row (x (B, C), row b at position pos[b] < kv_len) through every block;
        the first `shared` positions of every row's cache are row 0's."""
        c = self.config
        tables = {kind: self._rope(kind == "sliding", x.device, rope_len) for kind in set(c.layer_types)}
        for i, kind in enumerate(c.layer_types):
            cos, sin = tables[kind]
            norms, ((wqkv, tqkv), (wo, to), (w13, t13), (w2, t2)) = self._fused[i]
            window = c.sliding_window if kind == "sliding" else 0
            x = torch.ops.llmos.decode_layer(
                x, *norms, wqkv, tqkv, wo, to, w13, t13, w2, t2, cache.k[i], cache.v[i], pos, cos, sin,
                c.n_head, c.n_kv_head, c.head_dim, window, c.norm_eps, c.attn_scale, c.gemma, shared)
        return x

    def _span(self, input_pos, kv_len: int, window: int | None, shared: bool, no_cache: bool):
        T = input_pos.shape[1]
        if not self.config.causal:
            return AttnSpan(0, kv_len)
        if shared:
            first_key = max(0, kv_len - T - window + 1) if window else 0
            if T == 1:  # one new token per row: everything in [first_key, kv_len) is visible
                return AttnSpan(first_key, kv_len)
            if kv_len == T and (window is None or T <= window):
                return AttnSpan(0, kv_len, causal=True)
        else:
            first_key = 0
        q = input_pos[:, None, :, None]  # (B|1, 1, T, 1)
        k = torch.arange(first_key, kv_len, device=input_pos.device)[None, None, None, :]
        allowed = k <= q
        if window:
            allowed &= k > q - window
        mask = torch.zeros(allowed.shape, device=q.device).masked_fill_(~allowed, float("-inf"))
        return AttnSpan(first_key, kv_len, mask, shared=shared)


