"""The server on a real GGUF: SmolLM2-135M, and tiny-r1 for thinking replies once the project
has built it (edge/models/tiny-r1-q8_0.gguf); until then SmolLM2 under an R1-style chat
template (whose generation prompt opens ``<think>``) stands in. Replies are a few tokens long:
the point is the wire format and the counts, not the prose."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.params import SamplingParams
from edge.runtime import Runtime
from tests.test_server import client, extra, start

TINY_R1 = Path(__file__).resolve().parent.parent / "edge" / "models" / "tiny-r1-q8_0.gguf"
R1_STYLE_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
RAW_THINK = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n<think>\n"


@pytest.fixture(scope="module")
def real(smollm2_runtime):
    s = start(smollm2_runtime)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def thinker(smollm2):
    """A server whose chat replies open with thinking."""
    if TINY_R1.exists():
        rt = Runtime(str(TINY_R1), n_ctx=1024, threads=2)
    else:
        rt = Runtime(str(smollm2), n_ctx=512, threads=2, chat_template=R1_STYLE_CHATML)
    s = start(rt)
    yield s
    s.stop()
    rt.close()


def test_chat_matches_the_in_process_runtime(real, smollm2_runtime):
    msgs = [{"role": "user", "content": "Name a colour."}]
    smollm2_runtime.backend.rollback(0)  # same cache history for both runs
    near = smollm2_runtime.ask(msgs, SamplingParams(temperature=0, max_tokens=4))
    smollm2_runtime.backend.rollback(0)
    r = client(real).chat.completions.create(model="smollm2", messages=msgs, max_tokens=4, temperature=0)
    assert r.choices[0].message.content.strip() == near.answer and near.answer
    assert extra(r.choices[0].message, "reasoning_content") is None  # SmolLM2 does not think
    u = r.usage
    assert u.prompt_tokens == len(smollm2_runtime.tokenize_prompt(smollm2_runtime.render(msgs))) == near.stats.prompt_tokens
    assert u.completion_tokens == near.stats.completion_tokens == 4 and u.completion_tokens_details.reasoning_tokens == 0
    assert r.model == "SmolLM2-135M-Instruct.Q4_1" and r.choices[0].finish_reason == "length"


def test_streamed_chat_carries_reasoning_then_content(thinker):
    stream = client(thinker).chat.completions.create(
        model="r1",
        messages=[{"role": "user", "content": "What is 2+3?"}],
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"thinking_budget": 2},
    )
    order, reasoning, content, usage = [], "", "", None
    for chunk in stream:
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        if extra(d, "reasoning_content"):
            order.append("r")
            reasoning += extra(d, "reasoning_content")
        if d.content:
            order.append("c")
            content += d.content
    assert order and order[0] == "r"
    if "c" in order:
        assert "r" not in order[order.index("c"):]
    assert reasoning.strip() and "<think>" not in reasoning and "</think>" not in content
    edge = extra(usage, "edge")
    assert usage.completion_tokens_details.reasoning_tokens == 2 and edge["exit_reason"] == "budget"
    assert usage.completion_tokens == 2 + edge["answer_tokens"] and edge["injected_tokens"] > 0
    assert edge["time_to_first_token"] is not None


def test_raw_completion_ending_in_think_streams_reasoning(real):
    stream = client(real).completions.create(model="m", prompt=RAW_THINK, max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True})
    reasoning, text, usage, finish = "", "", None, None
    for chunk in stream:
        usage = chunk.usage or usage
        if chunk.choices:
            reasoning += extra(chunk.choices[0], "reasoning_content") or ""
            text += chunk.choices[0].text or ""
            finish = chunk.choices[0].finish_reason or finish
    assert reasoning and not text and finish == "length"
    assert usage.completion_tokens == usage.completion_tokens_details.reasoning_tokens == 3


def test_completion_logprobs_on_a_real_model(real):
    r = client(real).completions.create(model="m", prompt="The capital of France is", max_tokens=2, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 2 and all(len(top) == 3 for top in lp.top_logprobs)
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert chosen == pytest.approx(max(top.values())) and chosen <= 0  # greedy takes the top token
    assert "".join(lp.tokens).strip() == r.choices[0].text.strip() and lp.text_offset[0] == 0
    # streamed: the same tokens and figures, each token's logprobs in the chunk of its text
    stream = client(real).completions.create(model="m", prompt="The capital of France is", max_tokens=2, temperature=0, logprobs=3, stream=True)
    chunks = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [x for c in chunks for x in c.token_logprobs] == lp.token_logprobs
    assert [x for c in chunks for x in c.text_offset] == lp.text_offset
