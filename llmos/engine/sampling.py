"""Samplers: small pure functions on a (B, V) float logits tensor, applied in order.

Bans and biases (logit_bias, banned_sequences, no_repeat_ngram_size, a constraint's mask, a
rewound position's excluded tokens) always come first; then the samplers run in
`SamplingParams.sampler_order`, by default DEFAULT_ORDER (as in HF and vLLM, with the samplers
added later at the end): rep_pen (repetition, presence, frequency and DRY penalties) ->
temperature -> top_k -> top_p -> min_p -> typical -> top_a -> tfs -> xtc; then the draw.
A custom order runs the samplers it names in that order and any it leaves out after them, in
the default order (so KoboldCpp's `sampler_order`, which has no min_p or XTC, keeps them on). Filters return new tensors with removed tokens set to -inf; nothing here
knows about text.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

import torch

import llmos.kernels as kernels

NEG_INF = float("-inf")
DEFAULT_ORDER = ("rep_pen", "temperature", "top_k", "top_p", "min_p", "typical", "top_a", "tfs", "xtc")
# Names front ends use for the same samplers (llama.cpp's `samplers`, SillyTavern's lists).
SAMPLER_ALIASES = {"penalties": "rep_pen", "repetition_penalty": "rep_pen", "dry": "rep_pen", "temp": "temperature",
                   "typical_p": "typical", "typ_p": "typical", "tfs_z": "tfs"}


class Constraint(Protocol):
    """Decoding under a grammar: `mask(state)` gives the allowed next tokens as a (V,) bool
    tensor, `advance(state, token)` the state after a token. States must be hashable so that
    masks can be cached; a finished state allows only stop tokens."""

    def start(self) -> Hashable: ...

    def mask(self, state: Hashable) -> torch.Tensor: ...

    def advance(self, state: Hashable, token: int) -> Hashable: ...


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    banned_sequences: list[list[int]] = field(default_factory=list)  # token sequences never produced
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob plus the top k
    dry_multiplier: float = 0.0  # DRY repetition penalty (0: off); see apply_dry
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    constraint: Constraint | None = None  # a state machine that masks tokens (poetic forms)
    # Prompt-lookup speculative decoding (greedy, one running row): up to this many tokens that
    # followed the latest earlier occurrence of the text's last few tokens are checked in one
    # forward pass. Output is unchanged; rewrites and edits, which copy their input, run faster.
    lookahead: int = 0
    top_a: float = 0.0  # drop tokens below top_a * (top probability)**2 (0: off)
    tfs: float = 1.0  # tail-free sampling: the z of the cut in the sorted probabilities' curvature (1: off)
    xtc_threshold: float = 0.1  # XTC ("exclude top choices"): tokens at least this likely are "top choices"
    xtc_probability: float = 0.0  # how often XTC acts on a step (0: off); needs sampling, not greedy
    sampler_order: list[str] | None = None  # None: DEFAULT_ORDER; aliases (typ_p, tfs_z, penalties...) accepted

    def __post_init__(self):
        if self.sampler_order is not None:
            # aliases to their names; a sampler named twice (SillyTavern sends "penalties" and "dry") runs once
            self.sampler_order = list(dict.fromkeys(SAMPLER_ALIASES.get(str(n).lower(), str(n).lower())
                                                    for n in self.sampler_order))
        self.validate()

    def validate(self):
        def check(ok, message):
            if not ok:
                raise ValueError(message)

        check(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
              f"max_tokens must be a positive integer, got {self.max_tokens}")
        check(self.temperature >= 0,
              f"temperature must be >= 0, got {self.temperature} (use 0 for greedy decoding)")
        check(self.top_k >= 0, f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        check(isinstance(self.lookahead, int) and 0 <= self.lookahead <= 16,
              f"lookahead must be a whole number from 0 (off) to 16, got {self.lookahead}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p} (1 turns it off)")
        check(0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p} (0 turns it off)")
        check(0 < self.typical_p <= 1, f"typical_p must be in (0, 1], got {self.typical_p}")
        check(self.repetition_penalty > 0,
              f"repetition_penalty must be > 0, got {self.repetition_penalty} (1 turns it off)")
        check(-2 <= self.presence_penalty <= 2,
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2 <= self.frequency_penalty <= 2,
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(self.no_repeat_ngram_size >= 0,
              f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        check(self.logprobs is None or 0 <= self.logprobs <= 20,
              f"logprobs must be between 0 and 20, got {self.logprobs}")
        for seq in self.banned_sequences:
            check(len(seq) > 0, "banned_sequences must not contain an empty sequence")
        check(self.dry_multiplier >= 0, f"dry_multiplier must be >= 0 (0 turns it off), got {self.dry_multiplier}")
        check(self.dry_base >= 1, f"dry_base must be >= 1, got {self.dry_base}")
        check(self.dry_allowed_length >= 1, f"dry_allowed_length must be >= 1, got {self.dry_allowed_length}")
        check(0 <= self.top_a <= 1, f"top_a must be in [0, 1], got {self.top_a} (0 turns it off)")
        check(0 < self.tfs <= 1, f"tfs must be in (0, 1], got {self.tfs} (1 turns it off; 0.95 is typical)")
        check(0 <= self.xtc_threshold <= 1,
              f"xtc_threshold must be in [0, 1], got {self.xtc_threshold} (0.1 is typical; above 0.5 XTC never acts)")
        check(0 <= self.xtc_probability <= 1,
              f"xtc_probability must be in [0, 1], got {self.xtc_probability} (0 turns XTC off; 0.5 is typical)")
        if self.sampler_order is not None:
            unknown = [n for n in self.sampler_order if n not in DEFAULT_ORDER]
            check(not unknown, f"sampler_order: unknown sampler {unknown[0] if unknown else ''!r}; "
                               f"name samplers from: {', '.join(DEFAULT_ORDER)}")
            check(bool(self.sampler_order), "sampler_order is empty: name at least one sampler, e.g. temperature "
                                            "(or leave it out for the default order)")

    @property
    def order(self) -> tuple[str, ...]:
        if self.sampler_order is None:
            return DEFAULT_ORDER
        return tuple(self.sampler_order) + tuple(n for n in DEFAULT_ORDER if n not in self.sampler_order)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# --- bans and biases -------------------------------------------------------------------------


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    ids = torch.tensor(list(bias), dtype=torch.long)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype)
    return logits.index_add(1, ids, values.expand(logits.shape[0], -1))


def ban_sequences(logits: torch.Tensor, histories: list[list[int]], banned: list[list[int]]):
    """Forbid the token that would complete any banned sequence, given each row's history."""
    if not banned:
        return logits
    logits = logits.clone()
    for row, history in enumerate(histories):
        for seq in banned:
            prefix = seq[:-1]
            if not prefix or history[len(history) - len(prefix):] == prefix:
                logits[row, seq[-1]] = NEG_INF
    return logits


