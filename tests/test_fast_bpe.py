"""The fast-loading form of SentencePiece-style BPE tokenizers: the same ids and text as the
`tokenizers` library, on a tokenizer trained here (whose merges cross word boundaries often)
and on Gemma's own."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers

from llmos import fast_bpe
from llmos.fast_bpe import CACHE_NAME, FastBPE
from llmos.tokenizer import Tokenizer as LLMOSTokenizer

SHAKESPEARE = Path(__file__).parents[1] / "benchmarks" / "data" / "tinyshakespeare.txt"
ADDED = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<unused0>", "<unused10>"]
PLAIN_ADDED = ["\n", "\n\n", "\n\n\n", "<td>", "</td>"]  # matched verbatim, but not special


def samples(seed: int, n: int) -> list[str]:
    """Prose, verse, Chinese, emoji and control characters, runs of spaces and newlines,
    added tokens glued to words, and random strings from an alphabet built to trip cuts."""
    text = SHAKESPEARE.read_text()
    out = [text[i : i + 700] for i in range(0, 21000, 700)]
    out += ["床前明月光，疑是地上霜。\n举头望明月，低头思故乡。", "Hello  world   x", "  lead", "trail  ",
            "> </a> x>  </b", "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n", "<unused10><unused0>1",
            "emoji 😀🎉 and \u0000 ctrl \t\ttabs\n\n\n\nnew", "a" * 80, "\u2581 already marked", "𝔘𝔫𝔦 ñ ß", ""]
    rng = random.Random(seed)
    alphabet = " \n\t<>/tdheo,.é漢字😀\u2581"
    out += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))) for _ in range(n)]
    return out


def check_same(folder: Path, hf: Tokenizer, seed: int, n: int):
    fast = FastBPE.load(folder)
    assert fast is not None
    for text in samples(seed, n):
        assert fast.encode(text) == hf.encode(text, add_special_tokens=False).ids, repr(text)
    rng = random.Random(seed)
    size = hf.get_vocab_size(with_added_tokens=True)
    for _ in range(n):  # any ids, byte tokens that do not make valid UTF-8 among them
        ids = [rng.randrange(size) if rng.random() < 0.5 else rng.randrange(300) for _ in range(rng.randint(1, 10))]
        for skip in (True, False):
            assert fast.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), ids
    assert fast.size == size
    for token in ADDED[:3]:
        assert fast.token_to_id(token) == hf.token_to_id(token)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, monkeypatch_module) -> tuple[Path, Tokenizer]:
    """A Gemma-shaped tokenizer trained on Shakespeare: spaces become "▁" and nothing splits
    words first, so many merges span them ("e▁t"...), which the fast form must respect."""
    folder = tmp_path_factory.mktemp("spbpe")
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", *ADDED, *byte_tokens],
                                  show_progress=False)
    tok.train_from_iterator(SHAKESPEARE.read_text()[:200000].splitlines(keepends=True), trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in PLAIN_ADDED])
    tok.save(str(folder / "tokenizer.json"))
    monkeypatch_module.setattr(fast_bpe, "MIN_SIZE", 0)  # it is small; the fast form still applies
    return folder, Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_trained_tokenizer_matches_tokenizers(trained):
    folder, hf = trained
    spec = json.loads((folder / "tokenizer.json").read_text())
    assert fast_bpe.qualifies(spec)
    spanning = [t for t in spec["model"]["vocab"] if "\u2581" in t.lstrip("\u2581")]
    assert len(spanning) > 20  # the case the cuts must handle is common here
    check_same(folder, hf, seed=1, n=1500)


def test_cache_is_rebuilt_when_the_tokenizer_changes(trained):
    folder, hf = trained
    FastBPE.load(folder)
    cache = folder / CACHE_NAME
    built = cache.stat().st_mtime_ns
    assert FastBPE.load(folder) is not None and cache.stat().st_mtime_ns == built  # reused
    os.utime(folder / "tokenizer.json", ns=(built + 10**9, built + 10**9))
    assert FastBPE.load(folder) is not None and cache.stat().st_mtime_ns != built  # stale: rebuilt
    cache.write_bytes(b"garbage")  # a damaged cache is rebuilt, never trusted
    assert FastBPE.load(folder).encode("To be") == hf.encode("To be", add_special_tokens=False).ids


def test_other_tokenizers_keep_using_tokenizers(tmp_path, monkeypatch):
    from helpers import byte_level_vocab

    monkeypatch.setattr(fast_bpe, "MIN_SIZE", 0)
    from tokenizers import pre_tokenizers

    tokens, merges = byte_level_vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split()) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert FastBPE.load(tmp_path) is None
    assert FastBPE.load(tmp_path) is None  # the verdict is remembered beside it
    (tmp_path / "config.json").write_text(json.dumps({"tokenizer": {"eos_token": "<|im_end|>"}}))
    loaded = LLMOSTokenizer.from_dir(tmp_path)
    assert loaded.fast is None and loaded.decode(loaded.encode("the cat")) == "the cat"


def test_gemma_tokenizer_matches_tokenizers(gemma3_dir):
    """Gemma 3's own tokenizer (262,144 tokens, 6,384 added ones): the store converts it with its
    fast form, which the checkpoint's Tokenizer then uses."""
    assert (gemma3_dir / CACHE_NAME).is_file()
    hf = Tokenizer.from_file(str(gemma3_dir / "tokenizer.json"))
    check_same(gemma3_dir, hf, seed=2, n=400)
    tok = LLMOSTokenizer.from_dir(gemma3_dir)
    assert tok.fast is not None and tok._hf is None
    assert tok.stop_ids and tok.bos_id == hf.token_to_id("<bos>")
    assert tok.hf.get_vocab_size() == tok.vocab_size  # the `tokenizers` object, parsed on demand


def test_gemma_token_table_is_the_same_from_either_form(gemma3_dir):
    """Constrained writing (forms) reads every token's bytes; the fast form gives the same."""
    from llmos.writing.tokens import TokenTable

    fast = LLMOSTokenizer.from_dir(gemma3_dir)
    slow = LLMOSTokenizer(Tokenizer.from_file(str(gemma3_dir / "tokenizer.json")), eos_token="<eos>")
    a, b = TokenTable(fast), TokenTable(slow)
    assert a.size == b.size and a.pieces == b.pieces
