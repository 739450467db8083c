"""The rhyme books against characters whose readings are settled, and against real Tang poems and Song 词."""

import json
import time
from pathlib import Path

import pytest

from llmos.writing.forms import rhymebook
from llmos.writing.forms.rhymebook import BOOK_NAMES, BOOKS, ci_rhymes, group_name, known, rhymes, tones

POEMS = Path(__file__).parent / "data" / "poems"


def poems(name):
    return json.loads((POEMS / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("ch, group", [
    ("先", "下平一先"), ("啼", "上平八齐"), ("沉", "下平十二侵"), ("风", "上平一东"), ("楼", "下平十一尤"),
    ("流", "下平十一尤"), ("愁", "下平十一尤"), ("山", "上平十五删"), ("间", "上平十五删"), ("还", "上平十五删"),
    ("寒", "上平十四寒"), ("残", "上平十四寒"), ("看", "上平十四寒"),
])
def test_pingshui_level_groups(ch, group):
    assert group in rhymes(ch) and "平" in tones(ch)


def test_pingshui_oblique_and_entering():
    assert tones("遍") == {"仄"} and rhymes("遍") == set()  # 去声十七霰
    assert rhymebook.oblique_rhymes("遍") == {"去声十七霰"} and rhymebook.oblique_rhymes("天") == set()
    assert rhymebook.oblique_rhymes("看") == {"去声十五翰"}  # and 上平十四寒: both readings
    assert rhymebook.oblique_rhymes("骤", "xinyun") == rhymes("流", "xinyun") == {"七尤"}
    for ch in "白日入国石一月十竹":
        assert tones(ch) == {"仄"}, ch
    assert "仄" in tones("不") and "仄" in tones("出")  # 入声, beside a rarer level reading


@pytest.mark.parametrize("ch", "看思听望过教醒忘胜应论")
def test_polyphonic_characters_are_both(ch):
    assert tones(ch) == {"平", "仄"}


def test_traditional_and_simplified_forms_agree():
    for trad, simple in ["風风", "樓楼", "東东", "間间", "還还", "聽听", "國国"]:
        assert tones(trad) == tones(simple) and rhymes(trad) == rhymes(simple), trad


def test_pingshui_has_106_groups():
    groups = rhymebook.load("pingshui").groups
    assert len(groups) == 106
    assert [sum(g.startswith(p) for g in groups) for p in ("上平", "下平", "上声", "去声", "入声")] == [15, 15, 29, 30, 17]
    assert len(known()) > 20000


@pytest.mark.parametrize("ch, group, tone", [
    ("风", "十一庚", "平"), ("流", "七尤", "平"), ("山", "八寒", "平"), ("诗", "十三支", "平"), ("西", "十二齐", "平"),
    ("儿", "十二齐", "平"), ("绿", "十二齐", "仄"), ("雪", "三皆", "仄"), ("波", "二波", "平"), ("车", "二波", "平"),
    ("家", "一麻", "平"), ("来", "四开", "平"), ("飞", "五微", "平"), ("桥", "六豪", "平"), ("云", "九文", "平"),
    ("长", "十唐", "平"), ("孤", "十四姑", "平"), ("白", "四开", "平"), ("月", "三皆", "仄"), ("国", "二波", "平"),
])
def test_xinyun(ch, group, tone):
    assert tone in tones(ch, "xinyun")
    if tone == "平":
        assert group in rhymes(ch, "xinyun")


def test_xinyun_polyphonic_and_modern_tones():
    assert tones("看", "xinyun") == {"平", "仄"}  # kān, kàn
    assert tones("国", "xinyun") == {"平"} and tones("国", "pingshui") == {"仄"}  # guó; 入声 in 平水韵
    assert rhymes("行", "xinyun") == {"十一庚", "十唐"}  # xíng, háng


@pytest.mark.parametrize("ch, expected", [
    ("流", {("第十二部", "平")}), ("东", {("第一部", "平")}), ("梅", {("第三部", "平")}), ("开", {("第五部", "平")}),
    ("门", {("第六部", "平")}), ("言", {("第七部", "平")}), ("娃", {("第十部", "平")}), ("竹", {("第十五部", "入")}),
    ("月", {("第十八部", "入")}), ("雨", {("第四部", "仄")}), ("鹊", {("第十六部", "入")}), ("合", {("第十九部", "入")}),
])
def test_ci_rhymes(ch, expected):
    assert ci_rhymes(ch) == expected


def test_ci_parts_follow_cilin_zhengyun():
    """Every 平水韵 group falls in the 部 that 戈载《词林正韵》 gives it; the half groups in two."""
    parts = {}
    for group, _, part, _ in rhymebook.pingshui_rows():
        parts.setdefault(group[2:], set()).add(part)
    expected = {
        "第一部": "一东 二冬 一董 二肿 一送 二宋", "第二部": "三江 七阳 三讲 二十二养 三绛 二十三漾",
        "第三部": "四支 五微 八齐 十灰 四纸 五尾 八荠 十贿 四寘 五未 八霁 九泰 十一队",
        "第四部": "六鱼 七虞 六语 七麌 六御 七遇", "第五部": "九佳 十灰 九蟹 十贿 九泰 十卦 十一队",
        "第六部": "十一真 十二文 十三元 十一轸 十二吻 十三阮 十二震 十三问 十四愿",
        "第七部": "十三元 十四寒 十五删 一先 十三阮 十四旱 十五潸 十六铣 十四愿 十五翰 十六谏 十七霰",
        "第八部": "二萧 三肴 四豪 十七筱 十八巧 十九皓 十八啸 十九效 二十号", "第九部": "五歌 二十哿 二十一个",
        "第十部": "九佳 六麻 二十一马 十卦 二十二祃", "第十一部": "八庚 九青 十蒸 二十三梗 二十四迥 二十四敬 二十五径",
        "第十二部": "十一尤 二十五有 二十六宥", "第十三部": "十二侵 二十六寝 二十七沁",
        "第十四部": "十三覃 十四盐 十五咸 二十七感 二十八琰 二十九豏 二十八勘 二十九艳 三十陷",
        "第十五部": "一屋 二沃", "第十六部": "三觉 十药", "第十七部": "四质 十一陌 十二锡 十三职 十四缉",
        "第十八部": "五物 六月 七曷 八黠 九屑 十六叶", "第十九部": "十五合 十七洽",
    }
    wanted = {}
    for part, groups in expected.items():
        for group in groups.split():
            wanted.setdefault(group, set()).add(part)
    assert parts == wanted


def test_group_names():
    assert group_name("下平十一尤") == "下平十一尤"
    assert group_name("尤") == group_name("十一尤") == "下平十一尤"
    assert group_name("十一庚") == "十一庚" and group_name("第十二部") == "第十二部"
    with pytest.raises(ValueError):
        group_name("无此韵")


def test_unknown_book_and_characters():
    assert BOOKS == ("pingshui", "xinyun") and set(BOOK_NAMES) == set(BOOKS)
    with pytest.raises(ValueError, match="pingshui"):
        tones("风", "pingshuiyun")
    for book in BOOKS:
        assert tones("a", book) == rhymes("a", book) == frozenset()
    assert ci_rhymes("，") == frozenset()


def test_first_lookup_is_fast():
    for cached in (rhymebook.load, rhymebook.pingshui_rows, rhymebook.ci_table, known):
        cached.cache_clear()
    start = time.perf_counter()
    tones("风")
    assert time.perf_counter() - start < 0.5  # about 0.04 s on a laptop; loose for slow CI machines
    start = time.perf_counter()
    for ch in known("xinyun"):
        tones(ch, "xinyun")
    assert time.perf_counter() - start < 1.0


def test_tang_poems_are_known_and_rhyme():
    """The regulated verse of 唐诗三百首: every character is listed, and the even lines of nearly all rhyme in one
    level group (a few rhyme oblique, as 古绝, or borrow a neighbouring group, as 东 with 冬)."""
    tang = poems("tang300_regulated.json")
    assert len(tang) > 200
    chars = [ch for poem in tang for line in poem["lines"] for ch in line[:-1]]
    assert sum(ch in known() for ch in chars) / len(chars) > 0.999
    rhyming = [poem for poem in tang if set.intersection(*(set(rhymes(line[-2])) for line in poem["lines"][1::2]))]
    assert len(rhyming) / len(tang) > 0.9  # 201 of 213 when this was written
    level = [poem for poem in tang if all("平" in tones(line[-2]) for line in poem["lines"][1::2])]
    assert len(rhyming) / len(level) > 0.97


def test_ci_rhyme_in_their_parts():
    """Song 词: the lines that close a sentence rhyme in one 词林正韵 部 (菩萨蛮 changes rhyme every two)."""
    def share(ends, key):
        return bool(set.intersection(*({key(entry) for entry in ci_rhymes(ch)} for ch in ends)))
    agree = 0
    for poem in poems("ci.json"):
        ends = [line[-2] for line in poem["lines"] if line.endswith("。")]
        if poem["tune"] == "菩萨蛮":
            agree += all(share(ends[i:i + 2], lambda entry: entry) for i in range(0, 8, 2))
        else:
            agree += share(ends, lambda entry: entry[0])  # 西江月 rhymes 平 with 仄 in one 部
    # 18 of 20: 晏殊 and 辛弃疾 rhyme both halves of 灰 (杯 回 in 第三部, 来 开 in 第五部)
    assert agree >= 18
