"""Speculative decoding from the trace itself: no draft model.

A reasoning trace repeats itself (numbers, names, whole phrases of the prompt and of its own
earlier steps), so the next few tokens can often be guessed by *n-gram lookup*: find the most
recent earlier occurrence of the last ``n`` tokens (prompt and trace alike) and propose the
tokens that followed it (prompt lookup decoding, llama.cpp's ``--lookup`` / n-gram speculation,
transformers' ``prompt_lookup_num_tokens``).

:class:`Speculator` wraps a backend for one generation. The loop commits its tokens through
:meth:`Speculator.step` one at a time, exactly as without speculation; what changes is what a
step costs:

- a step whose token is the next drafted one is served from the rows already computed: no model
  call;
- any other step evaluates the token *and* a fresh draft in one batch
  (the backend's optional ``score``, as :meth:`edge.backends.llamacpp.LlamaCppBackend.score`:
  every row's logits), keeps the rows, and returns the token's own.

A drafted token is committed only if the sampler, run on its row exactly as it would be run
without speculation, chooses that very token. For a deterministic draft this *is* the standard
speculative acceptance rule: the drafted token ``d`` is accepted with probability ``p(d)``, and
on rejection the token comes from ``p`` with ``d`` removed and renormalised (the sample is ``x``
given ``x != d``). The output distribution is unchanged, greedy output is the same tokens, and
a seeded run draws the very same random numbers as a run without speculation, so it gives the
same text. Every accepted token goes through the loop's per-token path (think parser, stop
strings, ``max_tokens``, every controller hook), so budgets cut and probes run where they would.

Rows of drafted tokens that are not taken are dropped with the backend's exact rollback (the
KV cache is truncated, nothing is re-evaluated). Anything else that touches the backend through
the wrapper (a probe, an injected text, a retraction) first drops the pending draft, so the cache
then holds exactly the committed tokens, as it would without speculation.

How many tokens to draft is chosen per step from the live acceptance rate of drafts found by an
n-gram of that length and the backend's batch-cost curve (time of a batch of k tokens relative to
one): the draft length maximises expected tokens per unit of time, and when no length beats
plain decoding nothing is drafted (free text pays one dictionary lookup per token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edge.errors import ConfigError

DEFAULT_COST = (1.0, 1.38, 1.79, 2.17, 2.55, 2.95, 3.35, 3.75, 4.15)
"""Time of a batch of k = 1, 2, ... tokens relative to one token: measured on a 2-core x86 CPU
with a 1.5B Q4_K_M model (compute-bound, the pessimistic case); a measured curve replaces it."""


@dataclass(frozen=True)
class SpeculativeConfig:
    """Settings of n-gram self-speculation.

    ``ngram_max`` .. ``ngram_min``: the suffix lengths looked up, longest first. ``max_draft``:
    the most tokens proposed at once. ``cost``: the batch-cost curve (see :data:`DEFAULT_COST`).
    ``prior`` / ``prior_weight``: the acceptance rate assumed before any draft was checked, and
    how many observations it counts as. ``decay``: how fast old observations are forgotten.
    ``retry_every``: when drafting does not pay, one short draft is still tried after this many
    skipped lookups, so a trace that starts repeating is noticed."""

    ngram_max: int = 4
    ngram_min: int = 2
    max_draft: int = 8
    cost: tuple[float, ...] = DEFAULT_COST
    prior: float = 0.6
    prior_weight: float = 2.0
    decay: float = 0.9
    retry_every: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.ngram_min <= self.ngram_max <= 16:
            raise ConfigError(f"n-gram sizes must satisfy 1 <= ngram_min <= ngram_max <= 16, got {self.ngram_min}..{self.ngram_max}")
        if not 1 <= self.max_draft <= 64:
            raise ConfigError(f"max_draft must be in [1, 64], got {self.max_draft}")
        cost = tuple(float(c) for c in self.cost)
        if len(cost) < 2 or cost[0] <= 0 or any(not b >= a > 0 for a, b in zip(cost, cost[1:])):
            raise ConfigError(f"cost must be a non-decreasing curve of at least 2 positive numbers, got {self.cost!r}")
        object.__setattr__(self, "cost", cost)
        if not 0.0 < self.prior < 1.0 or self.prior_weight <= 0 or not 0.0 < self.decay <= 1.0:
            raise ConfigError("prior must be in (0, 1), prior_weight > 0, decay in (0, 1]")

    def batch_cost(self, n: int) -> float:
        """Relative time of a batch of ``n`` tokens (extrapolated linearly past the curve)."""
        c = self.cost
        if n <= len(c):
            return c[n - 1]
        return c[-1] + (n - len(c)) * (c[-1] - c[-2])


def best_draft_length(rate: float, config: SpeculativeConfig, limit: int) -> int:
    """The draft length k (0 .. limit) that maximises expected tokens per unit of time when each
    drafted token is accepted with probability ``rate`` given the ones before it were: a step
    yields 1 + rate + ... + rate**k tokens and costs ``batch_cost(k + 1)``."""
    best_k, best = 0, 1.0
    gain, term = 1.0, 1.0
    for k in range(1, limit + 1):
        term *= rate
        gain += term
        speed = gain / config.batch_cost(k + 1)
        if speed > best * 1.001:
            best_k, best = k, speed
    return best_k


class NgramIndex:
    """The most recent position following each n-gram of a token sequence, for n in
    ``sizes``; updated lazily up to the sequence's current length, and checked on lookup
    (a rolled-back sequence may no longer hold what an entry saw)."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = tuple(sorted(set(sizes), reverse=True))
        self.table: dict[tuple[int, ...], int] = {}
        self.done = 0  # positions i < done have had the n-grams ending before them indexed

    def truncate(self, n: int) -> None:
        self.done = min(self.done, n)

    def update(self, seq: Sequence[int]) -> None:
        table, end = self.table, len(seq)
        # the n-gram seq[i-n:i] is followed by seq[i]: index every i < end (the last token has
        # no follower yet)
        for i in range(max(self.done, 1), end):
            for n in self.sizes:
                if i >= n:
                    table[tuple(seq[i - n : i])] = i
        self.done = max(self.done, end)

    def lookup(self, seq: Sequence[int], k: int) -> tuple[int, list[int]]:
        """(n, draft): up to ``k`` tokens that followed the latest earlier occurrence of the
        longest suffix of ``seq`` found, and that suffix's length n (0 and [] when none)."""
        end = len(seq)
        for n in self.sizes:
            if end < n:
                continue
            key = tuple(seq[end - n :])
            at = self.table.get(key)
            if at is None or at >= end or tuple(seq[at - n : at]) != key:
                continue
            return n, list(seq[at : min(at + k, end)])
        return 0, []