def ban_repeated_ngrams(logits: torch.Tensor, histories: list[list[int]], n: int) -> torch.Tensor:
    """No n-gram may occur twice in a row's history (HF's no_repeat_ngram_size)."""
    if n <= 0:
        return logits
    logits = logits.clone()
    for row, history in enumerate(histories):
        if len(history) < n:
            continue
        prefix = tuple(history[len(history) - n + 1:]) if n > 1 else ()
        for i in range(len(history) - n + 1):
            if tuple(history[i:i + n - 1]) == prefix:
                logits[row, history[i + n - 1]] = NEG_INF
    return logits


# --- penalties -------------------------------------------------------------------------------


def apply_dry(logits: torch.Tensor, histories: list[list[int]], multiplier: float, base: float,
              allowed_length: int, max_match: int = 64) -> torch.Tensor:
    """DRY ("don't repeat yourself"): if the text ends with a sequence that occurred before, the
    token that followed it then is penalised by multiplier * base ** (match - allowed_length),
    where match is the length of the repeated suffix. Longer repeats are punished exponentially
    harder; short common phrases (up to allowed_length tokens) go free."""
    if multiplier <= 0:
        return logits
    logits = logits.clone()
    for row, h in enumerate(histories):
        n = len(h)
        if n < 2:
            continue
        last = h[-1]
        penalties: dict[int, int] = {}
        for i in range(n - 1):  # every earlier occurrence of the last token
            if h[i] != last:
                continue
            length = 1
            while length < max_match and i - length >= 0 and h[i - length] == h[n - 1 - length]:
                length += 1
            nxt = h[i + 1]
            penalties[nxt] = max(penalties.get(nxt, 0), length)
        for token, length in penalties.items():
            if length >= allowed_length:
                logits[row, token] -= multiplier * base ** (length - allowed_length)
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """seen: (B, V) bool, tokens in the prompt or output. Positive logits are divided by the
    penalty and negative ones multiplied, so a seen token always becomes less likely."""
    if penalty == 1.0:
        return logits
    rows, cols = seen.nonzero(as_tuple=True)  # a few hundred of the vocabulary: touch only those
    values = logits[rows, cols]
    out = logits.clone()
    out[rows, cols] = torch.where(values > 0, values / penalty, values * penalty)
    return out


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """counts: (B, V) occurrences in the output so far (OpenAI's definition)."""
    if presence == 0 and frequency == 0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


