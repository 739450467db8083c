"""Each sampler's semantics, on hand-made logits."""

import math

import pytest
import torch

from llmos.engine import sampling as S


def logits_of(probs):
    return torch.tensor([probs]).log()


def kept(logits):
    return [i for i, v in enumerate(logits[0].tolist()) if v != float("-inf")]


def test_top_k_keeps_k_best():
    assert kept(S.top_k_filter(logits_of([0.1, 0.4, 0.2, 0.3]), 2)) == [1, 3]
    assert kept(S.top_k_filter(logits_of([0.1, 0.4, 0.2, 0.3]), 0)) == [0, 1, 2, 3]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = [0.5, 0.2, 0.15, 0.1, 0.05]
    assert kept(S.top_p_filter(logits_of(probs), 0.5)) == [0]  # 0.5 reaches 0.5 by itself
    assert kept(S.top_p_filter(logits_of(probs), 0.6)) == [0, 1]
    assert kept(S.top_p_filter(logits_of(probs), 0.85)) == [0, 1, 2]
    assert kept(S.top_p_filter(logits_of(probs), 0.86)) == [0, 1, 2, 3]
    assert kept(S.top_p_filter(logits_of(probs), 0.01)) == [0]  # the top token always stays
    # order of the vocabulary does not matter
    assert kept(S.top_p_filter(logits_of([0.1, 0.2, 0.5, 0.15, 0.05]), 0.6)) == [1, 2]


def test_min_p_scales_with_the_top_token():
    probs = [0.6, 0.2, 0.1, 0.06, 0.04]
    assert kept(S.min_p_filter(logits_of(probs), 0.09)) == [0, 1, 2, 3]  # threshold 0.054
    assert kept(S.min_p_filter(logits_of(probs), 0.2)) == [0, 1]  # threshold 0.12
    assert kept(S.min_p_filter(logits_of(probs), 0.34)) == [0]  # threshold 0.204


def test_typical_keeps_tokens_near_the_entropy():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    entropy = -(probs * probs.log()).sum()
    order = (-probs.log() - entropy).abs().argsort().tolist()
    out = kept(S.typical_filter(probs.log()[None], 0.5))
    # the most typical tokens in order of typicality until their mass reaches 0.5
    mass, expected = 0.0, []
    for i in order:
        expected.append(i)
        mass += float(probs[i])
        if mass >= 0.5:
            break
    assert sorted(out) == sorted(expected)


def test_repetition_penalty_always_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = S.apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    out = S.apply_presence_frequency(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0]]


def test_no_repeat_ngram_bans_the_completing_token():
    logits = torch.zeros(1, 10)
    # history "1 2 3 1 2": the bigram (2, 3) exists, so after "2", token 3 is banned (n=2);
    # with n=3, trigram (1, 2, 3) exists and the history ends with "1 2": 3 is banned too
    for n in (2, 3):
        out = S.ban_repeated_ngrams(logits, [[1, 2, 3, 1, 2]], n)
        assert kept(out) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert kept(S.ban_repeated_ngrams(logits, [[1, 2, 3, 1, 2]], 4)) == list(range(10))


def test_logit_bias_and_banned_sequences():
    logits = torch.zeros(2, 5)
    out = S.apply_logit_bias(logits, {1: 5.0, 3: float("-inf")})
    assert out[0].tolist() == [0, 5, 0, float("-inf"), 0]
    out = S.ban_sequences(logits, [[7, 8], [7, 9]], [[8, 4], [2]])
    assert kept(out[0:1]) == [0, 1, 3]  # 2 always banned; 4 banned after 8
    assert kept(out[1:2]) == [0, 1, 3, 4]


def test_temperature_and_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert S.greedy(logits).tolist() == [1]
    assert torch.allclose(S.apply_temperature(logits, 0.5), logits * 2)
    with pytest.raises(ValueError, match="greedy"):
        S.apply_temperature(logits, 0.0)


def test_draw_is_reproducible_per_row_generator():
    logits = torch.randn(3, 50)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    a = S.draw(logits, gens)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    b = S.draw(logits, gens)
    assert a.tolist() == b.tolist()
    # a row's draw does not depend on its neighbours
    c = S.draw(logits[1:2], [torch.Generator().manual_seed(2)])
    assert c.tolist() == a[1:2].tolist()


def test_draw_follows_the_distribution():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([S.draw(probs.log(), [g]) for _ in range(3000)]), minlength=3)
    assert torch.allclose(counts / 3000, probs[0], atol=0.03)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("min_p", 1.0, "min_p"),
    ("top_k", -1, "top_k"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("presence_penalty", 3.0, "presence_penalty"),
    ("max_tokens", 0, "max_tokens"),
    ("logprobs", 50, "logprobs"),
    ("typical_p", 0.0, "typical_p"),
])
def test_invalid_parameters_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        S.SamplingParams(**{field: value})


def test_logprobs_of_reports_model_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    chosen, top_ids, top_lp = S.logprobs_of(logits, torch.tensor([0]), 2)
    assert chosen.item() == pytest.approx(math.log(0.25))
    assert top_ids.tolist() == [[1, 0]]
    assert top_lp[0].exp().tolist() == pytest.approx([0.75, 0.25])


def test_top_p_is_exact_for_peaked_flat_and_mixed_rows():
    def reference(logits, p):  # the textbook nucleus: sort everything
        probs = logits.softmax(dim=-1)
        values, order = probs.sort(dim=-1, descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, values.cumsum(-1) - values < p)
        return logits.masked_fill(~keep, float("-inf"))

    torch.manual_seed(0)
    peaky, flat = torch.randn(4, 5000) * 8, torch.randn(4, 5000)  # settle at the first floor, then the last
    mixed = torch.cat([peaky[:2], flat[:1], torch.randn(1, 5000) * 3, torch.randn(1, 5000) * 1.5])
    for logits in (peaky, flat, mixed):
        for p in (0.5, 0.9, 0.99):
            assert torch.equal(S.top_p_filter(logits, p), reference(logits, p))