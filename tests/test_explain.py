"""Explanations: gradient x input per generated token (checked against finite differences),
prompt parts with offsets that point into the prompt, and the overlap of retrieval answers."""

import json

import pytest
import torch

from llmos.explain import (MAX_COMPLETION_TOKENS, ExplainError, _log_probs, answer_overlap, explain_tokens,
                           float_model, gradient_x_input, prompt_units, token_spans)


def log_prob(model, ids, position, scale_at=None, scale=1.0):
    """log p(ids[position] | ids[:position]), with the embedding at scale_at multiplied by scale."""

    def scaled(module, args, out):
        out = out.clone()
        out[:, scale_at] *= scale
        return out

    handle = model.embed.register_forward_hook(scaled) if scale_at is not None else None
    try:
        with torch.enable_grad():  # the same (unfused) kernels as the gradient; nothing requires grad
            hidden = model(torch.tensor([ids]), return_hidden=True)[0]
            return float(_log_probs(model, hidden, ids, [position])[0])
    finally:
        if handle:
            handle.remove()


def test_gradient_x_input_matches_finite_differences(tiny_llm):
    # d/dt log p at embedding e_i scaled by (1 + t), at t = 0, is exactly gradient . input
    model = tiny_llm.model
    ids = tiny_llm.tokenizer.encode("a cat sat on the mat")
    positions = [len(ids) - 3, len(ids) - 1]
    logp, dots, norms = gradient_x_input(model, ids, positions)

    def slope(p, i, eps):
        return (log_prob(model, ids, p, i, 1 + eps) - log_prob(model, ids, p, i, 1 - eps)) / (2 * eps)

    for row, p in enumerate(positions):
        assert logp[row] == pytest.approx(log_prob(model, ids, p), abs=1e-5)
        for i in range(p):
            # central differences, Richardson-extrapolated: steps large enough that float32
            # rounding of the log-probabilities stays far below the difference
            numeric = (4 * slope(p, i, 0.05) - slope(p, i, 0.1)) / 3
            assert float(dots[row, i]) == pytest.approx(numeric, rel=1e-2, abs=5e-5)
        assert float(dots[row, p:].abs().sum()) == 0.0 and float(norms[row, p:].sum()) == 0.0
    one_by_one = gradient_x_input(model, ids, positions, chunk=1)
    assert torch.allclose(one_by_one[2], norms, atol=1e-6)


def test_units_point_into_the_prompt(tiny_llm):
    text = "Hello, world's end\n  你好 again\n"
    ids = tiny_llm.tokenizer.encode(text)
    spans = token_spans(tiny_llm.tokenizer, ids, text)
    assert all(s is not None for s in spans)
    words = prompt_units(text, spans, "word")
    assert [text[a:b] for a, b, _ in words] == ["Hello", ",", "world", "'", "s", "end", "你", "好", "again"]
    assert sorted(k for _, _, ks in words for k in ks) == list(range(len(ids)))  # every token in one word
    lines = prompt_units(text, spans, "line")
    assert [text[a:b] for a, b, _ in lines] == ["Hello, world's end", "你好 again"]
    tokens = prompt_units(text, spans, "token")
    assert "".join(text[a:b] for a, b, _ in tokens) == text  # a character's bytes share one unit
    assert all(text[a:b] for a, b, _ in tokens)