@dataclass
class SpecStats:
    drafted: int = 0  # drafted tokens verified
    accepted: int = 0  # drafted tokens committed from their verified row
    steps: int = 0  # model evaluations made for the loop's tokens
    tokens: int = 0  # the loop's tokens served (each either evaluated or from a verified row)
    drafts: int = 0  # verify batches (steps that carried a draft)
    by_ngram: dict[int, list[int]] = field(default_factory=dict)  # n -> [drafted, accepted]


class Speculator:
    """A backend wrapper for one generation: the loop's committed tokens go through
    :meth:`step`; every other call behaves as the plain backend holding exactly the committed
    tokens. Call :meth:`sync` when done so the cache holds nothing beyond them."""

    def __init__(self, backend, config: SpeculativeConfig | None = None, *, limit: int | None = None) -> None:
        self.base = backend
        self.config = config or SpeculativeConfig()
        self.stats = SpecStats()
        self.info = backend.info
        self._score = getattr(backend, "score", None)
        self.context: list[int] = list(backend.tokens)  # the committed tokens (what the loop sees)
        self.index = NgramIndex(range(self.config.ngram_min, self.config.ngram_max + 1))
        self.pending: list[int] = []  # drafted tokens in the cache beyond the committed ones
        self.rows: list[np.ndarray] = []  # rows[i]: logits after pending[i]
        self.limit = limit  # how many more tokens the loop may still commit (max_tokens)
        c = self.config
        self._rates = {n: [c.prior * c.prior_weight, (1 - c.prior) * c.prior_weight] for n in self.index.sizes}
        self._skipped = 0
        self._last: tuple[int, int] | None = None  # (n, drafted) of the draft being consumed

    # -- the backend protocol, as the committed tokens ---------------------------------------------
    n_ctx = property(lambda self: self.base.n_ctx)
    n_vocab = property(lambda self: self.base.n_vocab)
    eos_token_ids = property(lambda self: self.base.eos_token_ids)
    bos_token = property(lambda self: self.base.bos_token)
    eos_token = property(lambda self: self.base.eos_token)
    add_bos = property(lambda self: self.base.add_bos)
    chat_template = property(lambda self: self.base.chat_template)

    @property
    def n_past(self) -> int:
        return len(self.context)

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self.context)

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.base.tokenize(text, add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        return self.base.token_bytes(token)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.base.detokenize(tokens)

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        """A plain evaluation (a probe, an injected text): the pending draft is dropped first."""
        self.sync()
        logits = self.base.eval(tokens)
        self.context.extend(tokens)
        return logits

    def rollback(self, n_past: int) -> None:
        self.sync()
        self.base.rollback(n_past)
        del self.context[n_past:]
        self.index.truncate(n_past)

    def close(self) -> None:
        self.base.close()

    # -- speculation ---------------------------------------------------------------------------------
    def sync(self) -> None:
        """Drop the pending draft: the cache then holds exactly the committed tokens."""
        if self.pending:
            self._settle(accepted_all=False)
            self.base.rollback(len(self.context))
            self.pending, self.rows = [], []

    def _settle(self, accepted_all: bool) -> None:
        """Record how the draft being consumed fared (the tokens taken so far are accepted)."""
        if self._last is None:
            return
        n, drafted = self._last
        self._last = None
        taken = drafted - len(self.pending)
        self.stats.accepted += taken
        by = self.stats.by_ngram.setdefault(n, [0, 0])
        by[0] += drafted
        by[1] += taken
        # the geometric model: `taken` acceptances, then one rejection unless all were taken
        r, d = self._rates[n], self.config.decay
        r[0] = r[0] * d ** (taken + (not accepted_all)) + taken
        r[1] = r[1] * d ** (taken + (not accepted_all)) + (not accepted_all)

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """Commit the loop's next token(s) and return the logits after them."""
        if len(tokens) != 1:
            return self.eval(tokens)
        tok = tokens[0]
        stats = self.stats
        stats.tokens += 1
        if self.pending:
            if self.pending[0] == tok:  # the drafted token was chosen: its row is ready
                self.pending.pop(0)
                self.context.append(tok)
                if self.limit is not None:
                    self.limit -= 1
                if not self.pending:
                    self._settle(accepted_all=True)
                return self.rows.pop(0)
            self.sync()
        self.context.append(tok)  # (the draft is looked up after it)
        try:
            draft = self._draft()
            if not draft:
                logits = self.base.eval(tokens)
            else:
                rows = self._score([tok, *draft]) if self._score is not None else score_rows(self.base, [tok, *draft])
        except BaseException:
            self.context.pop()
            self._last = None
            raise
        if self.limit is not None:
            self.limit -= 1
        stats.steps += 1
        if not draft:
            return logits
        stats.drafts += 1
        stats.drafted += len(draft)
        self.pending, self.rows = draft, list(rows[1:])
        return rows[0]

    def _draft(self) -> list[int]:
        """The tokens to verify after the committed ones (already holding the new token)."""
        ctx = self.context
        room = self.base.n_ctx - len(ctx)  # room left after the new token
        left = self.limit - 1 if self.limit is not None else self.config.max_draft  # max_tokens after it
        limit = min(self.config.max_draft, room, left)
        if limit < 1:
            return []
        self.index.update(ctx)
        n, draft = self.index.lookup(ctx, limit)
        if not n:
            return []
        acc, rej = self._rates[n]
        k = best_draft_length(acc / (acc + rej), self.config, min(limit, len(draft)))
        if k == 0:
            self._skipped += 1
            if self._skipped < self.config.retry_every:
                return []
            k = 1  # a short draft now and then, to notice when the trace starts repeating
        self._skipped = 0
        self._last = (n, k)
        return draft[:k]


def score_rows(backend, tokens: Sequence[int]) -> np.ndarray:
    """The logits after every one of ``tokens``: one batch through ``backend.score`` when the
    backend has it, else one evaluation per token (correct, but no faster than decoding)."""
    score = getattr(backend, "score", None)
    if score is not None:
        return score(tokens)
    return np.stack([backend.eval([t]) for t in tokens])


COST_SIZES = (1, 2, 3, 4, 6, 8)


def measure_batch_cost(backend, *, sizes: Sequence[int] = COST_SIZES, repeats: int = 7, context: int = 64) -> dict[int, list[float]]:
    """Seconds of one model step over a batch of ``n`` tokens for each ``n`` in ``sizes``
    (``n == 1`` is a plain decode step), measured after ``context`` cached tokens; the sizes are
    interleaved within each repeat so that a change in the machine's load moves all of them.
    The cache is left as it was found."""
    import time

    start = backend.n_past
    vocab = backend.n_vocab
    filler = [int(t) % vocab for t in range(100, 100 + max(1, min(context, backend.n_ctx // 2)))]
    if start == 0:
        backend.eval(filler)
    base = backend.n_past
    times: dict[int, list[float]] = {n: [] for n in sizes}
    toks = [int(t) % vocab for t in range(200, 200 + max(sizes))]
    try:
        for r in range(repeats + 1):  # the first round warms up
            for n in sizes if r % 2 == 0 else tuple(reversed(sizes)):
                t = time.perf_counter()
                backend.eval(toks[:1]) if n == 1 else score_rows(backend, toks[:n])
                dt = time.perf_counter() - t
                backend.rollback(base)
                if r:
                    times[n].append(dt)
    finally:
        backend.rollback(min(start, backend.n_past))
    return times


def relative_cost(times: dict[int, list[float]]) -> tuple[float, ...]:
    """The curve ``cost[k-1]`` = median time of a k-token batch / median time of one token, for
    k = 1 .. the largest size measured (sizes in between interpolated linearly), made
    non-decreasing."""
    import statistics

    med = {n: statistics.median(v) for n, v in times.items() if v}
    one = med[1]
    sizes = sorted(med)
    out = []
    for k in range(1, sizes[-1] + 1):
        hi = next(n for n in sizes if n >= k)
        lo = max(n for n in sizes if n <= k)
        v = med[lo] if hi == lo else med[lo] + (med[hi] - med[lo]) * (k - lo) / (hi - lo)
        out.append(max(v / one, out[-1] if out else 1.0))
    out[0] = 1.0
    return tuple(out)
