"""The copying check: the n-gram index, exact verbatim spans mapped back to the original text,
hash collisions that never count as copying, Chinese, finding the index of a run, and `llmos check`."""

import json

import numpy as np
import pytest

from conftest import REPO
from helpers import assert_clean_error, llmos
from llmos.data.copying import (CopyError, CopyIndex, _codepoints, build_index, check_copying, ngram_hashes,
                                normalise, resolve_index)

SHAKESPEARE = (REPO / "benchmarks" / "data" / "tinyshakespeare.txt").read_text()[:40000]
FOX = "The quick brown fox jumps over the lazy dog near the river bank at dawn, while the old miller sleeps."
MILL = "Grain comes down the valley on carts; the wheel turns all night and the flour is white as frost by morning."
# Chinese written for these tests: a river morning, an autumn courtyard.
RIVER = ("春天的早晨，河边的柳树刚刚发芽，老渔夫坐在船头，慢慢地补着一张旧网。远处的山还藏在雾里，只有几只白鹭从水面上飞过。"
         "村子里的孩子们背着书包，沿着石板路跑向学校，笑声一直传到对岸。")
COURTYARD = "秋天来了，院子里的桂花开得正好，奶奶把落下的花瓣收进小竹篮，说要做一罐桂花糖，等过年的时候给孙子们吃。"


def test_normalise_lowercases_and_folds_whitespace_keeping_offsets():
    text = "  Hello\t\tWORLD \n\n foo İx"
    norm, offsets = normalise(text)
    assert norm == "hello world foo İx"
    assert len(offsets) == len(norm)
    for k, ch in enumerate(norm):  # every character stands for the original one at its offset
        original = text[offsets[k]]
        assert (ch == " " and original.isspace()) or ch == original.lower() or ch == original


def test_a_copy_with_other_case_and_whitespace_maps_back_to_the_original_text():
    idx = build_index([("fox.txt", FOX), ("mill.txt", MILL)])
    copied = "THE QUICK   brown\n\nFox jumps over the LAZY dog near the river\tbank at dawn, while the old miller sleeps."
    text = f"Intro text, nothing borrowed.  {copied} And an ending of my own."
    rep = check_copying(text, idx, min_chars=50)
    assert rep.copied and len(rep.spans) == 1
    span = rep.spans[0]
    assert text[span["start"]:span["end"]] == copied
    assert span["source"] == "fox.txt" and span["chars"] == len(FOX)
    assert rep.longest == {**span, "text": copied}
    assert rep.sources == [{"source": "fox.txt", "chars": len(FOX)}]
    assert rep.marked("brackets") == f"Intro text, nothing borrowed.  [[{copied}]] And an ending of my own."
    assert "\x1b[1;31m" in rep.marked("ansi")
    assert rep.marked("html").count("<mark") == 1 and 'title="fox.txt"' in rep.marked("html")
    ngrams = len(normalise(text)[0]) - idx.n + 1
    assert rep.copied_share == pytest.approx((len(FOX) - idx.n + 1) / ngrams)
    assert json.loads(json.dumps(rep.as_dict()))["spans"] == rep.spans


def test_pieces_of_two_sources_are_two_spans_and_short_overlaps_only_the_longest():
    idx = build_index([("fox.txt", FOX), ("mill.txt", MILL)])
    text = FOX[4:70] + MILL[10:80]
    rep = check_copying(text, idx)
    assert [(s["source"], s["start"], s["end"]) for s in rep.spans] == [("fox.txt", 0, 66), ("mill.txt", 66, 136)]
    short = check_copying("My own words, then " + FOX[:34] + " and mine again.", idx)  # "The quick ... over the"
    assert not short.copied and short.spans == [] and short.longest["chars"] == 34
    assert check_copying("Nothing here comes from either source at all.", idx).longest is None
    with pytest.raises(CopyError, match="at least the index's n-gram length"):
        check_copying(FOX, idx, min_chars=10)


def test_hash_collisions_never_count_as_copying():
    idx = build_index([("fox.txt", FOX)])
    text = "A sentence that shares nothing with the source, only made to collide in the index."
    # forge the index: every n-gram of the text "found", pointing at unrelated corpus text
    forged = np.sort(ngram_hashes(_codepoints(normalise(text)[0]), idx.n))
    idx.hashes, idx.positions = forged, np.zeros(len(forged), dtype=np.uint32)
    rep = check_copying(text, idx)
    assert not rep.copied and rep.longest is None and rep.copied_share == 0.0


def test_chinese_is_checked_by_characters():
    idx = build_index([("river.txt", RIVER), ("courtyard.txt", COURTYARD)], n=8)
    copied = "老渔夫坐在船头，慢慢地补着一张旧网。远处的山还藏在雾里，只有几只白鹭从水面上飞过。"
    text = "我记得那一天：" + copied + "后来我再也没有回去过。"
    rep = check_copying(text, idx, min_chars=20)
    assert [(text[s["start"]:s["end"]], s["source"]) for s in rep.spans] == [(copied, "river.txt")]
    assert rep.longest["chars"] == len(copied)
    assert not check_copying("我记得那一天，奶奶在院子里做桂花糖给我们吃。", idx, min_chars=20).copied


