"""Real llama.cpp on the real SmolLM2-135M GGUF: determinism, rollback, templates, probes."""

from __future__ import annotations

import codecs

import numpy as np

from edge.control.base import Generation
from edge.params import SamplingParams
from edge.runtime import collect
from edge.templates import ChatTemplate
from edge.think import ThinkParser
from edge.events import Stats

GREEDY = SamplingParams(temperature=0, max_tokens=24)




def decode_from(backend, prompt, n):
    backend.rollback(0)
    logits = backend.eval(prompt)
    toks, all_logits = [], []
    for _ in range(n):
        all_logits.append(logits)
        t = int(np.argmax(logits))
        toks.append(t)
        logits = backend.eval([t])
    return toks, all_logits


def test_greedy_generation_is_deterministic(smollm2_runtime):
    msgs = [{"role": "user", "content": "Name three colours."}]
    a = collect(smollm2_runtime.chat(msgs, GREEDY))
    b = collect(smollm2_runtime.chat(msgs, GREEDY))
    assert a.answer and a.answer == b.answer
    assert a.stats.answer_tokens == b.stats.answer_tokens > 0
    # the second run reused the whole cached prompt instead of prefilling it again
    assert b.stats.backend["cached_prompt_tokens"] == a.stats.prompt_tokens


def test_cache_reuse_in_a_conversation(smollm2_runtime):
    first = [{"role": "user", "content": "Hi"}]
    a = collect(smollm2_runtime.chat(first, GREEDY))
    second = first + [{"role": "assistant", "content": a.answer}, {"role": "user", "content": "And again?"}]
    b = collect(smollm2_runtime.chat(second, GREEDY))
    # the earlier turn's prompt stays in the KV cache; only the new turn is prefilled
    assert a.stats.prompt_tokens <= b.stats.backend["cached_prompt_tokens"] < b.stats.prompt_tokens
    assert b.answer


def test_rollback_then_redecode_equals_fresh_run(smollm2_backend):
    b = smollm2_backend
    prompt = b.tokenize("The quick brown fox jumps over the lazy dog. Then it", add_bos=False)
    fresh_toks, fresh_logits = decode_from(b, prompt, 16)
    # go back into the middle of the continuation and decode again
    b.rollback(len(prompt) + 5)
    assert b.n_past == len(prompt) + 5
    b.rollback(len(prompt) + 4)
    logits = b.eval([fresh_toks[4]])
    again = []
    for i in range(5, 16):
        np.testing.assert_allclose(logits, fresh_logits[i], rtol=0, atol=1e-4)
        t = int(np.argmax(logits))
        again.append(t)
        logits = b.eval([t])
    assert again == fresh_toks[5:]
    # rolling back to the prompt and decoding reproduces everything
    b.rollback(len(prompt) - 1)
    logits = b.eval(prompt[-1:])
    for i in range(16):
        np.testing.assert_allclose(logits, fresh_logits[i], rtol=0, atol=1e-4)
        logits = b.eval([fresh_toks[i]])


def test_probe_leaves_the_state_exactly_as_before(smollm2_backend):
    b = smollm2_backend
    prompt = b.tokenize("Count with me: one, two, three,", add_bos=False)
    base_toks, base_logits = decode_from(b, prompt, 12)

    b.rollback(0)
    gen = Generation(b, GREEDY, ThinkParser(), Stats())
    logits = b.eval(prompt)
    toks = []
    for i in range(12):
        if i in (3, 7):
            n_before = b.n_past
            res = gen.probe("\nFinal answer: ", max_tokens=6, stop=("\n",))
            assert res.cost >= 3 and b.n_past == n_before
        np.testing.assert_allclose(logits, base_logits[i], rtol=0, atol=1e-4)
        t = int(np.argmax(logits))
        toks.append(t)
        logits = b.eval([t])  # after a probe: what the cache left by the rollback gives
    assert toks == base_toks
    assert gen.stats.probes == 2 and gen.stats.probe_tokens >= 6


