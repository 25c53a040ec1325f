"""Samplers on small logit vectors."""

from __future__ import annotations

import numpy as np
import pytest

from edge.errors import ConfigError
from edge.params import SamplingParams
from edge.sampling import apply_repeat_penalty, log_softmax, make_sampler, token_logprob, top_logprobs

LOGITS = np.array([1.0, 3.0, 2.0, 0.5], dtype=np.float32)


def test_greedy_picks_argmax_with_its_logprob():
    s = make_sampler(SamplingParams(temperature=0, top_logprobs=2))(LOGITS)
    assert s.token == 1
    assert s.logprob == pytest.approx(float(log_softmax(LOGITS)[1]), abs=1e-6)
    assert [t for t, _ in s.top] == [1, 2]


def test_top_k_one_is_greedy_at_any_temperature():
    sampler = make_sampler(SamplingParams(temperature=5.0, top_k=1, seed=0))
    assert {sampler(LOGITS).token for _ in range(50)} == {1}


def test_top_p_keeps_the_nucleus_only():
    # probabilities ~ [0.09, 0.64, 0.24, 0.03]: top_p 0.7 keeps tokens 1 and 2
    sampler = make_sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=1))
    seen = {sampler(LOGITS).token for _ in range(300)}
    assert seen == {1, 2}


def test_min_p_drops_unlikely_tokens():
    sampler = make_sampler(SamplingParams(temperature=1.0, top_p=1.0, min_p=0.3, seed=2))
    seen = {sampler(LOGITS).token for _ in range(300)}
    assert seen == {1, 2}


def test_sampling_follows_the_distribution_and_is_seeded():
    a = make_sampler(SamplingParams(temperature=1.0, top_p=1.0, seed=3))
    b = make_sampler(SamplingParams(temperature=1.0, top_p=1.0, seed=3))
    xs = [a(LOGITS).token for _ in range(4000)]
    assert xs == [b(LOGITS).token for _ in range(4000)]
    freq = np.bincount(xs, minlength=4) / len(xs)
    assert np.allclose(freq, np.exp(log_softmax(LOGITS)), atol=0.03)


def test_nucleus_on_a_large_flat_vocabulary_is_exact():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50_000).astype(np.float32) * 0.01  # nearly flat: fallback path
    sampler = make_sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0))
    toks = {sampler(logits).token for _ in range(50)}
    assert len(toks) > 40


def test_repeat_penalty_lowers_seen_tokens():
    out = apply_repeat_penalty(LOGITS, [1, 3], penalty=2.0, last_n=64)
    assert out[1] == pytest.approx(1.5) and out[3] == pytest.approx(0.25)
    assert out[0] == LOGITS[0] and out[2] == LOGITS[2]
    assert LOGITS[1] == 3.0  # the input is not modified


def test_logprob_helpers():
    assert token_logprob(LOGITS, 2) == pytest.approx(float(log_softmax(LOGITS)[2]), abs=1e-6)
    top = top_logprobs(LOGITS, 3)
    assert [t for t, _ in top] == [1, 2, 0]
    assert sum(np.exp(lp) for _, lp in top_logprobs(LOGITS, 4)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=1.0), dict(max_tokens=0), dict(repeat_penalty=0)]
)
def test_bad_params_are_config_errors(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repeat_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_sampling_values_are_config_errors(name, value):
    with pytest.raises(ConfigError, match=f"{name} must be a finite number") as info:
        SamplingParams(**{name: value})
    assert info.value.param == name


@pytest.mark.parametrize(
    "kw, param",
    [(dict(temperature="hot"), "temperature"), (dict(top_k=1.5), "top_k"), (dict(top_k=True), "top_k"),
     (dict(max_tokens=float("nan")), "max_tokens"), (dict(stop=7), "stop"), (dict(stop=["a", 3]), "stop"),
     (dict(repeat_last_n=-2), "repeat_last_n"), (dict(seed=1.5), "seed"), (dict(logprobs="yes"), "logprobs")],
)
def test_wrong_types_are_config_errors_naming_the_field(kw, param):
    with pytest.raises(ConfigError) as info:
        SamplingParams(**kw)
    assert info.value.param == param


def test_seed_minus_one_is_random_as_in_llama_cpp():
    assert SamplingParams(seed=-1).seed is None
    draws = {make_sampler(SamplingParams(temperature=1.0, top_p=1.0, seed=-1))(np.zeros(1000, np.float32)).token for _ in range(8)}
    assert len(draws) > 1  # not one fixed seed
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1 and SamplingParams(seed=3.0).seed == 3


@pytest.mark.parametrize("seed", [-2, -12345, 2**64])
def test_other_seeds_outside_the_range_are_config_errors(seed):
    with pytest.raises(ConfigError, match=r"or -1 for a random seed") as info:
        SamplingParams(seed=seed)
    assert info.value.param == "seed"