def test_an_index_saves_as_plain_arrays_and_loads_the_same(tmp_path):
    idx = build_index([("shake", SHAKESPEARE), ("river", RIVER)], meta={"from": "tests"})
    idx.save(tmp_path / "ix")
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == [
        "hashes.npy", "index.json", "positions.npy", "starts.npy", "text.npy"]
    for f in (tmp_path / "ix").glob("*.npy"):
        np.load(f, allow_pickle=False)  # no object arrays
    loaded = resolve_index(tmp_path / "ix")
    text = "A preface of mine. " + SHAKESPEARE[20000:20300] + RIVER[5:40]
    assert check_copying(text, loaded, 30).as_dict() | {"seconds": 0} == check_copying(text, idx, 30).as_dict() | {"seconds": 0}
    assert [s["source"] for s in check_copying(text, loaded, 30).spans] == ["shake", "river"]
    (tmp_path / "ix" / "index.json").write_text("{}")
    with pytest.raises(CopyError, match="another format"):
        CopyIndex.load(tmp_path / "ix")


def test_a_folder_of_texts_is_indexed_once_and_cached(tmp_path, session_home):
    folder = tmp_path / "sources"
    folder.mkdir()
    (folder / "fox.txt").write_text(FOX)
    (folder / "notes.jsonl").write_text(json.dumps({"text": MILL}) + "\n")
    idx = resolve_index(folder)
    assert sorted(idx.names) == sorted([str(folder / "fox.txt"), f"{folder / 'notes.jsonl'}:1"])
    cached = list((session_home / "copy_indexes").iterdir())
    assert cached and all((c / "index.json").is_file() for c in cached)
    assert check_copying(MILL, resolve_index(folder)).spans[0]["source"].endswith("notes.jsonl:1")
    with pytest.raises(CopyError, match="no run, model, copy index"):
        resolve_index(tmp_path / "missing")
    with pytest.raises(CopyError, match="not trained here"):
        resolve_index("smollm2-135m-instruct")
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "metrics.jsonl").write_text('{"step": 1, "loss": 4.2}\n')
    with pytest.raises(CopyError, match="training run without a checkpoint yet"):
        resolve_index(tmp_path / "started")


def test_a_run_resolves_to_the_index_of_the_data_it_was_trained_on(tmp_path):
    from llmos.data.prepare import PrepareConfig, prepare
    from llmos.train.trainer import TrainConfig, Trainer

    (tmp_path / "shake.txt").write_text(SHAKESPEARE)
    data = tmp_path / "data"
    prepare(PrepareConfig([str(tmp_path / "shake.txt")], str(data)))
    assert json.loads((data / "meta.json").read_text())["copy_index"] == "copy_index"
    run = tmp_path / "run"
    Trainer(data, run, TrainConfig(preset="tiny", model=dict(n_layer=1, n_head=2, d_model=16, max_seq_len=32),
                                   batch_size=2, block_size=16, max_steps=2, eval_interval=2, eval_iters=1,
                                   warmup_steps=1, sample_tokens=4)).run()
    passage = SHAKESPEARE[1000:1200]
    for spec in (run, run / (run / "LATEST").read_text().strip(), data):
        rep = check_copying(passage, resolve_index(spec))
        assert rep.spans and rep.spans[0]["source"].endswith("shake.txt")
    held_out = SHAKESPEARE[-1500:-1000]  # the validation split is not indexed
    assert not check_copying(held_out, resolve_index(run), 200).copied
    prepare(PrepareConfig([str(tmp_path / "shake.txt")], str(data), copy_index=False))
    with pytest.raises(CopyError, match=r"trained on .*which has no copy index: run `llmos prepare` again"):
        resolve_index(run)


def test_llmos_check_marks_copying_and_exits_by_what_it_found(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "shake.txt").write_text(SHAKESPEARE)
    (corpus / "river.txt").write_text(RIVER * 3)
    proc = llmos("prepare", str(corpus), "-o", str(tmp_path / "data"), "--val-fraction", "0.05", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "copy_index" / "index.json").is_file()
    story = tmp_path / "story.txt"
    story.write_text("My opening line.\n" + SHAKESPEARE[500:700] + "\nMy closing line.")
    proc = llmos("check", str(story), "--against", str(tmp_path / "data"), home=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "[[" + SHAKESPEARE[500:700].strip()[:20] in proc.stdout and "copying found" in proc.stderr
    proc = llmos("check", "-", "--against", str(tmp_path / "data"), "--json", home=tmp_path,
                 stdin="今天：" + RIVER[10:60])
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["spans"][0]["source"].endswith("river.txt")
    assert report["longest"]["text"] == RIVER[10:60]
    proc = llmos("check", "Words of my own, not found in any play.", "--against", str(corpus), home=tmp_path)
    assert proc.returncode == 0 and "no copying" in proc.stderr
    assert_clean_error(llmos("check", "draft.txt", "--against", str(corpus), home=tmp_path), "no such file")
