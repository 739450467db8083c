"""llmos eval: the measures against hand-computed values, perplexity against a direct
computation, the bias probe's arithmetic, and a report of two tiny models side by side (JSON,
HTML, and the HTML in a browser)."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from llmos.cli import app
from llmos.eval import bias, metrics as m
from llmos.eval.report import EvalSettings, bar_chart, render_html, text_metrics
from llmos.writing import forms
from llmos.writing.slop import find_slop, load_slop


def test_units_words_and_han_characters():
    assert m.units("The cat, the CAT!") == ["the", "cat", "the", "cat"]
    assert m.units("秋夜 rain。月光") == ["秋", "夜", "rain", "月", "光"]


def test_distinct_n_over_all_texts():
    texts = ["the cat sat", "the cat ran"]
    assert m.distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6 words
    assert m.distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert m.distinct_n(["春风春风"], 2) == pytest.approx(2 / 3)  # 春风, 风春, 春风
    assert m.distinct_n(["one"], 2) is None


def test_bleu_by_hand():
    hyp, ref = "the cat sat on the mat".split(), "the cat sat on a mat".split()
    # clipped matches / totals: 1-grams 5/6; 2-grams 3/5; 3-grams 2/4; 4-grams 1/3 (plus one each from 2 on)
    expected = math.exp((math.log(5 / 6) + math.log(4 / 6) + math.log(3 / 5) + math.log(2 / 4)) / 4)
    assert m.bleu(hyp, [ref]) == pytest.approx(expected)
    assert m.bleu(hyp, [hyp]) == pytest.approx(1.0)
    assert m.bleu("a b".split(), ["c d".split()]) == 0.0
    # brevity: 3 words against a 6-word reference
    short = "the cat sat".split()
    bp = math.exp(1 - 6 / 3)
    assert m.bleu(short, [ref]) == pytest.approx(bp * math.exp((0 + math.log(3 / 3) + math.log(2 / 2) + math.log(1 / 1)) / 4))


def test_self_bleu():
    same = ["the cat sat on the mat"] * 3
    assert m.self_bleu(same) == pytest.approx(1.0)
    assert m.self_bleu(["a b c d", "e f g h"]) == 0.0
    assert m.self_bleu(["only one"]) is None
    pair = ["the cat sat on the mat", "the cat sat on a mat"]
    a, b = (s.split() for s in pair)
    assert m.self_bleu(pair) == pytest.approx((m.bleu(a, [b]) + m.bleu(b, [a])) / 2)
    assert m.self_bleu(["春眠不觉晓", "春眠不觉晓"]) == pytest.approx(1.0)  # character-level for Chinese


def test_repetition_and_length():
    assert m.repeated_ngrams("a b c d a b c d", 4) == pytest.approx(1 - 4 / 5)
    assert m.repeated_ngrams("a b c", 4) is None
    assert m.repeated_lines("Sea\nsky\n\nsea \nland") == pytest.approx(1 - 3 / 4)
    assert m.length("She read it twice. 她读了两遍") == 9
    assert m.length_adherence(150, 100) and not m.length_adherence(151, 100)


def test_slop_lists_and_counting():
    en, zh = load_slop("en"), load_slop("zh")
    assert "a testament to" in en and "shivers down her spine" in en and "barely above a whisper" in en
    assert "眼中闪过一丝" in zh and "嘴角勾起一抹" in zh
    assert not any(p.startswith("#") for p in en + zh)
    text = "A Testament to the sea. Shivers down her spine. He delved intone."
    assert find_slop(text, en) == ["a testament to", "shivers down her spine"]  # overlaps count once
    assert find_slop("她眼中闪过一丝光", zh) == ["眼中闪过一丝"]
    with pytest.raises(ValueError, match="no slop list"):
        load_slop("fr")
    row = text_metrics(["a testament to " + "word " * 96, "plain words here"])
    assert row["slop_per_1k"] == pytest.approx(1000 * 1 / (3 + 96 + 3))  # one phrase in 102 words


def test_text_metrics_form_and_length():
    slogan = forms.get_form("slogan")
    row = text_metrics(["Bread for the sleepless.", "one two three four five six seven eight nine ten eleven twelve thirteen"],
                       ["stop", "length"], target=4, form=slogan)
    assert row["form_rate"] == 0.5
    assert row["truncated"] == 0.5
    assert row["length_ratio"] == pytest.approx((4 / 4 + 13 / 4) / 2)
    assert row["length_adherence"] == 0.5


def test_bits_per_byte_is_nll_over_bytes(tiny_llm):
    text = "The harbour lights came on one by one. 港口的灯亮了。\n" * 4
    ids = tiny_llm.tokenizer.encode(text)
    with torch.inference_mode():
        logits = tiny_llm.model(torch.tensor([ids[:-1]]))[0].float()
    direct = float(F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
    nll, count = m.text_nll(tiny_llm.model, ids, window=len(ids) + 5, chunk=7)  # one window, odd chunks
    assert count == len(ids) - 1
    assert nll == pytest.approx(direct, rel=1e-4)
    assert m.bits_per_byte(nll, len(text.encode())) == pytest.approx(direct / math.log(2) / len(text.encode()), rel=1e-4)
    # strided windows of 64: tokens 1-63 from the first, then each next 32 with 32 tokens before them
    nll_w, count_w = m.text_nll(tiny_llm.model, ids, window=64, chunk=16)
    assert count_w == len(ids) - 1
    expected, start, scored = 0.0, 0, 1
    with torch.inference_mode():
        while scored < len(ids):
            end = min(start + 64, len(ids))
            window_logits = tiny_llm.model(torch.tensor([ids[start : end - 1]]))[0].float()
            first = scored - 1 - start  # the row that predicts ids[scored]
            expected += float(F.cross_entropy(window_logits[first:], torch.tensor(ids[scored:end]), reduction="sum"))
            scored, start = end, max(0, end - 32)
    assert nll_w == pytest.approx(expected, rel=1e-4)


def test_sentiment_lexicon():
    assert bias.sentiment("She was kind and generous.", "en") == 1.0
    assert bias.sentiment("He was not kind, and rude.", "en") == -1.0
    assert bias.sentiment("They were kind but lazy.", "en") == 0.0
    assert bias.sentiment("The table stood there.", "en") == 0.0
    assert bias.sentiment("她很善良，也很勤奋。", "zh") == 1.0
    assert bias.sentiment("他不诚实，也不友好。", "zh") == -1.0


def test_bias_summary_centres_per_template():
    rows = [{"template": t, "attribute": "gender", "value": v, "fill": v, "sentiment": s,
             "neutral_logprob": s, "preference": s}
            for t, scores in enumerate([{"man": 1.0, "woman": 0.0}, {"man": 3.0, "woman": 3.0}])
            for v, s in scores.items()]
    out = bias.summarise(rows)["gender"]["sentiment"]
    assert out["values"]["man"]["mean"] == 2.0
    assert out["values"]["man"]["deviation"] == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert out["values"]["woman"]["deviation"] == pytest.approx(-0.25)
    assert out["values"]["man"]["sd"] == pytest.approx(math.sqrt(2 * 0.25 ** 2))
    assert out["gap"] == pytest.approx(0.5)


def test_continuation_logprob_matches_direct(tiny_llm):
    tok = tiny_llm.tokenizer
    prompt, cont = "The man walked in and", " sat down."
    lp = bias.continuation_logprob(tiny_llm, prompt, cont)
    head, full = tok.encode(prompt), tok.encode(prompt + cont)
    with torch.inference_mode():
        logits = tiny_llm.model(torch.tensor([full[:-1]]))[0].float()
    logp = torch.log_softmax(logits, -1)
    assert lp == pytest.approx(sum(float(logp[i - 1, full[i]]) for i in range(len(head), len(full))), rel=1e-5)
    assert bias.fills("en")[0][0] == "gender" and bias.probe_size(["en"]) > 0


def test_bar_chart_svg():
    svg = bar_chart("distinct-2", ["poem", "story"], ["a", "b"], {("poem", "a"): 0.5, ("poem", "b"): -0.25,
                                                                  ("story", "a"): None, ("story", "b"): 1.0})
    assert svg.startswith("<svg") and svg.count('class="bar"') == 3


@pytest.fixture(scope="module")
def two_tiny(tmp_path_factory):
    from helpers import write_tiny_gguf

    d = tmp_path_factory.mktemp("eval-models")
    return write_tiny_gguf(d / "tiny-a.gguf"), write_tiny_gguf(d / "tiny-b.gguf", n_layer=1)


@pytest.fixture(scope="module")
def report_dir(two_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-report")
    held = out / "held.txt"
    held.write_text("The harbour lights came on one by one.\n" * 8, encoding="utf-8")
    a, b = two_tiny
    result = CliRunner().invoke(app, ["eval", "-m", str(a), "-m", str(b), "--text", str(held), "--tasks", "slogan,title",
                                      "--samples", "2", "--max-tokens", "6", "-o", str(out / "report")])
    assert result.exit_code == 0, result.output
    assert "llmos eval" in result.output and "bits per byte" in result.output
    return out / "report"


def test_cli_two_models_side_by_side(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    assert len(report["models"]) == 2
    for name, r in report["models"].items():
        assert r["perplexity"]["tokens"] > 0 and r["perplexity"]["bits_per_byte"] > 0
        assert set(r["tasks"]) == {"slogan/en", "title/en"}
        assert all(len(t["samples"]) == 2 for t in r["tasks"].values())
        assert r["summary"]["copied_share"].startswith("not measured")
        assert r["tasks"]["slogan/en"]["form"] == "slogan" and "form_rate" in r["tasks"]["slogan/en"]["metrics"]
    html = (report_dir / "report.html").read_text()
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert render_html(report) == html


def test_report_in_the_browser(report_dir):
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "Debian's chromium is needed for the browser tests: apt-get install chromium"
    names = list(json.loads((report_dir / "report.json").read_text())["models"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--headless", "--no-sandbox", "--disable-gpu",
                                                              "--disable-background-networking", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto((report_dir / "report.html").as_uri())
            header = page.eval_on_selector("table.metrics", "t => [...t.querySelectorAll('th.model')].map(e => e.textContent)")
            assert header == names
            bars = page.eval_on_selector_all("svg.chart rect.bar", "rs => rs.map(r => [r.dataset.model, r.getBBox().height])")
            assert {model for model, _ in bars} == set(names)
            assert all(h > 0 for _, h in bars)
            assert page.eval_on_selector_all("svg.chart", "s => s.length") >= 2
        finally:
            browser.close()


@pytest.mark.parametrize("args, message", [
    (["--tasks", "nonsense"], "unknown task"),
    (["--samples", "0"], "samples must be at least 1"),
    (["--lang", "fr"], "languages must be among"),
    (["-m", "no-such-model"], "no-such-model"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    result = CliRunner().invoke(app, ["eval", *args, "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert message in result.output


def test_empty_text_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    result = CliRunner().invoke(app, ["eval", "--text", str(empty), "-o", str(tmp_path)])
    assert result.exit_code == 2 and "is empty" in result.output


def test_settings_defaults_are_modest():
    s = EvalSettings()
    assert s.samples * len(s.tasks) <= 16 and s.max_tokens <= 200


def test_copying_against_a_folder_of_texts(tmp_path):
    from llmos.eval.report import copying_metrics, load_checks

    source = "The harbour lights came on one by one, and the fishing boats turned for home across the dark water."
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text(source, encoding="utf-8")
    checks = load_checks(EvalSettings(against=str(tmp_path / "texts")))
    assert checks.copying is not None and "copied_share" not in checks.missing
    row = copying_metrics([source, "Nothing in this sentence comes from the folder at all, not one phrase."], checks.copying)
    assert row["copied_samples"] == 0.5 and row["copied_longest"] >= 90
    assert 0.45 <= row["copied_share"] <= 0.55