def test_explain_tokens_weights_and_probabilities(tiny_llm):
    prompt, completion = "one two three\nfour five", " six seven"
    atts = explain_tokens(tiny_llm, prompt, completion, unit="word", top=100)
    out_ids = tiny_llm.tokenizer.encode(completion, add_bos=False)
    assert [a.token_id for a in atts] == out_ids and [a.index for a in atts] == list(range(len(out_ids)))
    ids = tiny_llm.encode_prompt(prompt) + out_ids
    with torch.no_grad():
        probs = tiny_llm.model(torch.tensor([ids]))[0].softmax(-1)
    P = len(ids) - len(out_ids)
    for a in atts:
        assert a.probability == pytest.approx(float(probs[P + a.index - 1, a.token_id]), abs=1e-5)
        assert sorted(s.text for s in a.sources) == sorted(["one", "two", "three", "four", "five"])
        assert sum(s.weight for s in a.sources) == pytest.approx(1.0, abs=1e-4)
        assert [s.weight for s in a.sources] == sorted((s.weight for s in a.sources), reverse=True)
        assert all(prompt[s.start : s.end] == s.text for s in a.sources)
        assert 0.0 < a.prompt_share <= 1.0
    assert atts[0].prompt_share == pytest.approx(1.0)  # the first token has only the prompt before it
    json.dumps([a.as_dict() for a in atts])

    top2 = explain_tokens(tiny_llm, prompt, out_ids, unit="line", top=2, indices=[2])
    assert len(top2) == 1 and top2[0].index == 2 and [s.text for s in top2[0].sources] in (
        ["one two three", "four five"], ["four five", "one two three"])
    chat = explain_tokens(tiny_llm, [{"role": "user", "content": "Name a colour"}], "Red", unit="token")
    rendered = tiny_llm.tokenizer.render_chat([{"role": "user", "content": "Name a colour"}])
    assert all(rendered[s.start : s.end] == s.text for a in chat for s in a.sources)


def test_a_packed_model_is_explained_on_a_float_copy_loaded_once(tiny_llm, tiny_dir):
    from llmos.llm import LLM
    from llmos.weights.store import load_checkpoint

    packed = LLM(load_checkpoint(tiny_dir, "fp16"))  # float16 kernels: no gradients
    assert float_model(packed) is float_model(packed) is not packed.model
    assert float_model(tiny_llm) is tiny_llm.model
    prompt = "the sea at night"
    mine, reference = (explain_tokens(m, prompt, " is dark", unit="token", top=3) for m in (packed, tiny_llm))
    assert [a.as_dict() for a in mine] == [a.as_dict() for a in reference]


@pytest.mark.parametrize("kwargs, completion, needle", [
    (dict(unit="sentence"), "x", "unit must be one of"),
    (dict(method="saliency"), "x", "method must be one of"),
    (dict(top=0), "x", "top must be"),
    ({}, "", "completion is empty"),
    ({}, "x" * (MAX_COMPLETION_TOKENS + 1), f"at most {MAX_COMPLETION_TOKENS}"),
    (dict(indices=[5]), "xy", "indices must lie in"),
])
def test_bad_requests_say_what_to_change(tiny_llm, kwargs, completion, needle):
    with pytest.raises(ExplainError, match=needle):
        explain_tokens(tiny_llm, "a prompt", completion, **kwargs)


def test_a_remote_model_cannot_be_explained():
    from llmos.remote import RemoteLLM, RemoteModel

    remote = RemoteLLM(RemoteModel("far-away", "openai", "http://127.0.0.1:9", "m"))
    with pytest.raises(ExplainError, match="far-away runs remotely"):
        explain_tokens(remote, "a prompt", "x")


def test_prompt_longer_than_the_window(tiny_llm):
    with pytest.raises(ExplainError, match="shorten the prompt"):
        explain_tokens(tiny_llm, "z" * tiny_llm.context_window, "x")
    with pytest.raises(ExplainError, match="prompt is empty"):
        explain_tokens(tiny_llm, "", "x")


