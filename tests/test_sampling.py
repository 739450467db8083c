"""Each sampler's semantics, on hand-made logits."""

import math

import pytest
import torch

from llmos.engine import sampling as S


@pytest.fixture(params=["torch", "kernels"])
def sampling_path(request, monkeypatch):
    """Top-p's first floor and the draw among its kept tokens run in the compiled kernels when
    they are loaded, else in PyTorch: the tests that take this fixture run both ways."""
    import llmos.kernels as kernels

    if request.param == "kernels" and not kernels.available():
        pytest.skip("the compiled kernels cannot be built here")
    monkeypatch.setattr(kernels, "_loaded", request.param == "kernels")
    return request.param


def logits_of(probs):
    return torch.tensor([probs]).log()


def kept(logits):
    return [i for i, v in enumerate(logits[0].tolist()) if v != float("-inf")]


def test_top_k_keeps_k_best():
    assert kept(S.top_k_filter(logits_of([0.1, 0.4, 0.2, 0.3]), 2)) == [1, 3]
    assert kept(S.top_k_filter(logits_of([0.1, 0.4, 0.2, 0.3]), 0)) == [0, 1, 2, 3]


def test_top_p_keeps_smallest_set_reaching_p(sampling_path):
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


def test_a_row_cut_to_few_tokens_draws_as_the_whole_row_would():
    """draw takes the live tokens of a mostly -inf row apart; the token is the one the
    whole-row inverse CDF gives for the same uniform number."""
    torch.manual_seed(0)
    logits = torch.full((2, 4000), float("-inf"))
    logits[0, torch.randperm(4000)[:40]] = torch.randn(40) * 2  # 1% live: drawn among the 40
    logits[1] = torch.randn(4000)  # all live: the whole row
    for seed in range(100):
        got = S.draw(logits, [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1000)])
        for row, s in ((0, seed), (1, seed + 1000)):
            cdf = logits[row].softmax(-1).cumsum(-1)
            u = torch.rand(1, generator=torch.Generator().manual_seed(s)) * cdf[-1]
            want = torch.searchsorted(cdf, u, right=True).clamp(max=3999).item()
            assert got[row].item() == want, (seed, row)
            assert logits[row, want] > float("-inf")


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


def test_top_p_is_exact_for_peaked_flat_and_mixed_rows(sampling_path):
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

def test_the_draw_takes_top_ps_kept_tokens_as_a_pass_over_the_vocabulary_finds_them(sampling_path):
    """sample() hands top-p's kept tokens to the draw (no pass over the vocabulary to find the
    live ones); the tokens drawn are those of the plain draw of the same filtered logits."""
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(3, 20000) * 6, torch.randn(2, 20000) * 0.3])  # few kept / most kept
    logits[0, 100:] = float("-inf")  # a row with -inf tokens
    for p in (0.3, 0.9, 0.999999):
        for seed in range(5):
            gens = lambda: [torch.Generator().manual_seed(seed * 10 + i) for i in range(5)]
            kept = []
            filtered = S.top_p_filter(logits, p, kept)
            rows, cols = kept[0]
            live = (filtered > float("-inf")).nonzero()
            keys = (rows * 20000 + cols)[filtered[rows, cols] > float("-inf")]
            assert torch.equal(torch.sort(keys).values, live[:, 0] * 20000 + live[:, 1])
            want = S.draw(filtered, gens())
            assert torch.equal(S.draw(filtered, gens(), kept[0]), want)
            params = S.SamplingParams(top_p=p, seed=seed)
            assert torch.equal(S.sample(logits, params, gens()), want)
    # a sampler after top-p that changes the logits: the draw looks at them afresh
    params = S.SamplingParams(top_p=0.9, min_p=0.2)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(5)]
    want = S.draw(S.min_p_filter(S.top_p_filter(logits, 0.9), 0.2), gens())
    assert torch.equal(S.sample(logits, params, gens()), want)


def test_no_rows_sample_to_no_tokens(sampling_path):
    empty = torch.zeros(0, 100)
    assert S.top_p_filter(empty, 0.9).shape == (0, 100)
    assert S.draw(empty, []).shape == (0,)
    assert S.sample(empty, S.SamplingParams(top_p=0.9), []).shape == (0,)


# --- XTC, top-a, tail-free sampling and the sampler order ------------------------------------


def test_xtc_drops_the_top_choices_but_the_least_likely_of_them():
    probs = [0.4, 0.3, 0.15, 0.1, 0.05]
    always = [torch.Generator().manual_seed(0)]
    # 0.4, 0.3 and 0.15 reach 0.12: all go but 0.15, the least likely of them
    assert kept(S.xtc_filter(logits_of(probs), 0.12, 1.0, always)) == [2, 3, 4]
    # only one token reaches 0.35: nothing to exclude
    assert kept(S.xtc_filter(logits_of(probs), 0.35, 1.0, always)) == [0, 1, 2, 3, 4]
    assert kept(S.xtc_filter(logits_of(probs), 0.12, 0.0, always)) == [0, 1, 2, 3, 4]  # off


