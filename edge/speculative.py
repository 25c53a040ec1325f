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

That holds only if a verified row is bit for bit the row a one-token step gives. llama.cpp
computes some batches with other kernels (:func:`exact_batch` measures the largest batch that is
exact on the loaded model and settings), so the runtime cuts drafts to that size, and where not
even a batch of 2 is exact, auto does not speculate (:func:`decide`).

Rows of drafted tokens that are not taken are dropped with the backend's exact rollback (the
KV cache is truncated, nothing is re-evaluated). Anything else that touches the backend through
the wrapper (a probe, an injected text, a retraction) first drops the pending draft, so the cache
then holds exactly the committed tokens, as it would without speculation.

How many tokens to draft is chosen per step from the live acceptance rate of drafts found by an
n-gram of that length and the backend's batch-cost curve (time of a batch of k tokens relative to
one): the draft length maximises expected tokens per unit of time, and when no length beats
plain decoding nothing is drafted (free text pays one dictionary lookup per token).

Whether a generation speculates at all is a :class:`Speculation`, decided by :func:`decide` from
``SamplingParams.speculate`` (True: on, False: off, None: *auto*). Auto speculates only on a
backend that verifies a draft in one cheap batch (``backend.batch_verify``: llama.cpp) and only
where this machine's batch-cost curve lets some draft length pay at an acceptance rate of
the acceptance rate drafts start from (``SpeculativeConfig.prior``, 0.6: on a compute-bound CPU
they do not); the live acceptance rate then decides each step. The curve is measured once per
model file, thread counts and the other settings that change it (:func:`curve_key`) and kept in
``$EDGE_CACHE_DIR/batch-cost`` (default ``~/.cache/edge-reason/batch-cost``):
:func:`batch_cost_curve`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge.errors import ConfigError

log = logging.getLogger(__name__)

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


def _settled(times: dict[int, list[float]], tol: float | None) -> bool:
    """Whether the fastest time of every size has been seen twice (the two fastest within
    ``tol`` of each other): a machine's load only ever adds time."""
    if tol is None:
        return True
    for v in times.values():
        a, b = sorted(v)[:2] if len(v) >= 2 else (0.0, float("inf"))
        if b > a * (1 + tol):
            return False
    return True