# --- temperature and truncation --------------------------------------------------------------


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError("temperature must be > 0 here; greedy decoding takes the argmax instead")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float, kept: list | None = None) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p.

    No sort of the vocabulary: each row's nucleus lies among its tokens at least as likely as
    some floor, once those hold mass p. The floor 1e-4 leaves at most 10,000 tokens, and for
    SmolLM2 on Tiny Shakespeare at temperature 0.8 it suffices for 99% of rows with a median of
    142 candidates (p = 0.9); a row short of p there retries with (1 - p) / V, under which the tokens
    left out hold less than 1 - p in all (so the rest hold more than p), and finally with no
    floor. Only the candidates are sorted, all rows together, so the result is exact. Apart from
    the probabilities and the result, nothing the size of the vocabulary is allocated (at 8 rows
    of Gemma's 262,144 tokens, each such tensor costs about a millisecond). Where the compiled
    kernels are loaded, they do the first floor (its candidates with one pass of exponentials per
    row, their sort and the cut), and the softmax of the whole vocabulary is only made for a row
    that needs the later floors. kept: a list to append the kept (rows, cols) to, for the draw.
    """
    B, V = logits.shape
    if p >= 1.0 or B == 0:
        return logits
    # the token that crosses p is kept, and the top token always is; a millionth of slack, so
    # that a mass equal to p (0.5 + 0.2 + 0.15 against 0.85) does not hang on float rounding
    cut = max(p - 1e-6, p / 2)
    probs = None
    kept_rows, kept_cols = [], []
    todo = torch.arange(B)
    floors = (1e-4, (1.0 - p) / V, 0.0)
    if kernels.ready():  # the first floor in one call: candidates, their sort and the cut
        r, c, settled = torch.ops.llmos.nucleus(logits, p, cut, floors[0])
        kept_rows.append(r)
        kept_cols.append(c)
        todo, floors = todo[~settled], floors[1:]
    for floor in floors:
        if len(todo) == 0:
            break
        if probs is None:
            probs = logits.softmax(dim=-1)
        sub = probs if len(todo) == B else probs[todo]
        r, c = (sub >= floor).nonzero(as_tuple=True)
        values = sub[r, c].double()
        row_mass = torch.zeros(len(todo), dtype=torch.float64).index_add_(0, r, values)
        ok = row_mass >= p if floor > 0 else torch.ones(len(todo), dtype=torch.bool)
        if not ok.all():
            r, c, values = r[ok[r]], c[ok[r]], values[ok[r]]
            row_mass = torch.where(ok, row_mass, 0.0)
        order = torch.argsort(r.double() * 2.0 - values)  # by row, then most likely first
        r, c, values = r[order], c[order], values[order]
        mass_before = values.cumsum(0) - values - (row_mass.cumsum(0) - row_mass)[r]
        kept_now = mass_before < cut
        kept_rows.append(todo[r[kept_now]])
        kept_cols.append(c[kept_now])
        todo = todo[~ok]
    rows, cols = torch.cat(kept_rows), torch.cat(kept_cols)
    del probs  # before the result takes its room
    out = torch.full_like(logits, NEG_INF)
    out[rows, cols] = logits[rows, cols]
    if kept is not None:
        kept.append((rows, cols))
    return out


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens less likely than min_p times the most likely token's probability."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def typical_filter(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy,
    until their mass reaches `mass`."""
    if mass >= 1.0:
        return logits
    logp = logits.log_softmax(dim=-1)
    p = logp.exp()
    entropy = -(p * torch.nan_to_num(logp, neginf=0.0)).sum(dim=-1, keepdim=True)
    deviation = (-logp - entropy).abs()
    sorted_dev, order = torch.sort(deviation, dim=-1)
    sorted_p = p.gather(-1, order)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    remove_sorted = mass_before >= mass
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def top_a_filter(logits: torch.Tensor, a: float) -> torch.Tensor:
    """Top-a: drop tokens less likely than a times the square of the top token's probability
    (a confident distribution is cut hard, a flat one barely)."""
    if a <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    top = probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < a * top * top, NEG_INF)


