"""Chinese forms with 平仄 and rhyme books: the templates and the rules of a line, the checker on
real poems (唐诗三百首's regulated verse, Song 词), the machines kept by random walks over
vocabularies that spell characters in byte pieces, bad input, and `llmos check-poem`."""

import json
import re

import pytest

from conftest import REPO
from helpers import llmos
from llmos.writing import forms
from llmos.writing.forms import han
from llmos.writing.tokens import TokenTable
from test_forms import HAN_VOCAB, assert_walks_keep, word_tokenizer

POEMS = REPO / "tests" / "data" / "poems"


def tang() -> list[dict]:
    return json.loads((POEMS / "tang300_regulated.json").read_text(encoding="utf-8"))


def ci() -> list[dict]:
    return json.loads((POEMS / "ci.json").read_text(encoding="utf-8"))


def test_the_four_templates_follow_from_the_first_line():
    assert "".join(han.regulated_template("A", 8)) == "ABCDABCD"  # 仄起, first line unrhymed
    assert "".join(han.regulated_template("D", 8)) == "DBCDABCD"  # 仄起, first line rhymed
    assert "".join(han.regulated_template("C", 4)) == "CDAB"
    assert "".join(han.regulated_template("B", 4)) == "BDAB"
    assert [han.base_line(k, 7) for k in "ABCD"] == ["平平仄仄平平仄", "仄仄平平仄仄平", "仄仄平平平仄仄", "平平仄仄仄平平"]


def test_the_rules_of_a_line():
    faults = han.tone_faults
    assert faults("平平仄仄平", "平平仄仄平", "strict", True) == []
    assert faults("仄平仄仄平", "平平仄仄平", "strict", True) == [(0, "孤平")]  # 一三五不论, but not into 孤平
    assert faults("仄平仄仄平", "平平仄仄平", "loose", True) == []
    assert faults("仄平平仄平", "平平仄仄平", "strict", True) == []  # its cure: 仄平平仄平
    assert faults("仄仄平平平", "仄仄仄平平", "strict", True) == [(2, "三平尾")]
    assert faults("平平仄平仄", "平平平仄仄", "strict", True) == []  # the standard exception
    assert faults("平仄仄仄平", "平平仄仄平", "loose", True) == [(1, "平")]  # 二四六分明
    assert faults("仄仄平平平仄仄", "仄仄平平平仄仄", "off", True) == []
    # a 词 pattern: 中 is free; strict checks every other position, loose the even ones and the last
    assert faults("平仄平平平仄", "中仄中平平仄", "strict", False) == []
    assert faults("平仄平平仄仄", "中仄中平平仄", "strict", False) == [(4, "平")]
    assert faults("平仄平平仄仄", "中仄中平平仄", "loose", False) == []
    assert len(han.line_patterns("平平仄仄平", "strict", True)) == 3  # 平平/仄平 x 仄, and 仄平平仄平
    # 仄仄平仄仄: a 拗 the next line may make up for (对句相救), so not a plain fault
    assert faults("仄仄平仄仄", "仄仄平平仄", "strict", True) == [(3, "拗")]
    assert han.line_patterns("仄仄平平仄", "strict", True, rescue=True) == ("平仄平仄仄", "平仄仄仄仄", "仄仄平仄仄", "仄仄仄仄仄")


def test_a_rescued_ao_passes_and_an_unrescued_one_does_not():
    jueju = forms.get_form("五言绝句")
    assert forms.check(jueju, "远送从此别，青山空复情。几时杯重把，昨夜月同行。") == []  # 杜甫: 空 rescues 此
    (problem,) = forms.check(jueju, "远送从此别，青山独复情。几时杯重把，昨夜月同行。")
    assert problem.line == 1 and "拗" in problem and "line 2" in problem


def test_a_real_jueju_keeps_its_pattern_and_a_gujue_does_not():
    jueju = forms.get_form("五言绝句")
    assert forms.check(jueju, "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。") == []
    problems = forms.check(jueju, "床前明月光，疑是地上霜。举头望明月，低头思故乡。")  # 静夜思 is a 古绝
    assert [(p.line, p.rule) for p in problems] == [(2, "tone"), (3, "tone")]
    assert problems[0] == "line 2: character 4 (上) is 仄, the pattern 仄仄仄平平 needs 平"
    # 看 and 思 read both ways in 平水韵; 春 is not an oblique tone, so it cannot end an unrhymed line
    assert forms.check(jueju, "白日依山尽，黄河入海流。欲穷千里春，更上一层楼。")[0].rule == "tone"
    # a rhyme character used twice, and a line that leaves the rhyme group
    twice = forms.check(jueju, "白日依山尽，黄河入海流。欲穷千里目，更上一层流。")
    assert [p.rule for p in twice] == ["repeated rhyme"]
    off = forms.check(jueju, "白日依山尽，黄河入海流。欲穷千里目，更上一层天。")
    assert [p.rule for p in off] == ["rhyme"] and "下平十一尤" in off[0]


def test_false_alarms_on_the_regulated_verse_of_tang300():
    """Every poem of the anthology's regulated sections, judged with each tone mode. Some are 古绝
    rhymed on oblique tones (春晓, 江雪) or lean on a neighbouring rhyme group, so not all pass:
    the rates are a measurement (benchmarks/forms.py reports them), guarded here from regressing."""
    poems = tang()
    flagged = {mode: [p["title"] for p in poems
                      if forms.check(forms.get_form(p["type"]), "\n".join(p["lines"]), tones=mode)]
               for mode in ("strict", "loose", "off")}
    assert len(poems) == 213
    assert len(flagged["off"]) <= len(flagged["loose"]) <= len(flagged["strict"]) <= 40
    for title in ("登鹳雀楼", "春望", "出塞二首·其一", "枫桥夜泊", "旅夜书怀"):
        assert title not in flagged["strict"], title


