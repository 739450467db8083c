"""The engine on a tiny random model converted from a real GGUF file."""

import pytest
import torch

from llmos.engine.beam import beam_search
from llmos.engine.generate import ContextError, Engine, Request, generate, run
from llmos.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tiny_llm):
    return tiny_llm.model


def reference_greedy(model, prompt, n):
    """Greedy decoding the slow way: a full forward pass per token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_matches_full_forward_decoding(model):
    prompt = [5, 9, 77, 120, 3]
    (seq,) = generate(model, prompt, SamplingParams(temperature=0, max_tokens=20))
    assert seq.output == reference_greedy(model, prompt, 20)
    assert seq.finish_reason == "length"


def test_candidates_share_a_prefill_and_are_seeded(model):
    params = SamplingParams(temperature=3.0, max_tokens=12, seed=7)
    three = generate(model, [10, 20, 30], params, n=3)
    again = generate(model, [10, 20, 30], params, n=3)
    one = generate(model, [10, 20, 30], params, n=1)
    assert [s.output for s in three] == [s.output for s in again]
    assert three[0].output == one[0].output  # candidate i draws from seed + i
    assert len({tuple(s.output) for s in three}) > 1
    other = generate(model, [10, 20, 30], SamplingParams(temperature=3.0, max_tokens=12, seed=8))
    assert other[0].output != one[0].output


def test_stop_token_and_max_tokens(model):
    prompt = [5, 9, 77]
    ref = reference_greedy(model, prompt, 10)
    stop_at = ref[4]
    first = ref.index(stop_at)
    (seq,) = generate(model, prompt, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]))
    assert seq.output == ref[: first + 1] and seq.finish_reason == "stop"


def test_stopping_some_candidates_leaves_the_others_unchanged(model):
    params = SamplingParams(temperature=0.9, max_tokens=16, seed=3)
    full = generate(model, [1, 2, 3], params, n=4)
    req = Request([1, 2, 3], params, n=4)
    for step_no, _ in enumerate(run(model, req)):
        if step_no == 2:
            req.stop(0)
            req.stop(2)
    assert len(req.sequences[0].output) == 3 and req.sequences[0].finish_reason == "stop"
    assert req.sequences[1].output == full[1].output
    assert req.sequences[3].output == full[3].output


def test_context_window_is_enforced(model):
    ctx = model.config.max_seq_len
    with pytest.raises(ContextError, match="context window"):
        generate(model, [1] * ctx, SamplingParams(max_tokens=1))
    with pytest.raises(ContextError, match="empty"):
        generate(model, [], SamplingParams(max_tokens=1))
    (seq,) = generate(model, [1] * (ctx - 5), SamplingParams(temperature=0, max_tokens=50))
    assert len(seq.output) == 5 and seq.finish_reason == "length"


def test_out_of_vocabulary_prompt_is_rejected(model):
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [model.config.vocab_size + 3], SamplingParams(max_tokens=1))


def test_logprobs_are_the_models(model):
    prompt = [4, 8, 15, 16]
    (seq,) = generate(model, prompt, SamplingParams(temperature=0, max_tokens=5, logprobs=3))
    ids = prompt + seq.output
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    for i, lp in enumerate(seq.logprobs):
        pos = len(prompt) - 1 + i
        assert lp.token == seq.output[i]
        assert lp.logprob == pytest.approx(float(logp[pos, lp.token]), abs=1e-4)
        assert [t for t, _ in lp.top][0] == lp.token  # greedy: the chosen token is the top one
        assert len(lp.top) == 3


def test_penalties_change_the_output(model):
    prompt = [5, 9, 77]
    plain = generate(model, prompt, SamplingParams(temperature=0, max_tokens=30))[0].output
    penalised = generate(model, prompt, SamplingParams(temperature=0, max_tokens=30, no_repeat_ngram_size=2))[0].output
    bigrams = list(zip(penalised, penalised[1:]))
    assert len(bigrams) == len(set(bigrams))
    if len(set(zip(plain, plain[1:]))) < len(plain) - 1:
        assert penalised != plain


def sequence_logprob(model, prompt, tokens):
    with torch.no_grad():
        logp = model(torch.tensor([prompt + tokens]))[0].log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))


def test_beam_search(model):
    prompt = [7, 7, 42]
    greedy = reference_greedy(model, prompt, 8)
    (one,) = beam_search(model, prompt, beams=1, max_tokens=8, stop_token_ids=[])
    assert one.tokens == greedy
    hyps = beam_search(model, prompt, beams=4, max_tokens=8, stop_token_ids=[], n=3)
    assert len(hyps) == 3
    assert [h.normalized for h in hyps] == sorted((h.normalized for h in hyps), reverse=True)
    for h in hyps:
        assert h.score == pytest.approx(sequence_logprob(model, prompt, h.tokens), abs=1e-3)
    assert hyps[0].score >= sequence_logprob(model, prompt, greedy) - 1e-4
    with pytest.raises(ValueError, match="beams"):
        beam_search(model, prompt, beams=2, max_tokens=4, stop_token_ids=[], n=3)
