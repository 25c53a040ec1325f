"""Speculative decoding from n-gram lookup: the same tokens as plain decoding on real models
(with budgets, early exit, stop strings and max_tokens cuts), the output distribution unchanged
when sampling, exact KV rollback of rejected drafts, and the draft-length policy."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from edge.backends.base import BackendInfo
from edge.control.budget import ThinkingBudget
from edge.control.early_exit import EarlyExit
from edge.events import AnswerDelta, ControlEvent
from edge.generate import generate
from edge.params import SamplingParams
from edge.speculative import NgramIndex, SpeculativeConfig, Speculator, best_draft_length, relative_cost, score_rows

FLAT = SpeculativeConfig(cost=(1.0, 1.0), prior=0.9)  # drafting always pays: the most drafts


# -- the pieces ----------------------------------------------------------------------------------

def test_ngram_lookup_finds_the_latest_longest_match():
    idx = NgramIndex((3, 2))
    seq = [1, 2, 3, 9, 1, 2, 3, 4, 5, 2, 3]
    idx.update(seq)
    # suffix (2, 3) last followed by 4 (the 3-gram (5, 2, 3) never occurred)
    assert idx.lookup(seq, 4) == (2, [4, 5, 2, 3])
    seq2 = seq + [4]
    idx.update(seq2)
    assert idx.lookup(seq2, 2) == (3, [5, 2])  # (2, 3, 4) occurred: the longer match wins
    assert idx.lookup([7, 8], 3) == (0, [])


def test_ngram_lookup_ignores_entries_a_rollback_invalidated():
    idx = NgramIndex((2,))
    seq = [1, 2, 5, 6, 1, 2]
    idx.update(seq)
    assert idx.lookup(seq, 2) == (2, [5, 6])
    seq = [1, 2, 7, 1, 2]  # the cache was rolled back to [1, 2] and went on differently
    idx.truncate(2)
    idx.update(seq)
    assert idx.lookup(seq, 2) == (2, [7, 1])
    stale = [1, 2]
    idx.truncate(2)
    assert idx.lookup(stale, 2) == (0, [])  # the entry points past the end: no draft


def test_draft_length_follows_acceptance_and_batch_cost():
    cfg = SpeculativeConfig()  # compute-bound: a second token costs 0.38 of a step
    assert best_draft_length(0.2, cfg, 8) == 0
    assert best_draft_length(0.9, cfg, 8) >= 3
    assert best_draft_length(0.9, cfg, 2) == 2
    assert best_draft_length(0.9, FLAT, 8) == 8  # free extra tokens: draft all there is
    assert relative_cost({1: [1.0, 1.2], 2: [1.5], 4: [2.0], 3: [1.9]}) == pytest.approx((1.0, 1.5 / 1.1, 1.9 / 1.1, 2.0 / 1.1))


class Markov:
    """A backend over a 4-letter vocabulary (+ EOS) whose next-token distribution depends on the
    last token only: ``P[last]``. It has no batch ``score``, so drafts go through the fallback."""

    P = np.array([[0.5, 0.25, 0.15, 0.10], [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    letters = [b"a", b"b", b"c", b"d", b""]

    def __init__(self):
        self._tokens: list[int] = []
        self.info = BackendInfo(name="markov", n_ctx=256)
        self.evals = 0

    n_ctx = property(lambda self: 256)
    n_vocab = property(lambda self: 5)
    n_past = property(lambda self: len(self._tokens))
    tokens = property(lambda self: tuple(self._tokens))
    eos_token_ids = property(lambda self: frozenset({4}))

    def tokenize(self, text, *, add_bos=False, special=True):
        return ["abcd".index(c) for c in text]

    def token_bytes(self, token):
        return self.letters[token]

    def eval(self, tokens):
        self.evals += 1
        self._tokens.extend(tokens)
        logits = np.full(5, -1e9, dtype=np.float32)
        logits[:4] = np.log(self.P[self._tokens[-1]])
        return logits

    def rollback(self, n_past):
        del self._tokens[n_past:]


def chi_square(counts: Counter, probs: np.ndarray, n: int) -> float:
    return sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(probs))


def test_sampling_with_speculation_keeps_the_target_distribution():
    """Thousands of seeded replies to a prompt whose repeats make the lookup draft at every step:
    the tokens after a given one follow the model's distribution (chi-square, 3 degrees of
    freedom, bound at p = 0.001: 16.27), and drafted tokens are accepted at the rate the
    acceptance rule gives, sum over contexts of p(draft)."""
    b = Markov()
    prompt = b.tokenize("abcdabcdabcdab")
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=6, speculate=True)
    after: dict[int, Counter] = {t: Counter() for t in range(4)}
    drafted = accepted = 0
    n_runs = 3000
    for seed in range(n_runs):
        b.rollback(0)
        events = list(generate(b, prompt, params.with_(seed=seed), speculation=FLAT))
        stats = events[-1].stats
        drafted, accepted = drafted + stats.draft_tokens, accepted + stats.draft_accepted
        text = "".join(e.text for e in events if isinstance(e, AnswerDelta))  # what was committed
        assert b.tokens == tuple(prompt + b.tokenize(text))  # and the cache holds just that
        seq = [prompt[-1]] + b.tokenize(text)
        for prev, tok in zip(seq, seq[1:]):
            after[prev][tok] += 1
    assert drafted > n_runs  # the lookup drafted at most steps
    for prev, counts in after.items():
        n = sum(counts.values())
        assert n > 1000
        assert chi_square(counts, Markov.P[prev], n) < 16.27, (prev, counts)
    # every draft of this prompt is the letter after the last one in "abcd" order
    # acceptance of "next letter" after a, b, c, d: 0.25, 0.3, 0.1, 0.25
    assert 0.1 < accepted / drafted < 0.35


def test_seeded_sampling_gives_the_same_text_with_and_without_speculation():
    b = Markov()
    prompt = b.tokenize("abcdabcdabcdab")
    for seed in range(50):
        runs = []
        for spec in (False, True):
            b.rollback(0)
            list(generate(b, prompt, SamplingParams(temperature=0.9, seed=seed, max_tokens=12, speculate=spec), speculation=FLAT))
            runs.append(b.tokens)
        assert runs[0] == runs[1]


def test_fallback_scores_token_by_token():
    b = Markov()
    b.eval([0, 1])
    rows = score_rows(b, [2, 3, 0])
    assert rows.shape == (3, 5) and b.tokens == (0, 1, 2, 3, 0)
    assert np.allclose(rows[1, :4], np.log(Markov.P[3]))


def test_speculator_shows_only_committed_tokens_to_everyone_else():
    b = Markov()
    prompt = b.tokenize("abcabcab")
    b.eval(prompt)
    s = Speculator(b, FLAT)
    s.step([2])  # "c": drafts "abcab..." after it
    assert s.pending and b.n_past > s.n_past == len(prompt) + 1
    assert s.tokens == tuple(prompt) + (2,)
    s.eval([3])  # a probe or an injection: the draft is dropped first
    assert not s.pending and b.tokens == s.tokens == tuple(prompt) + (2, 3)
    s.step([0])
    s.rollback(len(prompt))
    assert not s.pending and b.tokens == tuple(prompt)


# -- real models: the same tokens as plain decoding -------------------------------------------------

def run(rt, prompt, params, controllers_factory=lambda: (), **kw):
    from edge.templates import thinking_open

    text = rt.render([{"role": "user", "content": prompt}], **kw)
    ids = rt.tokenize_prompt(text)
    rt.backend.reset()
    events = list(generate(rt.backend, ids, params, start_in_thinking=thinking_open(text, rt.tags),
                           tags=rt.tags, controllers=controllers_factory(), speculation=getattr(rt, "speculation", None)))
    return events, list(rt.backend.tokens[len(ids):])


def untimed(events):
    """Events with their wall-clock figures left out, and probabilities to 6 digits: a probe
    reads its confidence over a KV cache whose cells a rejected draft freed and the next
    tokens reused, so the attention sums in another order (differences of ~1e-8)."""
    def detail(d):
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items() if k != "seconds"}

    return [(type(e), detail(e.detail)) if isinstance(e, ControlEvent) else e for e in events]


def same_run(rt, prompt, params, controllers_factory=lambda: (), **kw):
    """Run with and without speculation; assert the same events and figures; return the
    speculative run's stats."""
    plain, plain_toks = run(rt, prompt, params.with_(speculate=False), controllers_factory, **kw)
    spec, spec_toks = run(rt, prompt, params.with_(speculate=True), controllers_factory, **kw)
    assert spec_toks == plain_toks
    assert untimed(spec[:-1]) == untimed(plain[:-1])  # every delta and control event, probes' readings included
    a, b = plain[-1].stats, spec[-1].stats
    for f in ("thinking_tokens", "answer_tokens", "injected_tokens", "retracted_tokens", "probe_tokens", "probes",
              "finish_reason", "exit_reason"):
        assert getattr(a, f) == getattr(b, f), f
    assert b.model_step_tokens >= b.model_steps > 0
    return b


