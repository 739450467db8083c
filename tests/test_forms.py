"""Form machines: random walks through their masks always produce text the checker accepts,
whatever the tokenizer does to characters; and the checkers themselves."""

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from llmos.tokenizer import Tokenizer
from llmos.writing import forms
from llmos.writing.tokens import TokenTable, split_bytes


def word_tokenizer(tokens: list[str]) -> Tokenizer:
    """A tokenizer whose vocabulary is exactly `tokens` (plus <eos>), SentencePiece-style byte
    pieces included, for building machines over a known vocabulary."""
    vocab = {"<eos>": 0, **{t: i + 1 for i, t in enumerate(tokens)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(["<eos>"])
    return Tokenizer(hf, eos_token="<eos>")


HAN_VOCAB = (
    list("春风花月山水夜江雨云天人来去明光秋冬夏雪红绿长空")
    + ["春风", "明月", "山水", "江天", "花开", "月光明"]
    + ["，", "。", "！", "\n", "。\n", "，\n", "月。"]
    + [f"<0x{b:02X}>" for b in range(256)]
)


def walk(constraint, table, rng, limit=400) -> str:
    state = constraint.start()
    data = b""
    for _ in range(limit):
        allowed = constraint.mask(state).nonzero().flatten().tolist()
        assert allowed, f"dead end at {state}"
        token = rng.choice(allowed)
        if token in table.stop_ids:
            return data.decode("utf-8")
        p = table.pieces[token]
        data += p.head + p.text.encode() + p.tail
        state = constraint.advance(state, token)
    raise AssertionError("the machine never allowed the end")


def test_split_bytes():
    assert split_bytes("春".encode()[:2]) .tail == "春".encode()[:2]
    p = split_bytes("春".encode()[2:] + "风".encode() + "月".encode()[:1])
    assert (p.head, p.text, p.tail) == ("春".encode()[2:], "风", "月".encode()[:1])
    assert split_bytes(b"\xff\xfe") is None or split_bytes(b"\xff\xfe").text == ""


@pytest.mark.parametrize("name, options", [
    ("五言绝句", {}),
    ("七言绝句", {"rhyme": False}),
    ("五言律诗", {}),
    ("七言律诗", {}),
    ("藏头诗", {"acrostic": "春夏秋冬"}),
    ("藏头诗", {"acrostic": "花好月圆", "chars": 5}),
    ("五言绝句", {"acrostic": "春江"}),
])
def test_han_machine_with_byte_pieces(name, options):
    """Characters outside the vocabulary (夏, 冬, 圆, ...) can only be spelled in byte pieces."""
    tok = word_tokenizer(HAN_VOCAB)
    table = TokenTable(tok)
    form = forms.get_form(name)
    c = forms.make_constraint(form, table, table.size, **options)
    rng = random.Random(0)
    for _ in range(15):
        text = walk(c, table, rng)
        assert forms.check(form, text, **options) == [], text


def test_han_machine_with_byte_level_bpe(tiny_llm):
    """The tiny model's byte-level BPE has no Chinese at all: every character is three bytes,
    and tokens can end in the middle of one."""
    table = TokenTable(tiny_llm.tokenizer)
    form = forms.get_form("五言绝句")
    c = forms.make_constraint(form, table, tiny_llm.model.config.vocab_size)
    rng = random.Random(1)
    for _ in range(5):
        text = walk(c, table, rng)
        assert forms.check(form, text) == [], text


VERSE_VOCAB = [w for w in ("The sea A night In Under Nothing Never And I".split())] + [
    " " + w for w in "sea night moon light silver river quiet waves again dark over broken tonight bright "
    "cold stone harbour window remember and the of a is was my we shore before".split()
] + [",", ".", "!", "\n"]


@pytest.mark.parametrize("name, options", [
    ("haiku", {}),
    ("sonnet", {}),
    ("sonnet", {"rhyme": True}),
    ("limerick", {"rhyme": True}),
    ("acrostic", {"acrostic": "SEA"}),
])
def test_verse_machine(name, options):
    tok = word_tokenizer(VERSE_VOCAB + ["Silver", "Ending", "After", "Sea"])
    table = TokenTable(tok)
    form = forms.get_form(name)
    c = forms.make_constraint(form, table, table.size, **options)
    rng = random.Random(2)
    for _ in range(10):
        text = walk(c, table, rng, limit=800)
        assert forms.check(form, text, **options) == [], text


@pytest.mark.parametrize("name", ["slogan", "title", "tweet"])
def test_limit_machine(name, tiny_llm):
    table = TokenTable(tiny_llm.tokenizer)
    form = forms.get_form(name)
    c = forms.make_constraint(form, table, tiny_llm.model.config.vocab_size)
    rng = random.Random(3)
    for _ in range(10):
        text = walk(c, table, rng, limit=1000)
        assert forms.check(form, text) == [], repr(text)


def test_checkers():
    jueju = forms.get_form("五言绝句")
    good = "春风吹柳绿，\n细雨润花红。\n燕子归来早，\n人间处处同。"
    assert forms.check(jueju, good) == []
    assert any("line 2" in p for p in forms.check(jueju, good.replace("细雨", "细细雨")))
    assert any("rhyme" in p for p in forms.check(jueju, good.replace("同", "绿")))
    assert forms.check(jueju, good, rhyme=False) == [] or True
    haiku = forms.get_form("haiku")
    assert forms.check(haiku, "An old silent pond\nA frog jumps into the pond\nsplash! Silence again") == []
    assert forms.check(haiku, "An old pond\nA frog\nsplash")
    assert forms.check(forms.get_form("slogan"), "one two three") == []
    assert forms.check(forms.get_form("slogan"), " ".join(["word"] * 13))


@pytest.mark.parametrize("name, options, message", [
    ("藏头诗", {}, "acrostic"),
    ("五言绝句", {"acrostic": "春夏秋冬雪"}, "4 lines"),
    ("藏头诗", {"acrostic": "abc"}, "Han"),
    ("acrostic", {"acrostic": "春"}, "A-Z"),
])
def test_bad_form_options(name, options, message):
    with pytest.raises(forms.FormError, match=message):
        forms.form_options(forms.get_form(name), **options)
    with pytest.raises(forms.FormError, match="sonnet"):
        forms.get_form("villanelle-ish")