def test_answer_overlap_in_english():
    passages = ["The shop opens at nine on weekdays and at ten on Sunday.", "Returns are free within 30 days."]
    answer = "On Sunday the shop opens at ten [1]. Returns are free."
    r = answer_overlap(answer, passages)
    # trigrams: on sunday the | sunday the shop | the shop opens* | shop opens at* | opens at ten |
    # at ten returns | ten returns are | returns are free* ([1] is not a word)
    assert r["n"] == 3
    assert r["overlap"] == pytest.approx(3 / 8, abs=1e-4)
    assert r["per_passage"] == [pytest.approx(2 / 8, abs=1e-4), pytest.approx(1 / 8, abs=1e-4)]
    assert [answer[s["start"] : s["end"]] for s in r["spans"]] == ["the shop opens at", "Returns are free"]
    assert [s["passages"] for s in r["spans"]] == [[0], [1]]
    assert answer_overlap("Nothing like it.", passages)["overlap"] == 0.0
    assert answer_overlap("", passages) == {"overlap": 0.0, "per_passage": [0.0, 0.0], "n": 1, "spans": []}


def test_answer_overlap_in_chinese_and_with_hits():
    from llmos.chat.kb import Hit

    hits = [Hit(0.8, "faq.md", "", "本店周一至周五九点开门，周日十点开门。")]
    r = answer_overlap("周日十点开门。", hits)
    assert r["n"] == 4 and r["overlap"] == 1.0 and r["spans"] == [{"start": 0, "end": 6, "passages": [0]}]
    r = answer_overlap("我们周日十点开门", hits)  # 我们周日 们周日十 | 周日十点 日十点开 十点开门
    assert r["overlap"] == pytest.approx(3 / 5, abs=1e-4)


def test_chat_answer_from_a_knowledge_base_carries_its_overlap(tiny_llm, tmp_path):
    from llmos.chat.conversation import ChatSettings, Conversation
    from llmos.chat.kb import Hit
    from llmos.chat.sessions import Sessions
    from llmos.db import Store

    class Shelf:  # a knowledge base of one passage
        name = "shelf"

        def faq_answer(self, text, threshold):
            return None

        def search(self, text, k):
            return [Hit(0.61, "shop.md", "Hours", "We open at nine.", passage_id=7)]

    conv = Conversation(tiny_llm, Sessions(Store(tmp_path / "chat.db")), persona="support", kb=Shelf(),
                        settings=ChatSettings(max_tokens=4, seed=1))
    reply = "".join(conv.send("When do you open?"))
    assert "Sources: [1] shop.md - Hours" in reply
    meta = conv.turns()[-1]["meta"]
    assert meta["passages"] == [7] and meta["scores"] == [0.61]
    assert set(meta["overlap"]) == {"overlap", "per_passage", "n", "spans"} and len(meta["overlap"]["per_passage"]) == 1


@pytest.mark.bundled
def test_smollm2_attributes_a_fact_and_a_copy_to_the_right_words(smollm2_dir):
    from llmos.llm import LLM
    from llmos.weights.store import load_checkpoint

    llm = LLM(load_checkpoint(smollm2_dir, "fp32"))  # as the float copy of the quantized model would be
    fact = explain_tokens(llm, "The Eiffel Tower is located in the city of", " Paris")
    assert fact[0].sources[0].text == "Eiffel" and fact[0].probability > 0.3
    name = "My friend's name is Zorblat. I met him yesterday. His name is"
    copy = explain_tokens(llm, name, " Zorblat", unit="word", top=3)
    for a in copy:  # every piece of the copied name points at its first occurrence
        assert a.sources[0].text == "Zorblat" and name[a.sources[0].start : a.sources[0].end] == "Zorblat"
        assert a.sources[0].start == name.index("Zorblat")


def test_the_chat_cli_prints_the_overlap_after_the_sources(capsys):
    from llmos.cli.chat import _print_overlap

    class Chat:
        def turns(self):
            overlap = {"overlap": 0.375, "per_passage": [0.25, 0.125], "n": 3, "spans": []}
            return [{"role": "user", "meta": {}}, {"role": "assistant", "meta": {"overlap": overlap}}]

    _print_overlap(Chat())
    assert "overlap with the sources: 38% of the answer's 3-grams ([1] 25%, [2] 12%)" in capsys.readouterr().err