@pytest.fixture(scope="module")
def tiny():
    from edge.runtime import Runtime

    rt = Runtime(None, threads=1, device="cpu")
    rt.speculation = FLAT  # as many drafts as the lookup finds: the most chances to differ
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def tiny_tasks():
    from edge.benchmarks.tasks import load_task

    return [it.prompt for it in load_task("tiny-r1")[:6]]


GREEDY = SamplingParams(temperature=0, max_tokens=400)


def test_tiny_r1_greedy_traces_are_identical(tiny, tiny_tasks):
    accepted = 0
    for prompt in tiny_tasks:
        s = same_run(tiny, prompt, GREEDY)
        accepted += s.draft_accepted
        assert s.model_steps < s.model_step_tokens  # some drafted tokens were taken
    assert accepted > 50


@pytest.mark.parametrize("budget", [0, 1, 5, 17, 30, 45])
def test_tiny_r1_budget_cuts_at_the_same_token(tiny, tiny_tasks, budget):
    for prompt in tiny_tasks[:3]:
        same_run(tiny, prompt, GREEDY, lambda: [ThinkingBudget(max_thinking=budget)])
        same_run(tiny, prompt, GREEDY, lambda: [ThinkingBudget(max_thinking=budget, cut="step")])


def test_tiny_r1_early_exit_probes_at_the_same_boundaries(tiny, tiny_tasks):
    probes = 0
    for prompt in tiny_tasks[:4]:
        for threshold in (0.5, 1.0):
            s = same_run(tiny, prompt, GREEDY, lambda: [EarlyExit(threshold=threshold)])
            probes += s.probes
    assert probes >= 6