def measure_batch_cost(backend, *, sizes: Sequence[int] = COST_SIZES, repeats: int = 7, context: int = 64,
                       budget_s: float | None = None, min_repeats: int = 2, settle: float | None = None,
                       max_s: float | None = None) -> dict[int, list[float]]:
    """Seconds of one model step over a batch of ``n`` tokens for each ``n`` in ``sizes``
    (``n == 1`` is a plain decode step), measured after ``context`` cached tokens; the sizes are
    interleaved within each repeat so that a change in the machine's load moves all of them.
    With ``budget_s``, no new repeat starts once that many seconds have passed and
    ``min_repeats`` are done, and (with ``settle``) the fastest time of every size has been
    seen twice within that fraction; past ``max_s`` seconds it stops as soon as every size has
    been timed once. The cache is left as it was found."""
    start = backend.n_past
    vocab = backend.n_vocab
    filler = [int(t) % vocab for t in range(100, 100 + max(1, min(context, backend.n_ctx // 2)))]
    t0 = time.perf_counter()
    if start == 0:
        backend.eval(filler)
    base = backend.n_past
    times: dict[int, list[float]] = {n: [] for n in sizes}
    toks = [int(t) % vocab for t in range(200, 200 + max(sizes))]
    try:
        for r in range(repeats + 1):  # the first round warms up
            if budget_s is not None and r > min_repeats:
                elapsed = time.perf_counter() - t0
                if elapsed > (max_s or budget_s) or (elapsed > budget_s and _settled(times, settle)):
                    break
            for n in sizes if r % 2 == 0 else tuple(reversed(sizes)):
                t = time.perf_counter()
                backend.eval(toks[:1]) if n == 1 else score_rows(backend, toks[:n])
                dt = time.perf_counter() - t
                backend.rollback(base)
                if r:
                    times[n].append(dt)
                    if max_s is not None and time.perf_counter() - t0 > max_s and all(times.values()):
                        return times  # past the hard limit: a busy machine (the curve will not have settled)
    finally:
        backend.rollback(min(start, backend.n_past))
    return times


def relative_cost(times: dict[int, list[float]], stat: Callable[[list[float]], float] = statistics.median) -> tuple[float, ...]:
    """The curve ``cost[k-1]`` = ``stat`` (median) time of a k-token batch / that of one token,
    for k = 1 .. the largest size measured (sizes in between interpolated linearly), made
    non-decreasing."""
    med = {n: stat(v) for n, v in times.items() if v}
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


# -- which drafts keep the output exact -------------------------------------------------------------

EXACT_LIMIT = 9
"""The largest batch :func:`exact_batch` checks: a draft of ``max_draft`` (8) tokens and the token
before it."""
EXACT_TEXT = ("The quick brown fox jumps over the lazy dog. Then the dog chased the fox around the yard "
              "twice, and both of them lay down in the shade of the old oak tree to rest until the evening.")


EXACT_DEPTHS = (16, 128, 320)
"""Context lengths at which :func:`exact_batch` compares rows: without flash attention llama.cpp's
attention of a batch changes its summation with the number of cached tokens."""


def exact_batch(backend, *, limit: int = EXACT_LIMIT, depths: Sequence[int] = EXACT_DEPTHS) -> int:
    """The largest batch size k (1 .. ``limit``) for which ``backend.score`` computes every row
    bit for bit as k one-token steps would, for each size 2 .. k, after each of ``depths``
    cached tokens (those that fit the context).

    Greedy speculation gives the very tokens of plain decoding only if a verified row equals the
    one-token row: a near tie decided by a different rounding changes the trace. llama.cpp
    computes some batches with other kernels than a single token: measured on an x86 CPU, the
    K-quant models' batches of 4 or more rows round differently (Qwen2.5-Coder 0.5B and 1.5B
    Q4_K_M: exact up to 3 with flash attention, at 25, 300 and 700 cached tokens), and
    without flash attention the attention of a batch sums in an order that depends on the
    context length (SmolLM2 Q4_1: exact up to 2-4 after 8-16 tokens, not even 2 after 31 or
    more), hence several depths. Empties the backend's cache."""
    if getattr(backend, "score", None) is None:
        return 1
    unit = backend.tokenize(EXACT_TEXT)
    fits = sorted(d for d in depths if d + limit < backend.n_ctx)
    if not unit or not fits:
        return 1
    text = (unit * (1 + (max(fits) + limit) // len(unit)))[: max(fits) + limit]
    best = limit
    try:
        backend.rollback(0)
        for depth in fits:  # ascending: each extends the cached text of the one before
            backend.eval(text[backend.n_past : depth])
            one = np.stack([backend.eval([t]) for t in text[depth : depth + best]])  # the one-token rows
            backend.rollback(depth)
            ok = 1
            for k in range(2, best + 1):
                rows = backend.score(text[depth : depth + k])
                backend.rollback(depth)
                if not np.array_equal(rows, one[:k]):
                    break
                ok = k
            best = ok
            if best == 1:
                break
    finally:
        backend.rollback(0)
    return best


def exact_batch_cached(backend) -> int:
    """:func:`exact_batch`, kept beside the batch-cost curve (same key: model file, engine,
    settings, threads, CPU) so it is measured once per machine and settings."""
    from edge.files import atomic_write

    key = curve_key(backend)
    curve = curve_path(key) if key is not None else None
    path = curve.with_name(curve.stem + "-exact.json") if curve is not None else None
    if path is not None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("key") == key and isinstance(doc.get("exact"), int) and 1 <= doc["exact"] <= EXACT_LIMIT:
                return doc["exact"]
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or unreadable: measured again and replaced
    t0 = time.perf_counter()
    exact = exact_batch(backend)
    took = time.perf_counter() - t0
    log.info("speculative decoding: batches of up to %d token%s are computed exactly as one-token steps for %s "
             "(measured in %.1f s, once)", exact, "s" if exact != 1 else "", Path(backend.info.model_path or "").name or backend.info.name, took)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps({"key": key, "exact": exact, "took": round(took, 3)}, indent=1) + "\n")
        except OSError as exc:
            log.warning("could not cache the exact batch size in %s (%s)", path, exc)
    return exact


def exact_config(config: SpeculativeConfig, exact: int) -> SpeculativeConfig:
    """``config`` with drafts short enough that a verify batch (the token and its draft) has at
    most ``exact`` rows (``exact >= 2``)."""
    from dataclasses import replace

    return config if config.max_draft <= exact - 1 else replace(config, max_draft=exact - 1)


# -- when to speculate ----------------------------------------------------------------------------

def break_even(config: SpeculativeConfig) -> float | None:
    """The lowest acceptance rate (to 0.01) at which some draft length pays, None if none
    below 1 does."""
    for i in range(1, 100):
        if best_draft_length(i / 100, config, config.max_draft):
            return i / 100
    return None


@dataclass(frozen=True)
class Speculation:
    """Whether one generation speculates, with which settings, and why; ``str()`` is what its
    stats say (``Stats.speculation``): ``"on: ..."`` or ``"off: ..."``."""

    config: SpeculativeConfig | None  # None: off
    reason: str

    @property
    def on(self) -> bool:
        return self.config is not None

    def __str__(self) -> str:
        return f"{'on' if self.on else 'off'}: {self.reason}"


DISABLED = Speculation(None, "disabled")


def batch_verify(backend) -> bool:
    """Whether ``backend`` verifies a draft in one cheap step: a batched ``score`` and a
    rollback that drops rows without copying the cache (it says so with ``batch_verify``)."""
    return bool(getattr(backend, "batch_verify", False)) and getattr(backend, "score", None) is not None


def decide(mode: bool | None, backend, config: SpeculativeConfig | None, *, source: str = "", settled: bool = True,
           exact: int | None = None) -> Speculation:
    """Speculation for a generation whose ``SamplingParams.speculate`` is ``mode`` on ``backend``:

    - ``False``: off;
    - ``True``: on (``config``, or the defaults), even where drafts cannot pay: the live
      acceptance rate and the curve still choose each step's draft length, so it drafts rarely
      there;
    - ``None`` (auto): on only with a backend that verifies drafts in one cheap batch and a
      batch-cost curve (``config.cost``; ``source`` says where it came from) under which some
      draft length pays at the acceptance rate drafts start from (``config.prior``: where they
      do not pay even there, speculating would only try a short draft now and then, gain
      nothing and still evaluate rows in batches), measured on a machine quiet enough to tell
      (``settled``).

    ``exact`` (:func:`exact_batch`, None: not measured) keeps speculation token-exact: drafts
    are cut so that no verify batch is larger than the largest exact one; where not even a batch
    of 2 is exact, auto stays off and ``True`` speculates anyway, saying it is not exact."""
    if mode is False:
        return DISABLED
    if exact is not None and mode and config is None:
        config = SpeculativeConfig()  # requested without a curve: the defaults, cut to exact drafts too
    if exact is not None and config is not None and batch_verify(backend):
        if exact >= 2:
            plan = decide(mode, backend, exact_config(config, exact), source=source, settled=settled)
            if plan.on and exact - 1 < config.max_draft:
                reason = f"{plan.reason}; drafts of at most {exact - 1} token{'s' if exact > 2 else ''} (batches of more than {exact} are not computed exactly as one-token steps here)"
                return Speculation(plan.config, reason)
            return plan
        inexact = ("a batch of 2 tokens is not computed exactly as two one-token steps here (llama.cpp without flash "
                   "attention, or this build's batch kernels), so drafts could change the greedy output")
        if not mode:
            return Speculation(None, inexact)
        return Speculation(config, f"requested, not token-exact: {inexact}")
    if mode:
        if not batch_verify(backend):
            return Speculation(config or SpeculativeConfig(), f"requested (the {backend.info.name} backend has no cheap batched "
                                                              "verification of drafts: they cannot pay there)")
        return Speculation(config or SpeculativeConfig(), "requested")
    if not batch_verify(backend):
        return Speculation(None, f"the {backend.info.name} backend has no cheap batched verification of drafts")
    if config is None:
        return Speculation(None, "no batch-cost curve given")
    where = f"{source} " if source else ""
    if not settled:
        return Speculation(None, f"the {where}batch-cost curve is uncertain: {UNSETTLED} while measuring; "
                                 "`edge-reason bench batch-cost --remeasure` when it is quieter")
    rate = break_even(config)
    if rate is None:
        return Speculation(None, f"the {where}batch-cost curve never pays (a batch of 2 tokens costs {config.cost[1]:.2f}x one)")
    if rate > config.prior:
        return Speculation(None, f"the {where}batch-cost curve pays only above acceptance {rate:.2f}, more than the "
                                 f"{config.prior:.2f} drafts start from (a batch of 2 tokens costs {config.cost[1]:.2f}x one)")
    return Speculation(config, f"auto: the {where}batch-cost curve pays above acceptance {rate:.2f}")


# -- this machine's batch-cost curve, measured once and cached -------------------------------------

CACHE_ENV = "EDGE_CACHE_DIR"
CURVE_VERSION = 1
QUICK_SIZES = (1, 2, 3, 4, 6)
QUICK_REPEATS = 40  # at most
QUICK_BUDGET_S = 3.0  # then stop once the fastest times have settled ...
QUICK_SETTLE = 0.1
QUICK_MAX_S = 10.0  # ... or now


UNSETTLED = "the machine was too busy to tell (no batch size gave its fastest time twice)"


def cache_dir() -> Path:
    """Where edge-reason keeps what it measured on this machine: ``$EDGE_CACHE_DIR``, else
    ``~/.cache/edge-reason``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edge-reason"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model"):
                    return f"{platform.machine()} {value.strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} x{os.cpu_count()}"


def curve_key(backend) -> dict[str, Any] | None:
    """What a batch-cost curve depends on: the model file (path, size, modification time), the
    engine and its version, device and offloaded layers, decode and batch threads, flash
    attention and KV cache type, and the CPU. None when the backend names no model file."""
    info = backend.info
    path = Path(info.model_path) if info.model_path else None
    if path is None or not path.is_file():
        return None
    st = path.stat()
    extra = info.extra or {}
    return {
        "version": CURVE_VERSION, "model": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "backend": info.name, "engine": extra.get("llama_cpp_python"), "device": info.device, "gpu_layers": info.gpu_layers,
        "threads": info.threads, "threads_batch": extra.get("threads_batch"), "flash_attn": extra.get("flash_attn"),
        "kv_cache": extra.get("kv_cache"), "cpu": _cpu_name(),
    }


def curve_path(key: dict[str, Any]) -> Path:
    """The cache file of a curve: ``<cache>/batch-cost/<model>-t<threads>-<hash of the key>.json``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "batch-cost" / f"{Path(key['model']).stem}-t{key['threads']}-{digest}.json"


@dataclass(frozen=True)
class CostCurve:
    """A batch-cost curve of this machine: ``cost[k-1]`` is the time of a batch of k tokens
    relative to one token; ``seconds`` the fastest time of each batch size measured."""

    cost: tuple[float, ...]
    seconds: dict[int, float]
    path: Path | None  # the cache file (None: not cached)
    measured: bool  # measured by this call, else read from ``path``
    took: float = 0.0  # seconds the measurement took
    when: str = ""
    settled: bool = True  # the fastest time of every size was seen twice (else the machine was too busy to tell)

    def describe(self) -> str:
        return " ".join(f"{k}:{c:.2f}" for k, c in enumerate(self.cost, 1))


def _read_curve(path: Path, key: dict[str, Any]) -> CostCurve | None:
    """The curve cached in ``path`` for ``key``; None when there is none, or it is unreadable
    or another key's (then it is measured again and replaced)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("the batch-cost cache %s is unreadable (%s); measuring again", path, exc)
        return None
    try:
        if doc["key"] != key:
            return None
        cost = SpeculativeConfig(cost=tuple(doc["cost"])).cost
        seconds = {int(n): float(v) for n, v in doc.get("seconds", {}).items()}
        return CostCurve(cost, seconds, path, measured=False, took=float(doc.get("took", 0.0)), when=str(doc.get("when", "")),
                         settled=bool(doc.get("settled", True)))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        log.warning("the batch-cost cache %s is not a valid record (%s); measuring again", path, exc)
        return None


def batch_cost_curve(backend, *, refresh: bool = False) -> CostCurve:
    """This machine's batch-cost curve for ``backend``: read from the cache, or measured now
    (a few seconds: :data:`QUICK_SIZES` in interleaved rounds, for :data:`QUICK_BUDGET_S` and
    until the fastest time of each size is seen twice, at most :data:`QUICK_MAX_S` or
    :data:`QUICK_REPEATS` rounds; the fastest time of each size; ``refresh`` measures again) and
    cached, written atomically. Measuring empties the backend's cache. A cache that cannot be
    written is a warning; the curve is still returned."""
    from edge.files import atomic_write

    key = curve_key(backend)
    path = curve_path(key) if key is not None else None
    if path is not None and not refresh:
        cached = _read_curve(path, key)
        if cached is not None:
            return cached
    t0 = time.perf_counter()
    backend.rollback(0)
    times = measure_batch_cost(backend, sizes=QUICK_SIZES, repeats=QUICK_REPEATS, budget_s=QUICK_BUDGET_S,
                               settle=QUICK_SETTLE, max_s=QUICK_MAX_S)
    took = time.perf_counter() - t0
    cost = relative_cost(times, stat=min)
    seconds = {n: min(v) for n, v in times.items() if v}
    settled = _settled(times, QUICK_SETTLE)
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if path is not None:
        doc = {"key": key, "cost": list(cost), "seconds": {str(n): v for n, v in seconds.items()},
               "took": round(took, 3), "when": when, "settled": settled, "sizes": list(QUICK_SIZES)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(doc, indent=1) + "\n")
        except OSError as exc:
            log.warning("could not cache the batch-cost curve in %s (%s); it is measured again next time", path, exc)
            path = None
    curve = CostCurve(cost, seconds, path, measured=True, took=took, when=when, settled=settled)
    config = SpeculativeConfig(cost=cost)
    rate = break_even(config)
    verdict = (f"drafts pay above acceptance {rate:.2f}: auto speculation is on" if rate is not None and rate <= config.prior
               else f"drafts pay above acceptance {rate:.2f}, more than the {config.prior:.2f} they start from: auto speculation "
                    "stays off" if rate is not None else "no draft ever pays: auto speculation stays off")
    if not settled:
        verdict = f"{UNSETTLED}: auto speculation stays off; `edge-reason bench batch-cost --remeasure` when it is quieter"
    n = backend.info.threads
    where = f"{n} thread{'s' if n != 1 else ''}" if n else backend.info.device
    log.info("speculative decoding: measured this machine's batch cost for %s at %s in %.1f s (once; %s): a batch of "
             "%s tokens costs %s x one token; %s",
             Path(backend.info.model_path).name or backend.info.name, where, took,
             f"cached in {path}" if path else "not cached", "/".join(str(k) for k in range(2, len(cost) + 1)),
             "/".join(f"{c:.2f}" for c in cost[1:]), verdict)
    return curve