def test_incremental_detokenization_never_splits_characters(smollm2_backend):
    text = "naïve café – 数学 😀🎉 ok"
    toks = smollm2_backend.tokenize(text, add_bos=False)
    dec = codecs.getincrementaldecoder("utf-8")()
    pieces = [dec.decode(smollm2_backend.token_bytes(t)) for t in toks]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # some token is only part of a character, so the test bites
    def whole(b):
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert not all(whole(smollm2_backend.token_bytes(t)) for t in toks)


def test_chat_template_matches_reference_render(smollm2_backend):
    from transformers.utils.chat_template_utils import render_jinja_template

    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    tpl = ChatTemplate.from_model(smollm2_backend.chat_template, bos_token=smollm2_backend.bos_token, eos_token=smollm2_backend.eos_token)
    assert tpl.name == "model"
    ours = tpl.render(msgs)
    ref, _ = render_jinja_template(
        conversations=[msgs],
        chat_template=smollm2_backend.chat_template,
        add_generation_prompt=True,
        bos_token=smollm2_backend.bos_token,
        eos_token=smollm2_backend.eos_token,
    )
    assert ours == ref[0]
    assert ours.endswith("<|im_start|>assistant\n")


def test_answer_stream_and_stats(smollm2_runtime):
    events = list(smollm2_runtime.chat([{"role": "user", "content": "Say hello."}], GREEDY))
    done = events[-1]
    assert done.type == "done"
    s = done.stats
    assert s.thinking_tokens == 0 and 0 < s.answer_tokens <= GREEDY.max_tokens
    assert s.time_to_first_token is not None and s.time_to_first_answer_token is not None
    assert s.decode_tokens_per_second and s.decode_tokens_per_second > 0
    assert s.backend["name"] == "llamacpp" and s.backend["device"] == "cpu" and s.backend["threads"] == 1
    assert s.finish_reason in ("stop", "length")


def test_stop_strings_end_the_answer(smollm2_runtime):
    msgs = [{"role": "user", "content": "List the numbers from 1 to 10, comma separated."}]
    full = collect(smollm2_runtime.chat(msgs, SamplingParams(temperature=0, max_tokens=40)))
    assert "5" in full.answer
    cut = collect(smollm2_runtime.chat(msgs, SamplingParams(temperature=0, max_tokens=40, stop=("5",))))
    assert "5" not in cut.answer and full.answer.startswith(cut.answer.strip())
    assert cut.stats.finish_reason == "stop"


def test_thinking_opened_by_prompt_is_parsed(smollm2_runtime):
    # a raw prompt that ends inside <think>: everything SmolLM2 writes is thinking until it closes
    prompt = "<|im_start|>user\nThink about the sea.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    r = collect(smollm2_runtime.complete(prompt, SamplingParams(temperature=0, max_tokens=12)))
    assert r.stats.thinking_tokens == 12 and r.reasoning and r.answer == ""
    assert r.stats.finish_reason == "length"


def test_single_token_path_equals_the_batch_path_and_reset_empties_the_cache(smollm2_backend):
    """eval([t]) takes a short path of its own (logits address read through a re-declared C
    function); it must give what evaluating the same tokens as a batch gives, and the public
    binding's address must be the one it reads."""
    import llama_cpp

    from edge.backends.llamacpp import _logits_address_function

    b = smollm2_backend
    ids = b.tokenize("The capital of France is Paris, and", add_bos=True)
    b.rollback(0)
    batch = b.eval(ids)
    b.rollback(0)
    b.eval(ids[:-1])
    one = b.eval(ids[-1:])
    np.testing.assert_allclose(one, batch, rtol=0, atol=1e-3)  # one row more or less in a batch moves float sums
    assert int(np.argmax(one)) == int(np.argmax(batch))

    public = type("Binding", (), {"llama_get_logits_ith": staticmethod(llama_cpp.llama_get_logits_ith)})
    assert _logits_address_function(public)(b._ctx, -1) == _logits_address_function(llama_cpp)(b._ctx, -1) != 0

    b.reset()
    assert b.n_past == 0 and b.tokens == ()
    np.testing.assert_allclose(b.eval(ids), batch, rtol=0, atol=1e-3)