def test_tiny_r1_every_max_tokens_cut_is_the_same(tiny, tiny_tasks):
    for n in range(1, 90, 3):
        same_run(tiny, tiny_tasks[0], GREEDY.with_(max_tokens=n))


def test_tiny_r1_stop_strings_cut_at_the_same_place(tiny, tiny_tasks):
    for stop in (("}",), ("Final",), ("\\boxed{",)):
        s = same_run(tiny, tiny_tasks[1], GREEDY.with_(stop=stop))
        assert s.exit_reason == "stop_string"


# Greedy identity needs the batch that verifies a draft to compute each row exactly as a
# one-token step would. llama.cpp does for tiny-r1 (Q8_0) at every batch size; for SmolLM2
# (Q4_1) only with flash attention (without it the attention of a batch sums in another order;
# and the runtime-repacked K-quant weights of larger models round batches of 4 or more
# differently), so SmolLM2 runs with flash attention here.


@pytest.fixture(scope="module")
def smol(smollm2):
    from edge.runtime import Runtime

    rt = Runtime(str(smollm2), n_ctx=1024, threads=1, flash_attn=True)
    rt.speculation = FLAT
    yield rt
    rt.close()


SMOL_PROMPTS = [
    "Repeat this list three times: apple, banana, cherry, date, elderberry.",
    "Write a Python function that adds two numbers, then write it again with type hints.",
    "Name three colours.",
]


def test_smollm2_greedy_is_identical(smol):
    accepted = 0
    for prompt in SMOL_PROMPTS:
        s = same_run(smol, prompt, SamplingParams(temperature=0, max_tokens=120))
        accepted += s.draft_accepted
    assert accepted > 10