def test_xtc_acts_with_its_probability_and_a_seed_reproduces_it():
    probs = logits_of([0.5, 0.3, 0.2])

    def acted(seed, probability, steps=400):
        g = torch.Generator().manual_seed(seed)
        return [kept(S.xtc_filter(probs, 0.1, probability, [g])) != [0, 1, 2] for _ in range(steps)]

    share = sum(acted(0, 0.3)) / 400
    assert 0.24 < share < 0.36
    assert acted(5, 0.5) == acted(5, 0.5)
    assert acted(5, 0.5) != acted(6, 0.5)
    # rows draw from their own generators: a row's coin does not depend on its neighbours
    batch = probs.expand(3, -1)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    together = [S.xtc_filter(batch, 0.1, 0.5, gens) for _ in range(20)]
    alone = [S.xtc_filter(probs, 0.1, 0.5, [g]) for g in [torch.Generator().manual_seed(2)] for _ in range(20)]
    assert all(torch.equal(t[1:2], a) for t, a in zip(together, alone))


def test_top_a_scales_with_the_square_of_the_top_probability():
    probs = [0.6, 0.2, 0.1, 0.06, 0.04]
    assert kept(S.top_a_filter(logits_of(probs), 0.2)) == [0, 1, 2]  # threshold 0.072
    assert kept(S.top_a_filter(logits_of(probs), 0.5)) == [0, 1]  # threshold 0.18
    flat = [0.25, 0.25, 0.25, 0.25]
    assert kept(S.top_a_filter(logits_of(flat), 1.0)) == [0, 1, 2, 3]  # threshold 0.0625


def test_tail_free_cuts_where_the_curve_flattens():
    def reference(probs, z):  # the loop as KoboldCpp and llama.cpp write it
        p = sorted(probs, reverse=True)
        d1 = [p[i] - p[i + 1] for i in range(len(p) - 1)]
        d2 = [abs(d1[i] - d1[i + 1]) for i in range(len(d1) - 1)]
        total = sum(d2)
        cum, last = 0.0, len(p)
        for i, d in enumerate(d2):
            cum += d / total
            if cum > z and i >= 1:
                last = i
                break
        return sorted(probs.index(x) for x in p[:last])

    probs = [0.5, 0.25, 0.12, 0.06, 0.04, 0.02, 0.01]
    for z in (0.3, 0.6, 0.9, 0.97):
        assert kept(S.tail_free_filter(logits_of(probs), z)) == reference(probs, z), z
    assert len(kept(S.tail_free_filter(logits_of(probs), 0.6))) < len(probs)
    assert kept(S.tail_free_filter(logits_of(probs), 1.0)) == list(range(7))


def test_sampler_order_changes_the_result_where_it_must():
    # min_p before temperature keeps what clears 0.25 x the top probability at temperature 1;
    # temperature 3 first flattens the distribution, so more tokens clear it
    logits = logits_of([0.6, 0.2, 0.12, 0.08])
    first = S.SamplingParams(temperature=3.0, min_p=0.25, sampler_order=["min_p", "temperature"])
    after = S.SamplingParams(temperature=3.0, min_p=0.25, sampler_order=["temperature", "min_p"])
    assert first.order[:2] == ("min_p", "temperature") and after.order[:2] == ("temperature", "min_p")

    def support(params):
        seen = set()
        for seed in range(300):
            seen.add(int(S.sample(logits, params, [torch.Generator().manual_seed(seed)])))
        return seen

    assert support(first) == {0, 1}
    assert support(after) == {0, 1, 2, 3}


def test_sampler_order_aliases_duplicates_and_the_samplers_left_out():
    p = S.SamplingParams(sampler_order=["penalties", "dry", "typ_p", "tfs_z", "temp"])
    assert p.sampler_order == ["rep_pen", "typical", "tfs", "temperature"]
    assert p.order == ("rep_pen", "typical", "tfs", "temperature", "top_k", "top_p", "min_p", "top_a", "xtc")


def test_greedy_ignores_xtc_and_sampling_with_xtc_is_reproducible():
    logits = torch.randn(2, 50)
    greedy = S.SamplingParams(temperature=0, xtc_probability=1.0, xtc_threshold=0.0)
    assert S.sample(logits, greedy, [None, None]).tolist() == logits.argmax(-1).tolist()
    params = S.SamplingParams(xtc_probability=0.5, xtc_threshold=0.02)
    a = [S.sample(logits, params, [torch.Generator().manual_seed(s) for s in (1, 2)]).tolist() for _ in range(3)]
    b = [S.sample(logits, params, [torch.Generator().manual_seed(s) for s in (1, 2)]).tolist() for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("field, value, message", [
    ("xtc_threshold", 1.5, "xtc_threshold must be in \\[0, 1\\]"),
    ("xtc_probability", -0.1, "xtc_probability must be in \\[0, 1\\].*0 turns XTC off"),
    ("top_a", 2.0, "top_a must be in \\[0, 1\\]"),
    ("tfs", 0.0, "tfs must be in \\(0, 1\\].*1 turns it off"),
    ("sampler_order", ["temperature", "nucleus"], "unknown sampler 'nucleus'.*name samplers from: rep_pen"),
    ("sampler_order", [], "sampler_order is empty"),
])
def test_new_samplers_are_validated_with_what_to_do(field, value, message):
    with pytest.raises(ValueError, match=message):
        S.SamplingParams(**{field: value})
