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
    assert len(seq.output) == len(seq.logprobs) == 5  # one per token
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
    assert len(set(zip(plain, plain[1:]))) < len(plain) - 1  # greedy repeats itself here...
    assert penalised != plain  # ...and the penalty changed that


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


def run_engine(engine, until=None, limit=500):
    """Step an engine until it is idle (or `until()` holds); every event it produced."""
    events = []
    for _ in range(limit):
        if not engine.has_work or (until and until()):
            break
        events += engine.step()
    return events


def trace(seq) -> tuple[list[int], list[float]]:
    """A sequence's tokens and their log-probabilities: a wrong KV cache row changes the
    log-probabilities even where a tiny random model's sampled tokens stay the same."""
    return [lp.token for lp in seq.logprobs], [lp.logprob for lp in seq.logprobs]


def assert_same_traces(got, expected):
    for (tokens, logprobs), (tokens_ref, logprobs_ref) in zip(got, expected, strict=True):
        assert tokens_ref and len(logprobs_ref) == len(tokens_ref)  # empty traces would prove nothing
        assert tokens == tokens_ref
        assert logprobs == pytest.approx(logprobs_ref, abs=1e-4)


def test_requests_joining_a_running_batch_write_what_they_write_alone(model):
    params = [SamplingParams(temperature=0.9, max_tokens=12, seed=s, logprobs=0) for s in range(4)]
    prompts = [[5, 9, 77], [1, 2, 3, 4, 5, 6], [42], [7, 7, 7, 7]]
    alone = [trace(generate(model, p, sp)[0]) for p, sp in zip(prompts, params)]
    engine = Engine(model, max_batch=4, max_len=64)
    reqs = [Request(p, sp) for p, sp in zip(prompts, params)]
    engine.add(reqs[0])
    engine.add(reqs[1])
    for _ in range(3):  # the first two are running at their own positions when the others join
        engine.step()
    engine.add(reqs[2])
    engine.add(reqs[3])
    steps_before = engine.stats["steps"]
    run_engine(engine)
    assert_same_traces([trace(r.sequences[0]) for r in reqs], alone)
    # rows advanced together: about as many steps as one request's tokens, not the sum of theirs
    assert engine.stats["steps"] - steps_before < max(len(tokens) for tokens, _ in alone) + 4


def test_cancelled_and_stopped_rows_are_freed_at_the_next_step(model):
    engine = Engine(model, max_batch=4, max_len=256)
    long = Request([1, 2, 3], SamplingParams(temperature=0, max_tokens=200), n=2)
    other = Request([4, 5], SamplingParams(temperature=0, max_tokens=200))
    engine.add(long)
    engine.add(other)
    engine.step()  # admission: 3 rows
    engine.step()
    assert len(engine.rows) == 3
    long.cancel()
    events = engine.step()
    assert len(engine.rows) == 1 and engine.rows[0].request is other
    assert sorted(e.index for e in events if e.request is long and e.finish_reason == "cancelled") == [0, 1]
    other.stop(0)
    engine.step()
    assert not engine.rows and not engine.has_work
    assert other.sequences[0].finish_reason == "stop" and len(other.sequences[0].output) == 3


def test_a_deadline_ends_a_request(model):
    import time

    engine = Engine(model, max_batch=2, max_len=256)
    req = Request([1, 2, 3], SamplingParams(temperature=0, max_tokens=200), deadline=time.monotonic() - 1)
    engine.add(req)
    run_engine(engine)
    assert req.sequences[0].finish_reason == "length" and len(req.sequences[0].output) == 1


class Hook:
    """A text hook that ends candidate 0 at its third token, and can be told to fail."""

    def __init__(self, fail=False):
        self.fail, self.seen = fail, {}

    def token(self, index, token):
        if self.fail:
            raise RuntimeError("hook broke")
        self.seen.setdefault(index, []).append(token)
        return f"<{token}>", index == 0 and len(self.seen[index]) == 3

    def finish(self, index):  # nothing is held back after the hook itself ended the candidate
        return "" if index == 0 and len(self.seen.get(0, [])) == 3 else "|end"


def test_the_hook_makes_text_and_ends_candidates_and_a_failing_request_fails_alone(model):
    engine = Engine(model, max_batch=4, max_len=128)
    good = Request([3, 4, 5], SamplingParams(temperature=0, max_tokens=6), n=2, hook=Hook())
    bad = Request([6, 7], SamplingParams(temperature=0, max_tokens=6), hook=Hook(fail=True))
    engine.add(good)
    engine.add(bad)
    events = run_engine(engine)
    bad_events = [e for e in events if e.request is bad]
    assert [e.finish_reason for e in bad_events] == ["error"] and "hook broke" in bad_events[0].text
    text = {i: "".join(e.text for e in events if e.request is good and e.index == i) for i in (0, 1)}
    assert good.sequences[0].finish_reason == "stop" and len(good.sequences[0].output) == 3
    assert text[0] == "".join(f"<{t}>" for t in good.sequences[0].output)  # ended by the hook: no tail
    assert text[1] == "".join(f"<{t}>" for t in good.sequences[1].output) + "|end"
    assert good.sequences[1].finish_reason == "length"