def test_smollm2_stop_and_max_tokens_cuts(smol):
    for n in (1, 2, 7, 33, 64):
        same_run(smol, SMOL_PROMPTS[0], SamplingParams(temperature=0, max_tokens=n))
    same_run(smol, SMOL_PROMPTS[0], SamplingParams(temperature=0, max_tokens=120, stop=("cherry",)))


def test_smollm2_seeded_sampling_is_identical(smol):
    for seed in (1, 2, 3):
        same_run(smol, SMOL_PROMPTS[0], SamplingParams(temperature=0.8, top_p=0.95, seed=seed, max_tokens=80))


def test_llamacpp_score_rows_equal_one_by_one_decoding(smol):
    b = smol.backend
    prompt = b.tokenize("The quick brown fox jumps over the lazy dog. The quick brown fox jumps over")
    for k in (1, 2, 4, 8):
        b.rollback(0)
        b.eval(prompt[:-k])
        rows = b.score(prompt[-k:])
        assert rows.shape == (k, b.n_vocab) and b.tokens == tuple(prompt)
        b.rollback(len(prompt) - k)
        one = np.stack([b.eval([t]) for t in prompt[-k:]])
        assert np.array_equal(rows, one)


def test_switches_reach_the_params():
    from edge.cli.options import pop_sampling
    from edge.errors import ConfigError
    from edge.server.protocol import Limits, sampling_params

    kw = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, seed=None, max_tokens=8, speculate=True)
    assert pop_sampling(kw).speculate is True
    assert sampling_params({"speculate": True}, Limits()).speculate is True
    assert sampling_params({}, Limits()).speculate is None  # auto
    assert sampling_params({"speculate": None}, Limits()).speculate is None
    assert sampling_params({"speculate": False}, Limits()).speculate is False
    with pytest.raises(Exception):
        sampling_params({"speculate": "yes"}, Limits())
    with pytest.raises(ConfigError):
        SamplingParams(speculate=1)


# -- a model whose larger batches round differently: drafts are cut to the exact size -----------------

@pytest.fixture(scope="module")
def smol_iq4(smollm2, tmp_path_factory):
    """SmolLM2 requantized to IQ4_NL by llama.cpp's quantizer (a few seconds). On the project's x86
    VM, with flash attention, its batches of up to 7 rows are exact and larger ones are not."""
    import ctypes

    import llama_cpp

    dst = tmp_path_factory.mktemp("iq4") / "smollm2-iq4_nl.gguf"
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.allow_requantize, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL, True, 2
    assert llama_cpp.llama_model_quantize(str(smollm2).encode(), str(dst).encode(), ctypes.byref(p)) == 0
    return dst


def test_runtime_cuts_drafts_to_the_exact_batch_and_greedy_stays_the_same(smol_iq4):
    from edge.runtime import Runtime
    from edge.speculative import EXACT_LIMIT, exact_batch

    with Runtime(str(smol_iq4), n_ctx=1024, threads=1, flash_attn=True) as rt:
        exact = exact_batch(rt.backend)
        assert exact >= 2
        rt.speculation = FLAT  # drafts of up to 8 tokens would pay: only the exact limit cuts them
        plan = rt.plan_speculation(True)
        assert plan.config.max_draft == min(FLAT.max_draft, exact - 1)
        if exact < EXACT_LIMIT:  # 7 on the project's VM: the cut is in force
            assert str(plan).endswith(f"drafts of at most {exact - 1} tokens (batches of more than {exact} are not "
                                      "computed exactly as one-token steps here)")
        accepted = 0
        for prompt in SMOL_PROMPTS:
            params = SamplingParams(temperature=0, max_tokens=160)
            off = rt.ask(prompt, params.with_(speculate=False))
            on = rt.ask(prompt, params.with_(speculate=True))
            assert (on.reasoning, on.answer) == (off.reasoning, off.answer)
            assert on.stats.completion_tokens == off.stats.completion_tokens and on.stats.speculation == str(plan)
            accepted += on.stats.draft_accepted
        assert accepted > 10