def tail_free_filter(logits: torch.Tensor, z: float) -> torch.Tensor:
    """Tail-free sampling: sort the probabilities, take the absolute second differences of that
    curve (where it flattens into the tail), normalise them to sum 1, and cut the tokens after
    the point where their running sum passes z. The top token always stays."""
    if z >= 1.0 or logits.shape[-1] < 4:
        return logits
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    d2 = (probs[:, :-2] - 2 * probs[:, 1:-1] + probs[:, 2:]).abs()  # (B, V-2)
    total = d2.sum(dim=-1, keepdim=True)
    cum = (d2 / total.clamp_min(1e-12)).cumsum(dim=-1)
    keep_sorted = torch.ones_like(probs, dtype=torch.bool)
    # sorted token j (1 <= j <= V-3) stays while the sum up to its curvature is within z; the last
    # two, which have none of their own, stay only if nothing was cut
    keep_sorted[:, 1:-2] = cum[:, 1:] <= z
    keep_sorted[:, -2:] = cum[:, -1:] <= z
    keep_sorted |= total == 0  # a flat distribution has no tail to cut
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, NEG_INF)


def xtc_filter(logits: torch.Tensor, threshold: float, probability: float,
               generators: list[torch.Generator | None]) -> torch.Tensor:
    """XTC, "exclude top choices": on a step where the row's coin (from its own generator, so a
    seed reproduces it) comes up below `probability`, the tokens at least `threshold` likely are
    removed except the least likely of them, so the text leaves its most predictable path while
    staying among plausible tokens. Nothing changes when fewer than two tokens reach the threshold."""
    if probability <= 0:
        return logits
    coins = torch.cat([torch.rand(1, generator=g) for g in generators])
    act = coins < probability
    if not act.any():
        return logits
    probs = logits.softmax(dim=-1)
    top = probs >= threshold
    enough = top.sum(dim=-1) >= 2
    rows = act & enough
    if not rows.any():
        return logits
    least = torch.where(top, probs, torch.inf).min(dim=-1, keepdim=True).values  # the weakest top choice
    remove = top & (probs > least) & rows[:, None]
    return logits.masked_fill(remove, NEG_INF)


