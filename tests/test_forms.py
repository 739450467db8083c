"""Form machines: random walks through their masks always produce text the checker accepts,
whatever the tokenizer does to characters; the checkers themselves; and every form written end
to end by the bundled SmolLM2 under its constraint."""

import random
from dataclasses import replace

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


def assert_walks_keep(form, table, vocab_size: int, options: dict, seed: int, times: int, limit: int = 400):
    """Random walks through the form's machine all end in text its checker (a separate code
    path) accepts."""
    c = forms.make_constraint(form, table, vocab_size, options)
    rng = random.Random(seed)
    for _ in range(times):
        text = walk(c, table, rng, limit)
        assert forms.check(form, text, options) == [], repr(text)


def test_split_bytes():
    assert split_bytes("春".encode()[:2]) .tail == "春".encode()[:2]
    p = split_bytes("春".encode()[2:] + "风".encode() + "月".encode()[:1])
    assert (p.head, p.text, p.tail) == ("春".encode()[2:], "风", "月".encode()[:1])
    assert split_bytes(b"\xff\xfe") is None  # bytes that are no part of any UTF-8 text


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
    assert_walks_keep(form, table, table.size, options, seed=0, times=15)


def test_han_machine_with_byte_level_bpe(tiny_llm):
    """The tiny model's byte-level BPE has no Chinese at all: every character is three bytes,
    and tokens can end in the middle of one."""
    table = TokenTable(tiny_llm.tokenizer)
    form = forms.get_form("五言绝句")
    assert_walks_keep(form, table, tiny_llm.model.config.vocab_size, {}, seed=1, times=5)


VERSE_VOCAB = [w for w in ("The sea A night In Under Nothing Never And I".split())] + [
    " " + w for w in "sea night moon light silver river quiet waves again dark over broken tonight bright "
    "cold stone harbour window remember and the of a is was my we shore before".split()
] + [",", ".", "!", "\n"]


@pytest.mark.parametrize("name, options", [
    ("haiku", {}),
    ("sonnet", {}),
    ("sonnet", {"rhyme": False, "metre": "off"}),
    ("limerick", {}),
    ("acrostic", {"acrostic": "SEA"}),
])
def test_verse_machine(name, options):
    tok = word_tokenizer(VERSE_VOCAB + ["Silver", "Ending", "After", "Sea"])
    table = TokenTable(tok)
    form = forms.get_form(name)
    assert_walks_keep(form, table, table.size, options, seed=2, times=10, limit=800)


@pytest.mark.parametrize("name", ["slogan", "title", "tweet"])
def test_limit_machine(name, tiny_llm):
    table = TokenTable(tiny_llm.tokenizer)
    form = forms.get_form(name)
    assert_walks_keep(form, table, tiny_llm.model.config.vocab_size, {}, seed=3, times=10, limit=1000)


def test_checkers():
    jueju = forms.get_form("五言绝句")
    good = "春风吹柳绿，\n细雨润花红。\n燕子归来早，\n人间处处同。"
    assert forms.check(jueju, good) == []
    long_line = good.replace("细雨", "细细雨")
    assert forms.check(jueju, long_line) == ["line 2 is not 5 Han characters: '细细雨润花红。'"]
    unrhymed = good.replace("同", "绿")  # 红 (上平一东) and 绿 (入声, an oblique tone) do not rhyme
    assert forms.check(jueju, unrhymed, tones="off") == ["line 4 ends on 绿, not a 平 rhyme in 上平一东 (平水韵)"]
    # rhyme=False drops the rhyme, and only the rhyme: the rest of the form is still checked
    assert forms.check(jueju, good, rhyme=False) == []
    assert forms.check(jueju, unrhymed, rhyme=False, tones="off") == []
    assert forms.check(jueju, long_line, rhyme=False) == ["line 2 is not 5 Han characters: '细细雨润花红。'"]
    haiku = forms.get_form("haiku")
    assert forms.check(haiku, "An old silent pond\nA frog jumps into the pond\nsplash! Silence again") == []
    assert forms.check(haiku, "An old pond\nA frog\nsplash") == [
        "line 1 has 3 syllables, expected 5-5", "line 2 has 2 syllables, expected 7-7",
        "line 3 has 1 syllables, expected 5-5"]
    assert forms.check(forms.get_form("slogan"), "one two three") == []
    assert forms.check(forms.get_form("slogan"), " ".join(["word"] * 13)) == ["13 words (1-12 allowed)"]


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


# --- end to end: every form written by a bundled model -----------------------------------------

# (form, --var options): every form with what it needs (English rhyme and metre are on by
# default), then English forms with rhyme or metre off and a ghazal with a given radif
BUNDLED_CASES = [(name, {"藏头诗": {"acrostic": "春夏秋冬"}, "acrostic": {"acrostic": "MOON"}}.get(name, {}))
                 for name in forms.FORMS] + [("limerick", {"rhyme": "false"}), ("sonnet", {"metre": "off"}),
                                             ("ghazal", {"radif": "tonight", "couplets": "3"})]
TASKS = {"slogan": "slogan", "title": "title", "tweet": "social"}


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from llmos.llm import LLM

    return LLM.load(smollm2_dir)  # fp16, as `llmos write` loads it


@pytest.mark.bundled
def test_every_form_is_kept_with_the_bundled_model(smollm2):
    """`llmos write` for each form on SmolLM2 (whose byte-level vocabulary spells Chinese in
    pieces of characters): the task prompt, the form's machine over the real vocabulary, the
    engine and the text hook, and the checker accepts what comes out. The requests share one
    batch, as a server's would: the whole set takes about as long as the longest poem."""
    from llmos.engine.generate import Engine
    from llmos.writing.tasks import WriteRequest, prepare_write, truthy

    runs = []
    for name, variables in BUNDLED_CASES:
        brief = "秋夜" if forms.get_form(name).kind == "han" else "the sea at night"
        request = WriteRequest(TASKS.get(name, "poem"), brief, dict(variables), form=name)
        prompt, params, stops, form = prepare_write(smollm2, request)
        assert form.name == name and params.constraint is not None
        runs.append((form, variables, prompt, smollm2.request(prompt, replace(params, seed=1), 1, stops)))
    engine = Engine(smollm2.model, max_batch=len(runs), max_len=max(len(r.prompt) + r.params.max_tokens for *_, r in runs))
    for *_, req in runs:
        engine.add(req)
    while engine.has_work:
        assert not [e.text for e in engine.step() if e.finish_reason == "error"]
    for form, variables, prompt, req in runs:
        (c,) = smollm2.result(prompt, req).completions
        options = {k: truthy(v) if k == "rhyme" else v for k, v in variables.items()}
        assert c.finish_reason == "stop" and forms.check(form, c.text, **options) == [], (form.name, variables, c.text)
