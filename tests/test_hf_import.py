"""Hugging Face folders of the llama family (Llama, Mistral, Qwen 2, Qwen 3): tiny random models
written by transformers itself, converted into the store, and compared with transformers'
logits in float32."""

from __future__ import annotations

import json
import math

import numpy as np
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
    "gemma3_text": dict(cls="Gemma3ForCausalLM", config="Gemma3TextConfig",
                        extra=dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                    "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                       "rope_theta": 1000000.0}})),
    "gpt2": dict(cls="GPT2LMHeadModel", config="GPT2Config", extra={}),
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


def tiny_hf(kind: str, folder, tie: bool, shards: bool = False, extra: dict | None = None):
    import transformers

    spec = FAMILIES[kind]
    vocab = write_tokenizer(folder)
    if kind == "gpt2":  # its own names; no grouped-query attention
        sizes = dict(n_embd=64, n_inner=96, n_layer=3, n_head=4, n_positions=128, layer_norm_epsilon=1e-5,
                     bos_token_id=None, eos_token_id=None)
    else:
        sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
    config = getattr(transformers, spec["config"])(
        vocab_size=vocab, tie_word_embeddings=tie, **{**sizes, **spec["extra"], **(extra or {})})
    torch.manual_seed(0)
    model = getattr(transformers, spec["cls"])(config).eval()
    with torch.no_grad():  # norms and biases away from their initial 1 and 0, so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB" if shards else "5GB")
    return model


@pytest.mark.parametrize("kind,tie", [("llama", False), ("mistral", True), ("qwen2", True), ("qwen3", False),
                                      ("phi3", False), ("gemma2", True), ("gemma3_text", True), ("gpt2", True),
                                      ("gpt2", False)])
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
    assert cfg.qkv_bias == (kind in ("qwen2", "gpt2")) and cfg.qk_norm == (kind in ("qwen3", "gemma3_text"))
    assert cfg.tie_embeddings == tie and cfg.sliding_window == {"mistral": 5, "phi3": 7, "gemma2": 6, "gemma3_text": 4}.get(kind)


SCALINGS = {  # model type, rope_scaling as the files on the Hub write it
    "linear": ("llama", {"rope_type": "linear", "factor": 4.0}),
    "llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32}),
    "yarn": ("qwen2", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "longrope": ("phi3", {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8],
                          "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0],
                          "original_max_position_embeddings": 32}),
    "dynamic": ("llama", {"rope_type": "dynamic", "factor": 2.0}),  # its original context: max_position_embeddings
}


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_rope_scaling_matches_transformers(scaling, tmp_path):
    """Stretched RoPE as each family's config says, in float32 against transformers: Llama 3.1's
    smoothed factors, YaRN's ramp and attention factor, LongRoPE's short factors (the prompt stays
    within the original context, where both use them), plain linear interpolation."""
    kind, rope = SCALINGS[scaling]
    folder = tmp_path / scaling
    folder.mkdir()
    extra = {"rope_parameters": {**rope, "rope_theta": 10000.0}}
    if scaling == "longrope":
        extra["original_max_position_embeddings"] = 32
    if scaling == "dynamic":
        extra["max_position_embeddings"] = 32
    ref = tiny_hf(kind, folder, tie=True, extra=extra)
    loaded = store.load_checkpoint(store.resolve(str(folder)), "fp32")
    assert loaded.config.rope_scaling["type"] == scaling
    length = 30 if scaling == "longrope" else 60  # past the original 32 positions where it matters
    ids = torch.randint(0, ref.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, got = ref(ids).logits, loaded.model(ids)
        loaded.model.config.rope_scaling, loaded.model._rope_cache = None, {}
        plain = loaded.model(ids)
    assert (got - want).abs().max().item() < 1e-4
    assert (plain - want).abs().max().item() > 1e-3  # the scaling changed something
    if scaling in ("linear", "llama3"):  # `llmos export --format hf` writes the scaling back
        from transformers import AutoModelForCausalLM

        from llmos.weights.export import export

        out = export(loaded.path, tmp_path / "exported")
        again = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            assert (again(ids).logits - want).abs().max().item() < 1e-4


def test_dynamic_ntk_decodes_past_the_original_context_as_transformers_does(tmp_path):
    """Dynamic NTK changes the frequencies with the sequence's length: decoding with a cache,
    each new token is rotated for the length so far and what is cached keeps its rotation, as
    in transformers. Step by step from a 28-token prompt to 44 positions (the original context
    is 32). (The fused C++ step against the module path: test_quantized.)"""
    from transformers import DynamicCache

    from llmos.model import KVCache

    folder = tmp_path / "dyn"
    folder.mkdir()
    ref = tiny_hf("llama", folder, tie=False, extra={"rope_parameters": {**SCALINGS["dynamic"][1], "rope_theta": 10000.0},
                                                     "max_position_embeddings": 32})
    model = store.load_checkpoint(store.resolve(str(folder)), "fp32").model
    assert model.config.max_seq_len == 64
    ids = torch.randint(0, ref.config.vocab_size, (1, 44), generator=torch.Generator().manual_seed(5))
    cache, past = KVCache.allocate(model.config, 1, 64), DynamicCache(config=ref.config)
    steps = []
    with torch.no_grad():
        ref(ids[:, :28], past_key_values=past, use_cache=True)
        model(ids[:, :28], cache=cache, kv_len=28)
        for p in range(28, 44):
            want = ref(ids[:, p:p + 1], past_key_values=past, use_cache=True).logits[:, -1]
            steps.append((model(ids[:, p:p + 1], cache=cache, kv_len=p + 1)[:, -1] - want).abs().max().item())
        whole = model(ids)[:, -1]  # one forward of all 44: every position at the 44-length frequencies
    assert max(steps) < 1e-4, steps
    assert (whole - want).abs().max().item() > 3e-4  # 10x the steps' error: the cached rotations are what matched


def test_rope_scaling_old_style_keys_and_unsupported_kinds(tmp_path):
    from llmos.weights.hf import HFError, config_from_hf

    base = dict(model_type="llama", vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=4096)
    cfg = config_from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})  # Llama 3.2's config.json
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 32.0
    yarn = config_from_hf({**base, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 1024}})
    assert yarn.rope_scaling["attention_factor"] == pytest.approx(0.1 * math.log(4.0) + 1)
    gemma3 = config_from_hf({**base, "model_type": "gemma3_text", "num_hidden_layers": 12, "num_key_value_heads": 1,
                             "head_dim": 16, "sliding_window": 512, "query_pre_attn_scalar": 256,
                             "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                             "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window_pattern": 6})
    assert gemma3.layer_types == (["sliding"] * 5 + ["global"]) * 2  # Gemma 3 4B's config.json, shrunk
    assert (gemma3.rope_theta, gemma3.rope_local_theta, gemma3.rope_scaling) == (1e6, 1e4, {"type": "linear", "factor": 8.0})
    dynamic = config_from_hf({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert dynamic.rope_scaling == {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4096}
    assert dynamic.max_seq_len == 8192  # the stretched context is what the engine allows
    with pytest.raises(HFError, match="rope_scaling 'ntk' is not supported; supported: linear, llama3, yarn, longrope, dynamic"):
        config_from_hf({**base, "rope_scaling": {"type": "ntk", "factor": 2.0}})
    with pytest.raises(HFError, match="rope_scaling 'llama3' lacks low_freq_factor"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gpt2"])
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
    if arch == "gpt2":  # transformers' reader sizes GPT-2's MLP and positions from its defaults
        size = dict(d_ff=256, context=1024)
    if arch == "gemma2":  # and scales Gemma 2's queries by its default 256**-0.5 (llama.cpp: head_dim)
        size = dict(head_dim=256, window=4)
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch=arch, seed=5, quantize_embeddings=False, **size)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ours = store.load_checkpoint(store.resolve(str(path)), "fp32")
    ids = torch.randint(0, ours.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    if arch == "gemma2":
        assert ours.config.layer_types[:2] == ["sliding", "global"] and ours.config.sliding_window == 4
    with torch.no_grad():
        want, got = ref(ids).logits, ours.model(ids)
    assert (got - want).abs().max().item() < 1e-4
    assert ours.config.qkv_bias == (arch in ("qwen2", "gpt2")) and ours.config.qk_norm == (arch == "qwen3")
    listed = {r["path"]: r for r in store.list_models()}[str(ours.path)]
    assert listed["architecture"] == arch


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_quantized_gguf_keeps_its_biases(arch, tmp_path):
    from helpers import write_tiny_gguf
    from llmos.engine.generate import generate

    path = write_tiny_gguf(tmp_path / "q.gguf", arch=arch, seed=6, layer_types={"*": "Q8_0"})
    folder = store.resolve(str(path))
    q, exact = store.load_checkpoint(folder), store.load_checkpoint(folder, "fp32")
    assert q.precision == "quantized" and q.model.blocks[0].attn.wqkv.bias is not None
    if arch == "gpt2":
        assert q.model.blocks[0].mlp.w2.bias is not None and q.model.blocks[0].attn.wo.bias is not None
    ids = torch.tensor([list(range(3, 20))])
    with torch.inference_mode():
        a, b = q.model(ids[:, :8]), exact.model(ids[:, :8])
    assert torch.allclose(a, b, atol=1e-3 * b.abs().max().item())
    # Cached decoding (one token at a time, positions from the cache) picks what a full pass does.
    from llmos.engine.sampling import SamplingParams

    out = generate(exact.model, list(range(3, 11)), SamplingParams(temperature=0, max_tokens=6))
    tokens = list(range(3, 11))
    with torch.inference_mode():
        for _ in range(6):
            tokens.append(int(exact.model(torch.tensor([tokens]))[0, -1].argmax()))
    assert out[0].output == tokens[8:]


def test_gguf_rope_scaling_llama3_factors_and_linear(tmp_path):
    """Llama 3.1 GGUFs carry their stretched RoPE as rope_freqs (one divisor per frequency, as
    llama.cpp's converter derives them); that must compute what the llama3 formula does. A
    linear factor in the metadata becomes the same linear scaling as a config.json's."""
    from helpers import write_tiny_gguf

    hd, context, factor, low, high = 16, 32, 8.0, 1.0, 4.0
    divisors = []
    for freq in 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd):
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            divisors.append(1.0)
        elif wavelen > context / low:
            divisors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    plain = store.load_checkpoint(store.resolve(str(write_tiny_gguf(tmp_path / "p.gguf", seed=7))), "fp32")
    freqs = store.load_checkpoint(store.resolve(str(write_tiny_gguf(tmp_path / "f.gguf", seed=7, rope_freqs=np.array(divisors)))), "fp32")
    linear = store.load_checkpoint(store.resolve(str(write_tiny_gguf(tmp_path / "l.gguf", seed=7, rope_scaling=("linear", 4.0)))), "fp32")
    assert freqs.config.rope_scaling["type"] == "factors"
    assert linear.config.rope_scaling == {"type": "linear", "factor": 4.0}
    ids = torch.randint(0, plain.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        unscaled = plain.model(ids)
        got_f, got_l = freqs.model(ids), linear.model(ids)
        plain.model.config.rope_scaling, plain.model._rope_cache = {
            "type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": context}, {}
        want_f = plain.model(ids)
        plain.model.config.rope_scaling, plain.model._rope_cache = {"type": "linear", "factor": 4.0}, {}
        want_l = plain.model(ids)
    assert (got_f - want_f).abs().max().item() < 1e-4 and (got_l - want_l).abs().max().item() < 1e-4
    assert (got_f - unscaled).abs().max().item() > 1e-3


def test_phi3_gguf_longrope(tmp_path):
    """Phi-3 128k GGUFs carry LongRoPE as two factor tensors and the original context; the
    attention factor, absent here, is derived as the reference code does."""
    from helpers import write_tiny_gguf

    long, short = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0], [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8]
    path = write_tiny_gguf(tmp_path / "phi.gguf", arch="phi3", seed=9, context=128, longrope=(long, short, 32))
    plain = write_tiny_gguf(tmp_path / "plain.gguf", arch="phi3", seed=9, context=128)
    ours, ref = (store.load_checkpoint(store.resolve(str(p)), "fp32") for p in (path, plain))
    want = {"type": "longrope", "long_factor": pytest.approx(long), "short_factor": pytest.approx(short), "original_max_position_embeddings": 32,
            "attention_factor": pytest.approx(math.sqrt(1 + math.log(4) / math.log(32)))}
    assert ours.config.rope_scaling == want
    ids = torch.randint(0, ours.config.vocab_size, (1, 50), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = ours.model(ids)
        ref.model.config.rope_scaling, ref.model._rope_cache = dict(ours.config.rope_scaling), {}
        assert (got - ref.model(ids)).abs().max().item() < 1e-5


def test_gguf_yarn_is_the_config_json_yarn(tmp_path):
    """A GGUF's YaRN (type, factor, original context: what llama.cpp's converter writes for a
    Qwen2.5 long-context model) computes what the same YaRN in a config.json does; llama.cpp's
    yarn_attn_factor multiplies the derived magnitude, and its betas replace the defaults."""
    from helpers import write_tiny_gguf

    from llmos.weights.hf import rope_from_hf

    yarn = write_tiny_gguf(tmp_path / "y.gguf", seed=8, context=128, rope_scaling=("yarn", 4.0),
                           meta={"rope.scaling.original_context_length": 32})
    plain = write_tiny_gguf(tmp_path / "p.gguf", seed=8, context=128)
    ours, ref = (store.load_checkpoint(store.resolve(str(p)), "fp32") for p in (yarn, plain))
    _, want = rope_from_hf({"max_position_embeddings": 128, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}})
    assert ours.config.rope_scaling == pytest.approx(want)
    ids = torch.randint(0, ours.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got, unscaled = ours.model(ids), ref.model(ids)
        ref.model.config.rope_scaling, ref.model._rope_cache = dict(want), {}
        assert (got - ref.model(ids)).abs().max().item() < 1e-5
    assert (got - unscaled).abs().max().item() > 1e-3

    tuned = write_tiny_gguf(tmp_path / "t.gguf", seed=8, context=128, rope_scaling=("yarn", 4.0), meta={
        "rope.scaling.original_context_length": 32, "rope.scaling.yarn_attn_factor": 0.5,
        "rope.scaling.yarn_beta_fast": 16.0, "rope.scaling.yarn_beta_slow": 2.0})
    got = store.load_checkpoint(store.resolve(str(tuned)), "fp32").config.rope_scaling
    assert got["attention_factor"] == pytest.approx(0.5 * want["attention_factor"])
    assert (got["beta_fast"], got["beta_slow"]) == (16.0, 2.0)


@pytest.mark.parametrize("case,message", [
    ({"rope_scaling": ("longrope", 4.0)}, "llama.rope.scaling.type is 'longrope'; supported: linear, yarn"),
    ({"rope_scaling": ("yarn", 4.0)}, "original_context_length is None; YaRN needs the pretraining context"),
    ({"rope_scaling": ("yarn", 4.0), "meta": {"rope.scaling.original_context_length": 4096}},
     "original_context_length is 4096; YaRN needs"),
    ({"rope_scaling": ("yarn", 4.0), "meta": {"rope.scaling.original_context_length": 32,
                                              "rope.scaling.yarn_log_multiplier": 0.1}},
     "yarn_log_multiplier is 0.1"),
])
def test_unsupported_gguf_rope_scaling_is_a_one_line_error(case, message, tmp_path):
    from helpers import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "odd.gguf", seed=8, **case)
    with pytest.raises(store.ModelError, match=message) as err:
        store.resolve(str(path))
    assert "\n" not in str(err.value)
    assert not [p for p in store.models_dir().iterdir() if p.name.startswith("gguf-odd")]  # nothing half-built left


def tiny_gemma3_multimodal(folder):
    """Gemma 3's image-and-text model (Gemma3ForConditionalGeneration) with a tiny SigLIP tower,
    written by transformers; only its text model is converted."""
    import transformers

    vocab = write_tokenizer(folder)
    text = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **FAMILIES["gemma3_text"]["extra"])
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=1, image_token_index=vocab + 10)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    return model


def test_gemma3_multimodal_folder_runs_its_text_model(tmp_path):
    """A multimodal Gemma 3 folder (model_type gemma3, text_config inside, a vision tower beside
    the text model) converts its text model: logits equal transformers' on text, under both
    tensor layouts transformers has saved; the vision tensors are left out, and a chat template
    kept in chat_template.jinja is found."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "gemma3-mm"
    folder.mkdir()
    ref = tiny_gemma3_multimodal(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gemma3"
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<start_of_turn>{{ m.content }}{% endfor %}")
    loaded = store.load_checkpoint(store.resolve(str(folder)), "fp32")
    ids = torch.randint(0, ref.config.text_config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = loaded.model(ids)
    assert (got - want).abs().max().item() < 1e-4
    assert loaded.config.arch == "gemma3" and loaded.config.qk_norm and loaded.config.sliding_window == 4
    meta = json.loads((loaded.path / "config.json").read_text())
    assert meta["prompt_style"]["chat_template"].startswith("{% for m in messages %}")
    names = load_file(str(loaded.path / "model.safetensors")).keys()
    assert not [n for n in names if "vision" in n or "projector" in n]

    # The layout of files saved before transformers 4.52: language_model.model.*, vision_tower.*
    old = tmp_path / "gemma3-mm-old"
    old.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (old / f).write_bytes((folder / f).read_bytes())
    renamed = {}
    for name, w in load_file(str(folder / "model.safetensors")).items():
        if name.startswith("model.language_model."):
            name = "language_model.model." + name.removeprefix("model.language_model.")
        elif name.startswith("model."):
            name = name.removeprefix("model.")
        renamed[name] = w
    assert any(n.startswith("vision_tower.") for n in renamed)
    save_file(renamed, str(old / "model.safetensors"))
    again = store.load_checkpoint(store.resolve(str(old)), "fp32")
    with torch.no_grad():
        assert (again.model(ids) - want).abs().max().item() < 1e-4


def test_gemma3_hub_config_takes_transformers_defaults():
    """google/gemma-3-4b-it's config.json gives its text_config only where it differs from
    Gemma3TextConfig's defaults (no head counts, head_dim or vocabulary size): the config read
    here is the one transformers resolves from the same file."""
    import transformers

    from llmos.weights.hf import config_from_hf

    hub = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "mm_tokens_per_image": 256,
           "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                             "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                             "patch_size": 14, "vision_use_head": False}}
    ours = config_from_hf(hub)
    text = transformers.Gemma3Config(**{k: v for k, v in hub.items() if k != "architectures"}).text_config
    assert (ours.vocab_size, ours.n_layer, ours.n_head, ours.n_kv_head, ours.d_model, ours.head_dim, ours.d_ff) == (
        text.vocab_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
        text.hidden_size, text.head_dim, text.intermediate_size)
    assert ours.attn_scale == pytest.approx(text.query_pre_attn_scalar ** -0.5)
    assert ours.layer_types == ["sliding" if k == "sliding_attention" else "global" for k in text.layer_types]
    assert ours.sliding_window == text.sliding_window == 1024 and ours.tie_embeddings
    assert ours.rope_scaling == {"type": "linear", "factor": 8.0}
    assert (ours.rope_theta, ours.rope_local_theta) == (1_000_000.0, 10_000.0)
