"""The Transformer itself: configs, the KV cache against full forward passes, masks."""

import pytest
import torch

from llmos.model import PRESETS, KVCache, ModelConfig, Transformer

LLAMA = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128)
GEMMA = dict(arch="gemma3", vocab_size=97, n_layer=3, n_head=4, n_kv_head=1, d_model=64, head_dim=32,
             max_seq_len=128, sliding_window=8, global_every=3, rope_local_theta=10000.0)
GEMMA2 = dict(arch="gemma2", vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64, head_dim=16,
              max_seq_len=128, sliding_window=8, layer_types=["sliding", "global"], attn_softcap=1.5, final_softcap=4.0)
GPT2 = dict(arch="gpt2", vocab_size=97, n_layer=2, n_head=4, d_model=64, max_seq_len=128)
QWEN = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128, qkv_bias=True, qk_norm=True)


def tiny(kwargs, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**kwargs)).eval()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build(name):
    cfg = ModelConfig.from_name(name)
    assert cfg.head_dim * cfg.n_head >= cfg.d_model or cfg.arch == "gemma3"
    assert len(cfg.layer_types) == cfg.n_layer


def test_gemma_layer_pattern():
    cfg = ModelConfig.from_name("gemma3-270m")
    assert cfg.layer_types.count("global") == 3
    assert [i for i, t in enumerate(cfg.layer_types) if t == "global"] == [5, 11, 17]


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=100, n_head=3), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(arch="gpt9"), "unknown architecture"),
    (dict(dropout=1.5), "dropout"),
    (dict(n_layer=0), "n_layer"),
])
def test_bad_config_says_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="tiny"):
        ModelConfig.from_name("huge")


@pytest.mark.parametrize("kwargs", [LLAMA, GEMMA, GEMMA2, QWEN, GPT2], ids=["llama", "gemma3", "gemma2-softcap", "qwen", "gpt2"])
def test_incremental_decoding_matches_full_forward(kwargs):
    m = tiny(kwargs)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache.allocate(m.config, 2, 64)
        steps = [m(ids[:, :10], cache=cache, kv_len=10)]
        for t in range(10, 40):
            steps.append(m(ids[:, t : t + 1], cache=cache, kv_len=t + 1))
    assert torch.allclose(full, torch.cat(steps, dim=1), atol=1e-5)


@pytest.mark.parametrize("kwargs", [LLAMA, GEMMA, GEMMA2, GPT2], ids=["llama", "gemma3", "gemma2-softcap", "gpt2"])
def test_rows_at_different_positions(kwargs):
    """Continuous batching: each row of one batch at its own position gives the logits that row
    gets when run alone."""
    m = tiny(kwargs)
    a, b = torch.randint(0, 97, (1, 30)), torch.randint(0, 97, (1, 17))
    with torch.no_grad():
        ref_a, ref_b = m(a), m(b)
        cache = KVCache.allocate(m.config, 2, 64)
        for row, seq in ((0, a), (1, b)):
            single = KVCache.allocate(m.config, 1, 64)
            T = seq.shape[1] - 1  # prefill through the per-row position path
            pre = m(seq[:, :-1], input_pos=torch.arange(T)[None], cache=single, kv_len=T)
            assert torch.allclose(pre[0], m(seq[:, :-1])[0], atol=1e-5)
            for layer in range(m.config.n_layer):
                cache.k[layer][row] = single.k[layer][0]
                cache.v[layer][row] = single.v[layer][0]
        pos = torch.tensor([[29], [16]])
        out = m(torch.cat([a[:, -1:], b[:, -1:]]), input_pos=pos, cache=cache, kv_len=30)
    assert torch.allclose(out[0, 0], ref_a[0, -1], atol=1e-5)
    assert torch.allclose(out[1, 0], ref_b[0, -1], atol=1e-5)


def test_sliding_window_limits_attention():
    """A token further back than the window cannot influence a sliding-only model."""
    kwargs = dict(GEMMA, n_layer=1, global_every=2)  # one layer, and it is a sliding one
    m = tiny(kwargs)
    assert m.config.layer_types == ["sliding"]
    ids = torch.randint(0, 97, (1, 20))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 97
    with torch.no_grad():
        a, b = m(ids), m(changed)
    assert torch.allclose(a[0, 8:], b[0, 8:])  # position 8 no longer sees position 0
    assert not torch.allclose(a[0, 1:8], b[0, 1:8])


def test_bidirectional_config_sees_the_future():
    m = tiny(dict(LLAMA, causal=False))
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 97
    with torch.no_grad():
        assert not torch.allclose(m(ids)[0, 0], m(changed)[0, 0])
    causal = tiny(LLAMA)
    with torch.no_grad():
        assert torch.allclose(causal(ids)[0, 0], causal(changed)[0, 0])


def test_last_only_and_parameter_count():
    m = tiny(LLAMA)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert torch.allclose(m(ids, last_only=True)[0, 0], m(ids)[0, -1], atol=1e-6)
    emb = 97 * 64
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * m.config.d_ff + 2 * 64
    assert m.num_params() == emb + 2 * per_layer + 64


def test_rope_tables_grow_with_the_sequence():
    """RoPE tables cover what the sequences reached (doubling), not the whole context at once;
    decoding across a growth step gives what one full pass does."""
    m = tiny(dict(LLAMA, max_seq_len=3000))
    ids = torch.randint(0, 97, (1, 1030))
    with torch.no_grad():
        cache = KVCache.allocate(m.config, 1, 1100)
        steps = [m(ids[:, :1020], cache=cache, kv_len=1020)]
        assert max(t[0].shape[0] for t in m._rope_cache.values()) == 1024
        for t in range(1020, 1030):
            steps.append(m(ids[:, t : t + 1], cache=cache, kv_len=t + 1))
        assert max(t[0].shape[0] for t in m._rope_cache.values()) == 2048
        full = m(ids)
    assert torch.allclose(full, torch.cat(steps, dim=1), atol=1e-4)
