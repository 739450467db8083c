"""`llmos prepare`: reading, cleaning, deduplication, splitting, tokenizers, shards; and the
n-gram baseline."""

import json

import numpy as np
import pytest

from conftest import REPO
from llmos.data.clean import clean_text
from llmos.data.prepare import PrepareConfig, PrepareError, prepare
from llmos.train.ngram import KneserNey

SHAKESPEARE = REPO / "benchmarks" / "data" / "tinyshakespeare.txt"


def corpus(tmp_path):
    d = tmp_path / "corpus"
    (d / "poems").mkdir(parents=True)
    (d / "poems" / "a.txt").write_text("The sea at night\nis a black mirror.\n")
    (d / "poems" / "b.md").write_text("# Notes\r\n\r\n\x1b[31mred\x1b[0m text\x07 here   \n\n\n\nend")
    (d / "poems" / "dup.txt").write_text("the sea at  night\nIS A BLACK MIRROR.")  # exact duplicate modulo case/space
    base = "A long paragraph about lighthouses, keepers, storms and the letters they write each winter. " * 6
    (d / "poems" / "near1.txt").write_text(base + "First ending.")
    (d / "poems" / "near2.txt").write_text(base + "Second ending!")  # near duplicate
    (d / "fortunes.txt").write_text("one fortune\n%\ntwo fortune\n%\n\n%\nthree fortune\n")
    (d / "notes.jsonl").write_text(
        json.dumps({"text": "A note in JSON.", "author": "me"}) + "\n" + "not json\n" + json.dumps({"title": "x"}) + "\n"
    )
    (d / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    (d / "empty.txt").write_text("   \n")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    return d


def test_clean_text():
    assert clean_text("a\x1b[1;31mb\x1b[0m\x00c\r\nd  \n\n\n\ne\u00a0f") == "abc\nd\n\ne f"
    assert clean_text("e\u0301") == "\u00e9"  # NFC
    assert clean_text("The cat and a dog", __import__("llmos.data.clean", fromlist=["CleanOptions"]).CleanOptions(lowercase=True)) == "the cat and a dog"


def test_prepare_report_and_shards(tmp_path):
    d = corpus(tmp_path)
    out = tmp_path / "ds"
    report = prepare(PrepareConfig([str(d / "poems"), str(d / "*.txt"), str(d / "notes.jsonl")], str(out),
                                   separator="%", val_fraction=0.2))
    skipped = {s["file"].split("/")[-1]: s["reason"] for s in report["skipped"]}
    assert "binary" in skipped["binary.txt"]
    assert skipped["empty.txt"] == "empty"
    assert "UTF-8" in skipped["latin1.txt"]
    assert "invalid JSON" in skipped["notes.jsonl:2"] and "'text'" in skipped["notes.jsonl:3"]
    assert report["exact_duplicates_removed"] == 1
    assert report["near_duplicates_removed"] == 1
    # a.txt, b.md, near1, 3 fortunes, 1 json note
    assert report["documents_kept"] == 7
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16"
    ids = np.memmap(out / meta["train"][0]["file"], dtype=np.uint16, mode="r")
    assert len(ids) == report["train_tokens"] > 0
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    val = np.memmap(out / meta["val"][0]["file"], dtype=np.uint16, mode="r")
    text = tok.decode(ids.tolist() + val.tolist(), skip_special_tokens=False)
    assert "\x1b" not in text and "\x07" not in text and "red text here" in text
    assert "<|endoftext|>" in text  # documents are separated
    assert json.loads((out / "report.json").read_text()) == report


def test_split_is_by_document_and_seeded(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    rng = np.random.default_rng(0)
    words = "sea salt wind lamp keeper letter storm tide stone gull rope night dawn bread snow".split()
    for i in range(30):
        (d / f"{i}.txt").write_text(" ".join(rng.choice(words, 40 + i)))
    a = prepare(PrepareConfig([str(d)], str(tmp_path / "a"), seed=1))
    prepare(PrepareConfig([str(d)], str(tmp_path / "b"), seed=1))
    prepare(PrepareConfig([str(d)], str(tmp_path / "c"), seed=2))
    assert a["val_documents"] >= 2 and a["train_documents"] + a["val_documents"] == 30
    va = (tmp_path / "a" / "val_000.bin").read_bytes()
    assert va == (tmp_path / "b" / "val_000.bin").read_bytes()
    assert va != (tmp_path / "c" / "val_000.bin").read_bytes()


def test_single_document_is_split_at_its_tail(tmp_path):
    (tmp_path / "one.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    r = prepare(PrepareConfig([str(tmp_path / "one.txt")], str(tmp_path / "ds"), val_fraction=0.1))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "ds" / "tokenizer.json"))
    val = tok.decode(np.fromfile(tmp_path / "ds" / "val_000.bin", dtype=np.uint16).tolist())
    assert val.startswith("line 90") and r["val_documents"] == 1


def test_bpe_and_model_tokenizers(tmp_path, tiny_dir):
    src = tmp_path / "t.txt"
    src.write_text(SHAKESPEARE.read_text()[:20000])
    r = prepare(PrepareConfig([str(src)], str(tmp_path / "bpe"), tokenizer="bpe", vocab_size=400))
    assert r["vocab_size"] == 400
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "bpe" / "tokenizer.json"))
    assert tok.decode(tok.encode("To be, or not to be: 你好").ids) == "To be, or not to be: 你好"
    r = prepare(PrepareConfig([str(src)], str(tmp_path / "model"), tokenizer=str(tiny_dir)))
    meta = json.loads((tmp_path / "model" / "meta.json").read_text())
    assert meta["vocab_size"] == r["vocab_size"] == 267
    assert meta["prompt_style"]["kind"] == "chat"


def test_prepare_errors(tmp_path):
    with pytest.raises(PrepareError, match="no input files"):
        prepare(PrepareConfig([str(tmp_path / "missing.txt")], str(tmp_path / "o")))
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(PrepareError, match="empty"):
        prepare(PrepareConfig([str(tmp_path / "blank.txt")], str(tmp_path / "o")))
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "keep.txt").write_text("precious")
    (tmp_path / "x.txt").write_text("text")
    with pytest.raises(PrepareError, match="not a prepared dataset"):
        prepare(PrepareConfig([str(tmp_path / "x.txt")], str(tmp_path / "o2")))
    assert (tmp_path / "o2" / "keep.txt").read_text() == "precious"


def test_kneser_ney_is_a_distribution():
    rng = np.random.default_rng(0)
    V = 12
    train = rng.integers(0, V, 3000)
    train[::7] = 3  # some structure
    model = KneserNey(3, V).fit(train)
    for context in ([3, 5], [1, 1], [11, 0]):
        probs = [np.exp(model.logprobs(np.array(context + [w]))[-1]) for w in range(V)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-9)
        assert min(probs) > 0


def test_kneser_ney_learns_structure():
    text = ("abcabcabd" * 400).encode()
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64) - 97
    model = KneserNey(3, 4).fit(ids)
    nll, ppl = model.perplexity(ids[:300])
    assert ppl < 1.5  # nearly deterministic text: far below uniform (4)
    assert KneserNey(1, 4).fit(ids).perplexity(ids[:300])[1] > 2.5