def test_ci_to_their_tunes():
    flagged = {}
    for poem in ci():
        problems = forms.check(forms.get_form(f"词:{poem['tune']}"), "\n".join(poem["lines"]))
        if problems:
            flagged[poem["title"]] = problems
    # 张孝祥 and 辛弃疾 wrote 水调歌头 to variant patterns (又一体); the source's 李清照 reads 江海 for 江梅
    assert sorted(flagged) == ["水调歌头·带湖吾甚", "水调歌头·雪洗虏尘", "浣溪沙·淡荡春光"]
    # editions that punctuate the same words elsewhere are cut where the tune cuts
    sushi = "落日绣帘卷，亭下水连空。知君为我，新作窗户湿青红。"
    assert han._by_tune(han.split_lines(sushi), (han.Line(5, "", (), None),) * 2 + (han.Line(6, "", (), None),)
                        + (han.Line(5, "", (), None),))[2] == "知君为我新作，"
    dream = forms.get_form("词:如梦令")
    assert [p.rule for p in forms.check(dream, "昨夜雨疏风骤，浓睡不消残酒。试问卷帘人，却道海棠依旧。知否，知道？应是绿肥红瘦。")] == [
        "repeat", "rhyme"]


@pytest.mark.parametrize("name, options", [
    ("五言绝句", {}),
    ("七言律诗", {}),
    ("五言律诗", {"tones": "loose"}),
    ("七言绝句", {"book": "xinyun"}),
    ("五言绝句", {"tones": "off", "rhyme": "false"}),
    ("藏头诗", {"acrostic": "春夏秋冬", "tones": "strict", "rhyme": "true"}),
    ("词:如梦令", {}),
    ("词:浣溪沙", {"tones": "loose"}),
    ("词:菩萨蛮", {}),
    ("词:西江月", {}),
    ("词:如梦令", {"book": "xinyun"}),
    ("词:西江月", {"book": "xinyun", "tones": "loose"}),
    ("词:水调歌头", {"acrostic": "明月"}),
])
def test_machines_keep_tones_and_rhymes(name, options):
    """Random walks through the masks, over a vocabulary where most characters are spelled in
    byte pieces, always end in a poem the checker (a separate code path) accepts."""
    table = TokenTable(word_tokenizer(HAN_VOCAB))
    form = forms.get_form(name)
    assert_walks_keep(form, table, table.size, options, seed=5, times=4, limit=1500)


def test_machine_over_byte_level_bpe(tiny_llm):
    table = TokenTable(tiny_llm.tokenizer)
    for name in ("七言绝句", "词:西江月"):
        form = forms.get_form(name)
        assert_walks_keep(form, table, tiny_llm.model.config.vocab_size, {}, seed=6, times=1, limit=1500)


@pytest.mark.parametrize("name, variables, message", [
    ("藏头诗", {"acrostic": "嗯好", "tones": "strict"}, "line 1 must begin with 嗯, which 平水韵 lacks"),
    ("词:水调歌头", {"acrostic": "明月几时有把酒问青春"}, "line 10 must begin with 春 (平)"),
    ("五言绝句", {"tones": "exact"}, "--var tones takes strict, loose, off"),
    ("五言绝句", {"book": "guangyun"}, "--var book takes pingshui"),
    ("词:如梦令", {"acrostic": "abc"}, "at most 7 Han characters"),
])
def test_bad_chinese_options_say_what_to_do(name, variables, message):
    with pytest.raises(forms.FormError, match=re.escape(message)):
        forms.form_options(forms.get_form(name), variables)
    with pytest.raises(forms.FormError, match="词:浣溪沙"):
        forms.get_form("词:念奴娇")


def test_check_poem_tells_the_form():
    assert forms.check_poem("白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。")["form"] == "五言绝句"
    assert forms.check_poem("\n".join(ci()[0]["lines"]))["form"] == "词:如梦令"
    with pytest.raises(forms.FormError, match="--form"):
        forms.check_poem("春风吹。")


def test_cli_check_poem(tmp_path, session_home):
    poem = tmp_path / "poem.txt"
    poem.write_text("床前明月光，疑是地上霜。\n举头望明月，低头思故乡。\n", encoding="utf-8")
    proc = llmos("check-poem", str(poem), "--json", home=session_home)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["form"] == "五言绝句" and [p["line"] for p in report["problems"]] == [2, 3]
    assert llmos("check-poem", str(poem), "--tones", "off", home=session_home).returncode == 0
    proc = llmos("check-poem", "-", "--form", "词:西江月", home=session_home, stdin=poem.read_text(encoding="utf-8"))
    assert proc.returncode == 1 and "line" in proc.stdout
    proc = llmos("check-poem", str(poem), "--rhyme-book", "guangyun", home=session_home)
    assert proc.returncode == 2 and "pingshui" in proc.stderr
    proc = llmos("check-poem", str(tmp_path / "missing.txt"), home=session_home)
    assert proc.returncode == 2 and "cannot read" in proc.stderr
