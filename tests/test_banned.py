"""Banned strings that rewind and resample: the engine's Rewind, the text layer's BannedText,
the OpenAI routes' sampler extras and the CLI options, on the tiny random model."""

import re

import httpx
import openai
import pytest
import torch

from helpers import ServerThread, assert_clean_error, llmos
from llmos.engine.generate import Request, Rewind, run
from llmos.engine.sampling import SamplingParams
from llmos.llm import MAX_REWINDS, BannedText, banned_pattern

# The tiny model's favourite token is "e"; these biases make it write " the" in every spelling.
# ("thehe" does not hold the word "the": plain banned strings are whole words, as slop is counted.)
THE = re.compile(r"\bthe\b", re.IGNORECASE)
PUSH = [(" the", 30.0), (" t", 27.0), ("he", 27.0), (" The", 26.0), ("HE", 24.0)]


def push_the(llm) -> dict[int, float]:
    bias = {}
    for text, value in PUSH:
        for t in llm.tokenizer.encode(text, add_bos=False):
            bias[t] = value
    return bias


def params(llm, **kw):
    return llm.sampling(max_tokens=60, temperature=1.0, seed=1, logit_bias=push_the(llm), **kw)


def test_the_bias_makes_the_phrase_without_a_ban(tiny_llm):
    r = tiny_llm.generate("Once", params(tiny_llm), n=3)
    assert sum(len(THE.findall(c.text)) >= 5 for c in r.completions) >= 2


@pytest.mark.parametrize("n", [1, 3])
def test_a_banned_string_never_appears_in_any_case_or_spelling(tiny_llm, n):
    r = tiny_llm.generate("Once", params(tiny_llm), n=n, banned_strings=["THE"])
    for c in r.completions:
        assert not THE.search(c.text), c.text
        assert tiny_llm.tokenizer.decode(c.token_ids) == c.text  # the tokens kept are the text
        assert c.finish_reason == "length" and len(c.token_ids) == 60
    assert r.timings["generated_tokens"] > 60 * n  # it had to sample again


def test_the_stream_never_releases_text_it_takes_back(tiny_llm):
    from llmos.llm import Result

    result = Result("", 0, [])
    released = ["", "", ""]
    for d in tiny_llm.stream("Once", params(tiny_llm), n=3, result=result, banned_strings=["the"]):
        released[d.index] += d.text
        assert not THE.search(released[d.index])
    for c in result.completions:
        # what was streamed is exactly the text of the tokens that stayed
        assert released[c.index] == c.text == tiny_llm.tokenizer.decode(c.token_ids)


def test_a_regular_expression_bans_every_match(tiny_llm):
    r = tiny_llm.generate("Once", params(tiny_llm), n=2, banned_strings=[r"t\s*h"], banned_regex=True)
    for c in r.completions:
        assert "th" not in c.text.lower().replace(" ", ""), c.text
    with pytest.raises(ValueError, match="not a valid regular expression"):
        tiny_llm.generate("Once", params(tiny_llm), banned_strings=["(unclosed"], banned_regex=True)


