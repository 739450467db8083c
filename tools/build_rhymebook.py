"""Build the rhyme-book data files of llmos/writing/forms/data/ and the poem corpus of tests/data/poems/.

Run once by hand; the outputs are committed, and neither the runtime nor the tests download anything.

    pip install --target /tmp/buildlibs opencc-python-reimplemented   # t2s, used only here
    PYTHONPATH=/tmp/buildlibs python tools/build_rhymebook.py \
        --couyun couyun/hanzi/hanzi_class.py --poetry chinese-poetry/

--couyun is the rhyme table of github.com/hulbji/couyun (MIT): a Python file of list literals, read with
ast.literal_eval (never imported or executed). --poetry is a checkout of github.com/chinese-poetry/chinese-poetry
(MIT). See llmos/writing/forms/data/README.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "llmos" / "writing" / "forms" / "data"
POEMS = ROOT / "tests" / "data" / "poems"

NUMBERS = ["一", "二", "三", "四", "五", "六", "七", "八", "九", "十", "十一", "十二", "十三", "十四", "十五",
           "十六", "十七", "十八", "十九", "二十", "二十一", "二十二", "二十三", "二十四", "二十五", "二十六",
           "二十七", "二十八", "二十九", "三十"]
# the rhyme characters of the 106 groups, in the book's order, per tone
PINGSHUI = {
    "平": "东冬江支微鱼虞齐佳灰真文元寒删先萧肴豪歌麻阳庚青蒸尤侵覃盐咸",
    "上": "董肿讲纸尾语麌荠蟹贿轸吻阮旱潸铣筱巧皓哿马养梗迥有寝感琰豏",
    "去": "送宋绛寘未御遇霁泰卦队震问愿翰谏霰啸效号个祃漾敬径宥沁勘艳陷",
    "入": "屋沃觉质物月曷黠屑药陌锡职缉合叶洽",
}
TONE_OF_CODE = {1: "平", 2: "上", 3: "去", 4: "入"}

# 中华诗词学会《中华新韵（十四韵）》: group -> pinyin finals (ü written v; -i is the apical vowel of zhi chi shi ri zi ci si)
XINYUN = {
    "一麻": "a ia ua", "二波": "o e uo", "三皆": "ie ve", "四开": "ai uai", "五微": "ei uei",
    "六豪": "ao iao", "七尤": "ou iou", "八寒": "an ian uan van", "九文": "en in uen vn",
    "十唐": "ang iang uang", "十一庚": "eng ing ong iong ueng", "十二齐": "i er v", "十三支": "-i",
    "十四姑": "u",
}
INITIALS = ("zh", "ch", "sh", "b", "p", "m", "f", "d", "t", "n", "l", "g", "k", "h", "j", "q", "x", "r", "z", "c", "s")
ZERO_INITIAL = {"yi": "i", "ya": "ia", "ye": "ie", "yao": "iao", "you": "iou", "yan": "ian", "yin": "in",
                "yang": "iang", "ying": "ing", "yong": "iong", "yo": "o", "yu": "v", "yue": "ve", "yuan": "van",
                "yun": "vn", "wu": "u", "wa": "ua", "wo": "uo", "wai": "uai", "wei": "uei", "wan": "uan",
                "wen": "uen", "wang": "uang", "weng": "ueng", "wong": "ueng"}
CONTRACTED = {"iu": "iou", "ui": "uei", "un": "uen"}


def pingshui_group(tone: str, number: int) -> str:
    """'平', 26 -> '下平十一尤'; '入', 1 -> '入声一屋'."""
    rhyme = PINGSHUI[tone][number - 1]
    if tone == "平":
        half = "上平" if number <= 15 else "下平"
        return half + NUMBERS[(number - 1) % 15] + rhyme
    return tone + "声" + NUMBERS[number - 1] + rhyme


def build_pingshui(couyun: Path, t2s) -> list[str]:
    """One line per (group, 词林正韵 部): group, tone, 部, characters (source forms + simplified forms)."""
    rows: dict[tuple[str, str, str], dict[str, None]] = {}
    for node in ast.parse(couyun.read_text(encoding="utf-8")).body:
        if not isinstance(node, ast.Assign):
            continue
        chars, tone_code, group_code, part_code, _ = ast.literal_eval(node.value)
        tone = TONE_OF_CODE[tone_code]
        key = (pingshui_group(tone, abs(group_code)), tone, f"第{NUMBERS[abs(part_code) - 1]}部")
        row = rows.setdefault(key, {})
        for ch in "".join(chars.split()):
            row[ch] = None
            simple = t2s.convert(ch)
            if len(simple) == 1:
                row[simple] = None
    assert len({g for g, _, _ in rows}) == 106, "平水韵 has 106 groups"
    return ["\t".join((*key, "".join(chars))) for key, chars in rows.items()]


def xinyun_final(syllable: str) -> str | None:
    """A toneless pinyin syllable (v for ü) -> its full final in the spelling of XINYUN, or None (m, n, ng, hm, ê)."""
    if syllable in ZERO_INITIAL:
        return ZERO_INITIAL[syllable]
    initial = next((i for i in INITIALS if syllable.startswith(i) and len(syllable) > len(i)), "")
    final = syllable[len(initial):]
    if not initial:
        return final if final in ("a", "o", "e", "ai", "ei", "ao", "ou", "an", "en", "ang", "eng", "er") else None
    if initial in ("j", "q", "x") and final.startswith("u"):
        final = "v" + final[1:]  # ju qu xu: the u is ü
    if final == "i" and initial in ("zh", "ch", "sh", "r", "z", "c", "s"):
        return "-i"
    return CONTRACTED.get(final, final)


def build_xinyun() -> list[str]:
    """One line per (group, 平/仄): group, finals, tone class, characters; readings from pypinyin (heteronyms)."""
    from pypinyin import Style, pinyin
    from pypinyin.pinyin_dict import pinyin_dict

    group_of = {final: group for group, finals in XINYUN.items() for final in finals.split()}
    rows = {(group, tone): {} for group in XINYUN for tone in "平仄"}
    unknown = set()
    for code in sorted(pinyin_dict):
        ch = chr(code)
        for reading in pinyin(ch, style=Style.TONE3, heteronym=True, neutral_tone_with_five=True)[0]:
            syllable, tone = reading[:-1].replace("ü", "v"), reading[-1]
            if tone not in "1234":
                continue  # the neutral tone is neither 平 nor 仄
            final = xinyun_final(syllable)
            if final is None or final not in group_of:
                unknown.add(syllable)
                continue
            rows[group_of[final], "平" if tone in "12" else "仄"][ch] = None
    assert unknown <= {"m", "n", "ng", "hm", "hng", "ê", "e^", "hn"}, unknown
    return ["\t".join((group, XINYUN[group], tone, "".join(chars))) for (group, tone), chars in rows.items()]


def write_table(path: Path, header: str, lines: list[str]) -> None:
    comments = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.strip("\n").split("\n"))
    path.write_text(comments + "\n".join(lines) + "\n", encoding="utf-8")


PINGSHUI_HEADER = """
平水韵 (106 groups), with the 词林正韵 部 of each character.
Source: the table couyun/hanzi/hanzi_class.py of github.com/hulbji/couyun (MIT licence, Copyright (c) 2026
hulbji), commit {commit}. It gives each character its 平水韵 group and its 词林正韵 部; the
groups that 词林正韵 divides (佳 灰 元, 贿 阮, 泰 卦 队 愿) are divided there character by character.
Simplified forms added by tools/build_rhymebook.py with OpenCC t2s (opencc-python-reimplemented); a simplified
character that stands for several traditional ones belongs to all their groups (e.g. 干 for 乾 and 幹).
One line per (group, 部): group <TAB> tone (平 上 去 入) <TAB> 词林正韵 部 <TAB> characters.
"""

XINYUN_HEADER = """
中华新韵 (14 groups), 中华诗词学会《中华新韵（十四韵）》: the groups are sets of pinyin finals (v is ü; -i is the
vowel of zhi chi shi ri zi ci si; i after other initials and after y- is 十二齐). 1st and 2nd tone are 平, 3rd and
4th 仄; neutral-tone readings are left out.
Characters and readings: pypinyin {pypinyin} (MIT), every reading of each character (heteronym=True), grouped by
tools/build_rhymebook.py.
One line per (group, tone class): group <TAB> finals <TAB> 平 or 仄 <TAB> characters.
"""


def split_lines(paragraphs: list[str]) -> list[str]:
    """Paragraphs -> one string per line, each ending with its punctuation mark. Editors' notes in parentheses
    ("(明年 一作：年年)"), which the source sometimes breaks across paragraphs, are dropped."""
    text = re.sub(r"[（(][^）)]*[）)]", "", "".join(p.strip() for p in paragraphs))
    return re.findall(r"[^，。！？；、]+[，。！？；、]", text)


REGULATED = {"五言絕句": "五言绝句", "七言絕句": "七言绝句", "五言律詩": "五言律诗", "七言律詩": "七言律诗"}
CI_TUNES = {  # tune -> (author, beginning of the first line), well-known pieces first
    "如梦令": [("李清照", "常记溪亭"), ("李清照", "昨夜雨疏"), ("秦观", "遥夜沈沈"), ("苏轼", "为向东坡")],
    "浣溪沙": [("晏殊", "一曲新词"), ("苏轼", "山下兰芽"), ("秦观", "漠漠轻寒"), ("李清照", "淡荡春光")],
    "菩萨蛮": [("辛弃疾", "郁孤台下"), ("李清照", "风柔日薄"), ("晏几道", "哀筝一弄"), ("苏轼", "画檐初挂")],
    "西江月": [("辛弃疾", "明月别枝"), ("苏轼", "世事一场"), ("辛弃疾", "醉里且贪"), ("张孝祥", "问讯湖边")],
    "水调歌头": [("苏轼", "明月几时"), ("张孝祥", "雪洗虏尘"), ("辛弃疾", "带湖吾甚"), ("苏轼", "落日绣帘")],
}


def build_poems(poetry: Path, t2s) -> tuple[list[dict], list[dict]]:
    book = json.loads((poetry / "蒙学" / "tangshisanbaishou.json").read_text(encoding="utf-8"))
    tang = []
    for section in book["content"]:
        if section["type"] not in REGULATED:
            continue
        for poem in section["content"]:
            title = poem["subchapter"] or poem["chapter"]
            tang.append({"title": t2s.convert(title), "author": t2s.convert(poem["author"]),
                         "type": REGULATED[section["type"]],
                         "lines": split_lines([t2s.convert(p) for p in poem["paragraphs"]])})
    songs = []
    for path in sorted((poetry / "宋词").glob("ci.song.*.json")):
        songs += json.loads(path.read_text(encoding="utf-8"))
    ci = []
    for tune, wanted in CI_TUNES.items():
        chosen = []
        for author, start in wanted:
            match = next((s for s in songs if s["rhythmic"] == tune and s["author"] == author
                          and s["paragraphs"] and s["paragraphs"][0].startswith(start) and s not in chosen), None)
            if match is None:
                raise SystemExit(f"no {tune} by {author} beginning {start!r} in {poetry}")
            chosen.append(match)
        ci += [{"tune": tune, "title": tune + "·" + s["paragraphs"][0][:4], "author": t2s.convert(s["author"]),
                "lines": split_lines([t2s.convert(p) for p in s["paragraphs"]])} for s in chosen]
    return tang, ci


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--couyun", type=Path, required=True, help="couyun/hanzi/hanzi_class.py of hulbji/couyun")
    parser.add_argument("--couyun-commit", default="1744e87f850c2205bc231bfdd858256036c0e4db")
    parser.add_argument("--poetry", type=Path, required=True, help="a checkout of chinese-poetry/chinese-poetry")
    args = parser.parse_args()
    import opencc
    import pypinyin

    t2s = opencc.OpenCC("t2s")
    DATA.mkdir(parents=True, exist_ok=True)
    write_table(DATA / "pingshui.txt", PINGSHUI_HEADER.format(commit=args.couyun_commit),
                build_pingshui(args.couyun, t2s))
    write_table(DATA / "xinyun.txt", XINYUN_HEADER.format(pypinyin=pypinyin.__version__), build_xinyun())
    tang, ci = build_poems(args.poetry, t2s)
    POEMS.mkdir(parents=True, exist_ok=True)
    for name, poems in (("tang300_regulated.json", tang), ("ci.json", ci)):
        text = json.dumps(poems, ensure_ascii=False, indent=1)
        (POEMS / name).write_text(text + "\n", encoding="utf-8")
    print(f"{len(tang)} regulated Tang poems, {len(ci)} ci")


if __name__ == "__main__":
    main()
