"""The text layer: streaming detokenisation, stop strings, chat templates, truncation."""

import pytest

from llmos.engine.generate import ContextError
from llmos.llm import StopStrings


def test_stop_strings_cut_and_never_leak():
    cut = StopStrings(["\nUser:", "THE END"])
    pieces = ["Once", " upon", " a time\nU", "se", "r: more"]
    out = "".join(cut.feed(p) for p in pieces)
    assert out == "Once upon a time" and cut.hit
    cut = StopStrings(["###"])
    assert [cut.feed(p) for p in ["a#", "b#", "#"]] == ["a", "#b", ""]  # '#', '##' held back
    assert cut.finish() == "##" and not cut.hit  # released when the text ends without '###'



def test_stream_decoder_handles_split_characters(tiny_llm):
    tok = tiny_llm.tokenizer
    text = "naïve 你好, the café 🙂"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # byte-level: multi-byte characters span tokens
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_generate_text_with_stop_strings(tiny_llm):
    full = tiny_llm.generate("the", tiny_llm.sampling(temperature=0, max_tokens=40))
    text = full.completions[0].text
    assert len(text) > 4
    stop = text[3:5]
    cut = tiny_llm.generate("the", tiny_llm.sampling(temperature=0, max_tokens=40), stop=[stop])
    assert cut.completions[0].text == text[: text.index(stop)]
    assert cut.completions[0].finish_reason == "stop"


def test_streamed_text_equals_result(tiny_llm):
    from llmos.llm import Result

    result = Result("", 0, [])
    params = tiny_llm.sampling(temperature=0.8, max_tokens=30, seed=1)
    texts = ["", ""]
    for d in tiny_llm.stream("the cat", params, n=2, result=result):
        texts[d.index] += d.text
    assert all(texts) and texts == [c.text for c in result.completions]
    assert [len(c.token_ids) for c in result.completions] == [30, 30]  # neither candidate stopped early
    assert result.timings["generated_tokens"] == 60  # both candidates' tokens


def test_chat_template_is_used(tiny_llm):
    ids = tiny_llm.encode_prompt([{"role": "user", "content": "hi"}])
    text = tiny_llm.tokenizer.decode(ids, skip_special=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_llm.encode_prompt("hi", chat=True) == ids


def test_long_prompt_error_or_left_truncation(tiny_llm):
    ctx = tiny_llm.context_window
    long = "the " * ctx
    with pytest.raises(ContextError, match="context window"):
        tiny_llm.generate(long, tiny_llm.sampling(max_tokens=4))
    result = tiny_llm.generate(long + "END", tiny_llm.sampling(temperature=0, max_tokens=4), truncate="left")
    assert result.truncated_tokens > 0
    assert result.prompt_tokens < ctx
    assert result.prompt.endswith("END")


def test_beam_search_text(tiny_llm):
    result = tiny_llm.beam_search("the", beams=3, max_tokens=6, n=2)
    assert len(result.completions) == 2
    assert result.completions[0].score >= result.completions[1].score