def test_rewinds_are_bounded_so_generation_always_ends(tiny_llm):
    # every letter is banned, and letters are all the model writes: each position is rewound
    # MAX_REWINDS times, then its letter is let through
    letters = {tiny_llm.tokenizer.encode(c, add_bos=False)[0]: 50.0 for c in "abcdefghijklmnopqrstuvwxyz"}
    p = tiny_llm.sampling(max_tokens=5, temperature=1.0, seed=0, logit_bias=letters)
    r = tiny_llm.generate("Once", p, banned_strings=["[a-z]"], banned_regex=True)
    c = r.completions[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 5
    assert r.timings["generated_tokens"] >= 5 * (MAX_REWINDS + 1)
    b = BannedText(banned_pattern(["x"]))
    answers = [b.feed(0, "x ") for _ in range(MAX_REWINDS + 1)]
    assert answers[:MAX_REWINDS] == [Rewind(0)] * MAX_REWINDS and answers[-1] == "x "


def test_whole_words_and_chinese_phrases():
    pattern = banned_pattern(["delve into", "眼中闪过"])
    b = BannedText(pattern)
    out = "".join(b.feed(i, piece) for i, piece in enumerate(["We", " delve", " intone", " it."]))
    assert out == "We delve intone it."[: len(out)] and isinstance(b.finish(), str)
    b = BannedText(pattern)
    assert [b.feed(i, piece) for i, piece in enumerate(["他", "眼中", "闪"])] == ["他", "", ""]
    assert b.feed(3, "过") == Rewind(1)  # back to the token where the phrase began, at once
    # a whole word at the very end is decided only by the end
    b = BannedText(pattern)
    assert b.feed(0, "Let us") == "Let us" and b.feed(1, " delve into") == ""
    assert b.at_end() == Rewind(1)


class RewindOnce:
    """A hook that takes candidate 0 back once, from its 4th output token to 2 kept."""

    def __init__(self):
        self.count, self.done = 0, False

    def token(self, index, token):
        self.count += 1
        if self.count == 4 and not self.done:
            self.done = True
            return "", Rewind(2)
        return "", False

    def finish(self, index):
        return ""


def greedy_reference(model, prompt, n, exclude=None):
    """Greedy the slow way (a full forward pass per token, no cache); `exclude` (position, token)."""
    ids = list(prompt)
    with torch.no_grad():
        for i in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            if exclude and exclude[0] == i:
                logits[exclude[1]] = float("-inf")
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def test_the_engine_rewinds_a_row_and_excludes_the_token_it_took(tiny_llm):
    model = tiny_llm.model
    prompt = [5, 9, 77, 120, 3]
    plain = greedy_reference(model, prompt, 12)
    req = Request(prompt, SamplingParams(temperature=0, max_tokens=12), hook=RewindOnce())
    for _ in run(model, req):
        pass
    out = req.sequences[0].output
    assert out[:2] == plain[:2] and out[2] != plain[2]
    # the rest is what the model writes after the new token, as if nothing had been rewound
    assert out == greedy_reference(model, prompt, 12, exclude=(2, plain[2]))


@pytest.fixture(scope="module")
def server(tiny_llm, tmp_path_factory):
    from llmos.db import Store
    from llmos.server.app import create_app

    s = ServerThread(create_app(tiny_llm, store=Store(tmp_path_factory.mktemp("db") / "llmos.db")))
    yield s
    s.stop()


def test_openai_routes_accept_the_sampler_extras(server, tiny_llm):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    extras = {"min_p": 0.05, "top_a": 0.1, "typical_p": 0.95, "tfs": 0.95, "xtc_threshold": 0.1,
              "xtc_probability": 0.5, "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2,
              "dry_sequence_breakers": '["\\n", ":", "\\""]', "samplers": ["penalties", "dry", "top_n_sigma", "top_k",
                                                                           "typ_p", "tfs_z", "top_p", "min_p", "xtc",
                                                                           "temperature"],
              "banned_strings": ["the"], "logit_bias": {" the": 30, " t": 27, "he": 27}}
    r = client.completions.create(model=tiny_llm.name, prompt="Once", max_tokens=40, seed=1, n=2, extra_body=extras)
    assert all(not THE.search(c.text) for c in r.choices)
    chunks = client.chat.completions.create(model=tiny_llm.name, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=30, seed=1, stream=True, extra_body=extras)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert not THE.search(text)
    # what SillyTavern's text completion sends besides: KoboldCpp's order, [] for no bias, unknown samplers
    body = {"prompt": "Once", "max_tokens": 8, "sampler_order": [6, 0, 1, 3, 4, 2, 5], "logit_bias": [],
            "rep_pen": 1.1, "custom_token_bans": "", "mirostat_mode": 0, "smoothing_factor": 0, "nsigma": 0,
            "ban_eos_token": False, "skip_special_tokens": True, "slop": "en", "banned_regex": False}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param, needle", [
    ({"prompt": "x", "frobnicate": 1}, "frobnicate", "frobnicate"),
    ({"prompt": "x", "xtc_probability": 2}, "xtc_probability", "xtc_probability"),
    ({"prompt": "x", "samplers": ["temperature", "nucleus"]}, "sampler_order", "nucleus"),
    ({"prompt": "x", "sampler_order": [9]}, "sampler_order", "0-6"),
    ({"prompt": "x", "banned_strings": ["("], "banned_regex": True}, None, "regular expression"),
])
def test_openai_routes_refuse_unknown_fields_and_bad_values(server, body, param, needle):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"]
    if param:
        assert err["param"] == param