# --- drawing ---------------------------------------------------------------------------------


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def draw(logits: torch.Tensor, generators: list[torch.Generator | None], kept=None) -> torch.Tensor:
    """One token per row by inverse-CDF sampling, each row from its own generator, so that a
    sequence's draws do not depend on which other sequences share its batch. (One uniform
    number per row: far cheaper than torch.multinomial over a large vocabulary.) A row that the
    samplers cut down to a few tokens (top-p, top-k and min-p leave the rest at -inf) draws among
    those alone: over Gemma's 262,144 tokens, finding them costs less than the softmax and the
    running sum of the whole row. Rows go one at a time, so one row's distribution is in memory.
    kept: top-p's (rows, cols) when no sampler changed the logits after it; its tokens (less any
    at -inf) are the live ones then, found without a pass over the vocabulary, and where the
    kernels are loaded they draw among them (the same sums, in C++)."""
    B, V = logits.shape
    if B == 0:
        return torch.empty(0, dtype=torch.long)
    u = [torch.rand(1, generator=g) for g in generators]  # each row's number, whichever way it is used
    tokens = torch.full((B,), -1, dtype=torch.long)
    if kept is not None and kernels.ready():
        rows, cols = kept
        order = torch.argsort(rows * V + cols)
        tokens = torch.ops.llmos.draw_among(logits, rows[order], cols[order], torch.cat(u))
        if (tokens >= 0).all():
            return tokens
        kept = None  # a row with nothing finite: the way below, for that row (its number kept)
    if kept is not None:
        rows, cols = kept
        live_now = logits[rows, cols] > NEG_INF
        rows, cols = rows[live_now], cols[live_now]
        order = torch.argsort(rows * V + cols)  # by row, each row's columns in order (as nonzero gives them)
        rows, cols = rows[order], cols[order]
        live = torch.bincount(rows, minlength=B).tolist()
        by_row = dict(zip(range(B), cols.split(live)))
    else:
        alive = logits > NEG_INF
        live = alive.sum(dim=-1, dtype=torch.int32).tolist()
    few = [i for i, n in enumerate(live) if 0 < n <= V // 8]
    cols = {}
    if few and kept is not None:
        cols = {i: by_row[i] for i in few}
    elif few:  # one pass finds the live tokens of every such row, in row order
        _, c = (alive[few] if len(few) < B else alive).nonzero(as_tuple=True)
        cols = dict(zip(few, c.split([live[i] for i in few])))
    for i in range(B):
        if tokens[i] >= 0:
            continue
        row, ids = logits[i], cols.get(i)
        if ids is not None:
            row = row[ids]
        cdf = row.softmax(dim=-1).cumsum_(dim=-1)
        t = torch.searchsorted(cdf, u[i] * cdf[-1], right=True).clamp_(max=len(cdf) - 1)[0]
        tokens[i] = t if ids is None else ids[t]
    return tokens


def apply_bans(logits: torch.Tensor, params: SamplingParams, histories: list[list[int]]) -> torch.Tensor:
    """What always comes first: logit bias, banned sequences and repeated n-grams.
    histories: prompt + output token ids per row."""
    logits = apply_logit_bias(logits, params.logit_bias)
    logits = ban_sequences(logits, histories, params.banned_sequences)
    return ban_repeated_ngrams(logits, histories, params.no_repeat_ngram_size)


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    histories: list[list[int]],
    seen: torch.Tensor | None,
    counts: torch.Tensor | None,
) -> torch.Tensor:
    """The "rep_pen" step: repetition, presence/frequency and DRY penalties."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = apply_presence_frequency(
            logits, counts, params.presence_penalty, params.frequency_penalty
        )
    return apply_dry(logits, histories, params.dry_multiplier, params.dry_base, params.dry_allowed_length)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: list[torch.Generator | None],
    histories: list[list[int]] | None = None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The samplers in params.order, then the draw (or the argmax, with temperature 0: only the
    penalties matter then; XTC, being random, needs sampling). Bans come before, from the caller.
    Without histories (logits that need no penalties) the "rep_pen" step is skipped."""
    penalize = histories is not None  # params.order always holds "rep_pen" (a custom order gets the rest appended)
    if params.greedy:
        return greedy(apply_penalties(logits, params, histories, seen, counts) if penalize else logits)
    kept: list = []  # top-p's kept tokens (it appends them), while no later sampler changes the logits
    steps = {
        "rep_pen": lambda x: apply_penalties(x, params, histories, seen, counts) if penalize else x,
        "temperature": lambda x: apply_temperature(x, params.temperature),
        "top_k": lambda x: top_k_filter(x, params.top_k),
        "top_p": lambda x: top_p_filter(x, params.top_p, kept),
        "min_p": lambda x: min_p_filter(x, params.min_p),
        "typical": lambda x: typical_filter(x, params.typical_p),
        "top_a": lambda x: top_a_filter(x, params.top_a),
        "tfs": lambda x: tail_free_filter(x, params.tfs),
        "xtc": lambda x: xtc_filter(x, params.xtc_threshold, params.xtc_probability, generators),
    }
    for name in params.order:
        changed = steps[name](logits)
        if changed is not logits and name != "top_p":
            kept.clear()
        logits = changed
    return draw(logits, generators, kept[0] if kept else None)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """Log-probabilities of the chosen tokens and the top-k alternatives under the model's own
    distribution (before any sampler), as OpenAI's API reports them. Returns
    (chosen (B,), top_ids (B, k), top_logprobs (B, k))."""
    logp = logits.log_softmax(dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    top = torch.topk(logp, k, dim=-1) if k > 0 else None
    return chosen, (top.indices if top else None), (top.values if top else None)

