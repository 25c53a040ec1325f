"""Token selection from logits, built by a small factory and shared by every backend.

``make_sampler(params)`` returns a :class:`Sampler`; calling it on a logits vector returns a
:class:`Sampled` with the chosen token, its log-probability under the model's (untempered)
distribution, and the top-k alternatives when asked. Log-probabilities are what the
confidence signals of the early-exit controllers read, so they are always computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edge.params import SamplingParams


@dataclass(slots=True)
class Sampled:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def logsumexp(logits: np.ndarray) -> float:
    """log(sum(exp(logits))) in float32 SIMD passes, accumulated in float64."""
    m = logits.max()
    return float(m) + float(np.log(np.exp(logits - m).sum(dtype=np.float64)))


def token_logprob(logits: np.ndarray, token: int) -> float:
    return float(logits[token]) - logsumexp(logits)


def top_logprobs(logits: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    k = min(k, logits.shape[0])
    idx = np.argpartition(-logits, k - 1)[:k]
    idx = idx[np.argsort(-logits[idx], kind="stable")]
    lse = logsumexp(logits)
    return tuple((int(i), float(logits[i]) - lse) for i in idx)


def apply_repeat_penalty(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int) -> np.ndarray:
    """CTRL-style repetition penalty over the last ``last_n`` tokens (returns a copy)."""
    if penalty == 1.0 or not history or last_n == 0:
        return logits
    recent = np.unique(np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64))
    out = logits.copy()
    vals = out[recent]
    out[recent] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest set of tokens whose mass reaches ``top_p``, most likely first.

    Sorting a 150k vocabulary every step is slow, so first keep the tokens within 1e-6 of the
    maximum; if those already reach ``top_p`` the nucleus lies inside them (every excluded
    token is less likely than every kept one), else fall back to a full sort."""
    cand = np.flatnonzero(probs >= probs.max() * 1e-6)
    if probs[cand].sum() < top_p:
        cand = np.arange(probs.shape[0])
    order = cand[np.argsort(-probs[cand], kind="stable")]
    csum = np.cumsum(probs[order])
    cut = int(np.searchsorted(csum, top_p, side="left")) + 1
    return order[: max(cut, 1)]


_NAN = float("nan")


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._argmax_only = params.greedy and params.repeat_penalty == 1.0 and not params.top_logprobs

    def __call__(self, logits: np.ndarray, history: Sequence[int] = (), *, logprob: bool = True) -> Sampled:
        return self.sample(logits, history, logprob)

    def sample(self, logits: np.ndarray, history: Sequence[int] = (), logprob: bool = True) -> Sampled:
        """Choose a token. ``logprob=False`` skips the log-softmax over the vocabulary (a
        150k-entry pass per token) when nobody reads it; the logprob is then NaN."""
        if self._argmax_only:  # plain greedy: the per-token common case
            tok = int(logits.argmax())
            if not logprob:
                return Sampled(tok, _NAN)
            # the chosen token is the maximum, so its logprob is -log(sum(exp(logits - max)))
            return Sampled(tok, -math.log(np.exp(logits - logits[tok]).sum(dtype=np.float64)))
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        scored = apply_repeat_penalty(logits, history, p.repeat_penalty, p.repeat_last_n)
        if p.greedy:
            tok = int(np.argmax(scored))
        else:
            tok = self._sample(scored)
        if not logprob and not p.top_logprobs:
            return Sampled(tok, _NAN)
        lse = logsumexp(logits)
        top = ()
        if p.top_logprobs:
            idx = np.argpartition(-logits, p.top_logprobs - 1)[: p.top_logprobs]
            idx = idx[np.argsort(-logits[idx], kind="stable")]
            top = tuple((int(i), float(logits[i]) - lse) for i in idx)
        return Sampled(tok, float(logits[tok]) - lse, top)

    def _sample(self, logits: np.ndarray) -> int:
        p = self.params
        x = logits.astype(np.float64) / p.temperature
        if p.top_k > 0 and p.top_k < x.shape[0]:
            keep = np.argpartition(-x, p.top_k - 1)[: p.top_k]
        else:
            keep = None
        if keep is not None:
            masked = np.full_like(x, -np.inf)
            masked[keep] = x[keep]
            x = masked
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        if p.min_p > 0:
            probs = np.where(probs >= p.min_p * probs.max(), probs, 0.0)
        if p.top_p < 1.0:
            idx = _nucleus(probs / probs.sum(), p.top_p)
        else:
            idx = np.flatnonzero(probs)
        w = probs[idx]
        return int(idx[self.rng.choice(w.shape[0], p=w / w.sum())])


def make_sampler(params: SamplingParams) -> Sampler:
    return Sampler(params)