@pytest.mark.parametrize("args, needle", [
    (["--xtc-probability", "2"], "xtc_probability must be in [0, 1]"),
    (["--sampler-order", "temperature,nucleus"], "unknown sampler 'nucleus'"),
    (["--slop", "fr"], "no slop list for language 'fr'"),
    (["--banned-strings", "(", "--banned-regex"], "not a valid regular expression"),
    (["--banned-file", "no-such-file.txt"], "cannot be read"),
])
def test_cli_bad_sampler_values_exit_2(tiny_dir, tmp_path, args, needle):
    proc = llmos("generate", "Once", "-m", str(tiny_dir), "--max-tokens", "4", "--safety", "off", *args, home=tmp_path)
    assert_clean_error(proc, needle)


def test_cli_generate_bans_strings_from_a_file(tiny_dir, tmp_path):
    banned = tmp_path / "banned.txt"
    banned.write_text("# the tiny model's favourite letter\ne\n")
    proc = llmos("generate", "Once", "-m", str(tiny_dir), "--max-tokens", "12", "--seed", "1", "--json",
                 "--banned-file", str(banned), "--banned-regex", "--xtc-probability", "0.5", "--top-a", "0.1",
                 "--tfs", "0.95", "--sampler-order", "min_p,temperature", "--safety", "off", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json

    text = json.loads(proc.stdout)["completions"][0]["text"]
    assert text and "e" not in text.lower()


def test_cli_write_refuses_a_bad_sampler_value(tiny_dir, tmp_path):
    proc = llmos("write", "story", "a storm", "-m", str(tiny_dir), "--xtc-threshold", "3", "--safety", "off",
                 home=tmp_path)
    assert_clean_error(proc, "xtc_threshold must be in [0, 1]")


def test_logit_bias_by_token_id_text_or_llamacpp_pairs(tiny_llm):
    from llmos.server.protocol import CompletionRequest

    vocab = tiny_llm.model.config.vocab_size
    the = tiny_llm.tokenizer.encode(" the", add_bos=False)
    by_text = CompletionRequest(prompt="x", logit_bias={" the": 5, "7": -2}).token_bias(tiny_llm.tokenizer, vocab)
    assert by_text == {**{t: 5.0 for t in the}, 7: -2.0}
    pairs = CompletionRequest(prompt="x", logit_bias=[[" the", False], [7, 3]]).token_bias(tiny_llm.tokenizer, vocab)
    assert pairs == {**{t: -100.0 for t in the}, 7: 3.0}
    assert CompletionRequest(prompt="x", logit_bias=[]).logit_bias is None  # SillyTavern's "no bias"


def test_cli_story_continue_bans_strings(tiny_dir, tmp_path):
    path = tmp_path / "tale.json"
    assert llmos("story", "new", str(path), "--text", "Once the sea was quiet.", home=tmp_path).returncode == 0
    proc = llmos("story", "continue", str(path), "-m", str(tiny_dir), "--max-tokens", "12", "--seed", "1",
                 "--banned-strings", "e", "--xtc-probability", "0.5", "--safety", "off", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from llmos.writing.story import Story

    added = Story.load(path).text[len("Once the sea was quiet."):]
    assert added and "e" not in added.lower()  # the tiny model's favourite letter, banned
    bad = llmos("story", "continue", str(path), "-m", str(tiny_dir), "--xtc-threshold", "3", home=tmp_path)
    assert_clean_error(bad, "xtc_threshold must be in [0, 1]")