def test_engine_limits(model):
    engine = Engine(model, max_batch=2, max_len=16)
    with pytest.raises(ValueError, match="batch size"):
        engine.add(Request([1], SamplingParams(), n=3))
    with pytest.raises(ContextError, match="this server's context is 16"):
        engine.add(Request(list(range(16)), SamplingParams()))
    req = Request(list(range(1, 11)), SamplingParams(temperature=0, max_tokens=100))
    engine.add(req)
    run_engine(engine)
    assert len(req.sequences[0].output) == 6 and req.sequences[0].finish_reason == "length"  # the cache is full


def test_rows_that_end_together_leave_the_others_unchanged(model):
    """Several rows end in one step, among ones that go on: the survivors are packed to the
    front of the cache and write what they write alone."""
    lengths = [3, 3, 10, 3, 10, 3]
    reqs = [Request([i + 1, 2 * i + 5, 40 + i], SamplingParams(temperature=0.9, max_tokens=m, seed=i, logprobs=0))
            for i, m in enumerate(lengths)]
    alone = [trace(generate(model, r.prompt, r.params)[0]) for r in reqs]
    engine = Engine(model, max_batch=6, max_len=64)
    for r in reqs:
        engine.add(r)
    run_engine(engine, until=lambda: len(engine.rows) == 2 and reqs[0].done)
    assert [r.request for r in engine.rows] == [reqs[2], reqs[4]] or [r.request for r in engine.rows] == [reqs[4], reqs[2]]
    run_engine(engine)
    assert_same_traces([trace(r.sequences[0]) for r in reqs], alone)


def test_prefix_cache_reuses_a_finished_sequence_and_changes_nothing(tiny_llm, monkeypatch):
    """Turn 2's prompt begins with turn 1's prompt and reply (a chat): only the new tokens are
    prefilled, and the output is the one a cold prefill gives."""
    from llmos.engine import generate as engine

    model = tiny_llm.model
    greedy = SamplingParams(temperature=0, max_tokens=12)
    first = list(range(5, 45))

    def two_turns(budget: int):
        monkeypatch.setitem(engine._PREFIXES, model, engine.PrefixCache(max_tokens=budget))
        req1 = Request(first, greedy)
        for _ in run(model, req1):
            pass
        reply = req1.sequences[0].output
        req2 = Request(first + reply + [7, 8, 9], greedy)
        for _ in run(model, req2):
            pass
        return req2, len(first) + len(reply) - 1  # the reply's last token never entered the cache

    cold, _ = two_turns(0)
    warm, known = two_turns(4096)
    assert cold.timings.cached_tokens == 0
    assert warm.timings.cached_tokens == known
    assert warm.sequences[0].output == cold.sequences[0].output


def test_prefix_cache_keeps_to_its_budget():
    from llmos.engine.generate import PrefixCache
    from llmos.model import KVCache, ModelConfig

    config = ModelConfig(n_layer=1, n_head=2, d_model=16, max_seq_len=64)
    cache = KVCache.allocate(config, 1, 64)
    store = PrefixCache(max_tokens=50, min_tokens=4)
    store.store(list(range(20)), cache, 0)
    store.store(list(range(30)), cache, 0)  # extends the first: replaces it
    assert list(map(len, store.entries)) == [30] and store.stored == 30
    store.store(list(range(100, 130)), cache, 0)  # 60 > 50: the oldest goes
    assert list(map(len, store.entries)) == [30] and next(iter(store.entries))[0] == 100
    assert store.match(list(range(100, 110)))[0] == 9  # all but the last prompt token
    assert store.match(list(range(3)) + [999])[0] == 0  # under min_tokens: not worth it


def test_lookahead_drafts_change_nothing_and_are_accepted(tiny_llm):
    """Prompt-lookup drafts (greedy, one row): the same tokens as plain decoding, in fewer steps
    once the text repeats itself (a small random model soon loops)."""
    from llmos.engine.generate import draft_tokens

    assert draft_tokens([1, 2, 3, 4, 5, 9, 1, 2, 3], 3) == [4, 5, 9]
    assert draft_tokens([5, 6, 7, 5], 2) == []  # one recurring token is too weak a hint
    assert draft_tokens([7, 1, 2, 8, 1, 2], 4) == [8, 1, 2]
    assert draft_tokens([1, 2, 3], 2) == []
    prompt = list(range(5, 30)) * 2
    outs = {}
    for lookahead in (0, 8):
        req = Request(prompt, SamplingParams(temperature=0, max_tokens=60, lookahead=lookahead))
        for _ in run(tiny_llm.model, req):
            pass
        outs[lookahead] = req
    plain, drafted = outs[0], outs[8]
    assert drafted.sequences[0].output == plain.sequences[0].output
    assert drafted.timings.accepted_tokens > 0 and drafted.timings.drafted_tokens >= drafted.timings.accepted_tokens
    assert drafted.timings.decode_steps < plain.timings.decode_steps
    with pytest.raises(ValueError, match="lookahead"):
        SamplingParams(lookahead=17)
