"""Hugging Face folders of the llama family (Llama, Mistral, Qwen 2, Qwen 3): tiny random models
written by transformers itself, converted into the store, and compared with transformers'
logits in float32."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import byte_level_vocab
from llmos.weights import store

FAMILIES = {
    "llama": dict(cls="LlamaForCausalLM", config="LlamaConfig", extra=dict(rope_theta=10000.0)),
    "mistral": dict(cls="MistralForCausalLM", config="MistralConfig", extra=dict(sliding_window=5)),
    "qwen2": dict(cls="Qwen2ForCausalLM", config="Qwen2Config", extra=dict(use_sliding_window=False)),
    "qwen3": dict(cls="Qwen3ForCausalLM", config="Qwen3Config", extra=dict(head_dim=24)),
    "phi3": dict(cls="Phi3ForCausalLM", config="Phi3Config", extra=dict(sliding_window=7, pad_token_id=0)),
    "gemma2": dict(cls="Gemma2ForCausalLM", config="Gemma2Config",
                   extra=dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                              final_logit_softcapping=3.0, attn_implementation="eager")),
}


def write_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = byte_level_vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split()) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": None}))
    return len(tokens)


def tiny_hf(kind: str, folder, tie: bool, shards: bool = False):
    import transformers

    spec = FAMILIES[kind]
    vocab = write_tokenizer(folder)
    config = getattr(transformers, spec["config"])(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        **spec["extra"])
    torch.manual_seed(0)
    model = getattr(transformers, spec["cls"])(config).eval()
    with torch.no_grad():  # norms and biases away from their initial 1 and 0, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB" if shards else "5GB")
    return model


@pytest.mark.parametrize("kind,tie", [("llama", False), ("mistral", True), ("qwen2", True), ("qwen3", False),
                                      ("phi3", False), ("gemma2", True)])
def test_hf_folder_matches_transformers(kind, tie, tmp_path):
    folder = tmp_path / kind
    folder.mkdir()
    ref = tiny_hf(kind, folder, tie, shards=kind == "llama")
    if kind == "llama":
        assert (folder / "model.safetensors.index.json").exists()  # sharded
    loaded = store.load_checkpoint(store.resolve(str(folder)), "fp32")
    ids = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = loaded.model(ids)
    assert (got - want).abs().max().item() < 1e-4
    cfg = loaded.config
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.qk_norm == (kind == "qwen3")
    assert cfg.tie_embeddings == tie and cfg.sliding_window == {"mistral": 5, "phi3": 7, "gemma2": 6}.get(kind)


def test_hf_folder_generates_through_the_default_path(tmp_path):
    from llmos.llm import LLM

    folder = tmp_path / "qwen3"
    folder.mkdir()
    tiny_hf("qwen3", folder, tie=True)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 1]}))
    llm = LLM.load(str(folder))  # auto precision: float weights, fp16-packed
    assert llm.loaded.precision == "fp16"
    assert llm.loaded.meta["tokenizer"]["stop_tokens"] == ["<|im_end|>", "<|im_start|>"]
    result = llm.generate("the cat", llm.sampling(temperature=0, max_tokens=6))
    assert 1 <= len(result.completions[0].token_ids) <= 6


def test_unsupported_hf_models_are_one_line_errors(tmp_path):
    folder = tmp_path / "phi"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(store.ModelError, match="model_type 'gpt_neox' is not supported; supported: llama, mistral"):
        store.resolve(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(store.ModelError, match="does not describe a llama model.*num_attention_heads"):
        store.resolve(str(folder))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    tiny_hf("llama", pickled, tie=True)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")  # as old checkpoints ship
    with pytest.raises(store.ModelError, match="no model.safetensors.*.bin weights are not read"):
        store.resolve(str(pickled))
    assert not list(store.models_dir().glob("hf-*")) or all((p / "config.json").exists()
                                                             for p in store.models_dir().glob("hf-*"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_of_each_architecture_matches_transformers(arch, tmp_path):
    """The same tiny GGUF loaded by transformers (its own GGUF reader) and by LLMOS, in float32:
    llama's q/k row permutation undone, Qwen's left alone, Qwen 2's biases, Qwen 3's QK-norm."""
    import logging

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from helpers import write_tiny_gguf

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # transformers' GGUF reader takes Qwen 3's head size from its own default (128), not the file
    size = dict(d_model=512, n_head=4) if arch == "qwen3" else {}
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch=arch, seed=5, quantize_embeddings=False, **size)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ours = store.load_checkpoint(store.resolve(str(path)), "fp32")
    ids = torch.randint(0, ours.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ref(ids).logits, ours.model(ids)
    assert (got - want).abs().max().item() < 1e-4
    assert ours.config.qkv_bias == (arch == "qwen2") and ours.config.qk_norm == (arch == "qwen3")
    listed = {r["path"]: r for r in store.list_models()}[str(ours.path)]
    assert listed["architecture"] == arch


def test_quantized_qwen2_gguf_keeps_its_biases(tmp_path):
    from helpers import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2", seed=6, layer_types={"*": "Q8_0"})
    folder = store.resolve(str(path))
    q, exact = store.load_checkpoint(folder), store.load_checkpoint(folder, "fp32")
    assert q.precision == "quantized" and q.model.blocks[0].attn.wqkv.bias is not None
    ids = torch.tensor([list(range(3, 20))])
    with torch.inference_mode():
        a, b = q.model(ids[:, :8]), exact.model(ids[:, :8])
    assert torch.allclose(a, b, atol=1e-3 * b.abs().max().item())
