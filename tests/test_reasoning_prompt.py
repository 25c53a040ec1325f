"""Prompted reasoning for instruct models, and native reasoning templates (the real R1-Distill
tokenizer and chat template from the header of the R1-Distill-Qwen-7B GGUF slice)."""

from __future__ import annotations

import pytest
from r1_vocab import write_vocab_gguf
from scripted import ScriptedBackend

from edge.control.budget import ThinkingBudget
from edge.errors import ConfigError
from edge.events import AnswerDelta, ThinkingDelta
from edge.params import SamplingParams
from edge.reasoning import REASONING_PROMPTS, reasoning_instruction, with_instruction
from edge.runtime import Runtime, collect
from edge.templates import ChatTemplate, thinking_open

GREEDY = SamplingParams(temperature=0, top_p=1.0, max_tokens=48)
USER = [{"role": "user", "content": "What is 17 * 3?"}]


# -- the instruction and the prompt ------------------------------------------------------------
def test_instruction_styles_and_text():
    assert reasoning_instruction("step") == REASONING_PROMPTS["step"]
    assert reasoning_instruction(True) == REASONING_PROMPTS["step"]
    assert "verify" in reasoning_instruction("r1")
    assert reasoning_instruction("Reason in <think>, answer after.") == "Reason in <think>, answer after."
    for off in (None, False, "none", "native", ""):
        assert reasoning_instruction(off) is None
    with pytest.raises(ConfigError):
        reasoning_instruction(3)
    with pytest.raises(ConfigError):
        reasoning_instruction("x" * 10_000)
    # the user's own system text comes first, the output format last; nothing else changes
    msgs = with_instruction([{"role": "system", "content": "Be brief."}, *USER], "FORMAT")
    assert msgs[0] == {"role": "system", "content": "Be brief.\n\nFORMAT"} and msgs[1:] == USER
    assert with_instruction(USER, "FORMAT") == [{"role": "system", "content": "FORMAT"}, *USER]


def test_runtime_renders_the_instruction_and_opens_thinking():
    rt = Runtime(backend=ScriptedBackend(["a"], "b"), reasoning_prompt="r1")  # ChatML fallback template
    p = rt.render(USER)
    assert REASONING_PROMPTS["r1"] in p and p.endswith("<|im_start|>assistant\n<think>\n") and thinking_open(p)
    assert rt.render(USER, reasoning_prompt="none") == Runtime(backend=ScriptedBackend(["a"], "b")).render(USER)
    assert rt.render(USER, think=False).endswith("<|im_start|>assistant\n")  # no thinking: no instruction either
    own = rt.render(USER, reasoning_prompt="Think in tags.")
    assert "Think in tags." in own and REASONING_PROMPTS["r1"] not in own
    with pytest.raises(ConfigError):
        Runtime(backend=ScriptedBackend(["a"], "b"), reasoning_prompt=["step"])


# -- native reasoning templates: the real R1-Distill header -------------------------------------
@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    import llama_cpp

    path = write_vocab_gguf(tmp_path_factory.mktemp("r1") / "r1-distill-qwen-vocab.gguf")
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def r1_template(llm, newer: bool = False) -> ChatTemplate:
    meta = llm.metadata
    source = meta["tokenizer.chat_template"]
    if newer:  # the January 2025 update: the generation prompt opens the think block
        source = source.replace("{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    assert (source != meta["tokenizer.chat_template"]) is newer
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    return ChatTemplate(source, bos_token=bos, eos_token="<｜end▁of▁sentence｜>")


def test_r1_template_renders_and_tokenizes_with_the_real_vocabulary(r1):
    tpl = r1_template(r1)
    msgs = [{"role": "system", "content": "You are helpful."}, *USER,
            {"role": "assistant", "content": "<think>\n17*3=51\n</think>\n\n51"}, {"role": "user", "content": "And 18 * 3?"}]
    p = tpl.render(msgs)
    # the original template: no <think> in the generation prompt (the model writes it), and
    # earlier turns keep only their answer (reasoning after </think> is stripped)
    assert p == ("<｜begin▁of▁sentence｜>You are helpful.<｜User｜>What is 17 * 3?<｜Assistant｜>\n\n51<｜end▁of▁sentence｜>"
                 "<｜User｜>And 18 * 3?<｜Assistant｜>")
    assert not thinking_open(p)
    ids = r1.tokenize(p.encode(), add_bos=False, special=True)
    specials = {r1.token_bos(): "<｜begin▁of▁sentence｜>", 151644: "<｜User｜>", 151645: "<｜Assistant｜>", 151643: "<｜end▁of▁sentence｜>"}
    assert ids[0] == r1.token_bos() == 151646 and ids.count(151644) == 2 and ids.count(151645) == 2 and ids[-1] == 151645
    for tid, text in specials.items():
        assert r1.detokenize([tid], special=True).decode() == text
    think = r1.tokenize("<think>\nx</think>".encode(), add_bos=False, special=True)
    assert think[0] == 151648 and think[-1] == 151649  # <think> and </think> are single tokens
    assert r1.detokenize(r1.tokenize(p.encode(), add_bos=False, special=True), special=True).decode() == p

    newer = r1_template(r1, newer=True).render(USER)
    assert newer.endswith("<｜Assistant｜><think>\n") and thinking_open(newer)


def test_r1_template_through_the_runtime_and_the_parser(r1):
    """The R1 template on a scripted model that writes <think> itself (original template) or
    starts inside it (newer template): the same thinking/answer split either way."""
    for newer, script in ((False, ["<think>", "\nWe multiply.", "</think>"]), (True, ["We multiply.", "</think>"])):
        tpl = r1_template(r1, newer=newer)
        rt = Runtime(backend=ScriptedBackend(script, "\\boxed{51}", chat_template=tpl.source, extra_chars=tpl.render(USER)))
        reply = rt.ask(USER, GREEDY)
        assert reply.reasoning.strip() == "We multiply." and reply.answer == "\\boxed{51}", (newer, reply)


def test_qwen3_style_enable_thinking():
    tpl = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n"
           "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
    rt = Runtime(backend=ScriptedBackend(["a"], "b", chat_template=tpl))
    assert rt.render(USER).endswith("assistant\n") and not thinking_open(rt.render(USER))
    off = rt.render(USER, think=False)
    assert off.endswith("<think>\n\n</think>\n\n") and not thinking_open(off)


# -- a real instruct model ---------------------------------------------------------------------
def test_prompted_reasoning_on_a_real_instruct_model(smollm2):
    """SmolLM2-135M-Instruct has no thinking of its own: with the reasoning prompt it starts
    inside <think>, a budget closes the block, and an answer follows."""
    with Runtime(str(smollm2), n_ctx=1024, threads=1, reasoning_prompt="step") as rt:
        events = list(rt.chat(USER, GREEDY, controllers=[ThinkingBudget(max_thinking=24)]))
        first = next(e for e in events if isinstance(e, (ThinkingDelta, AnswerDelta)))
        assert isinstance(first, ThinkingDelta)
        reply = collect(iter(events))
        assert 0 < reply.stats.thinking_tokens <= 24 and reply.answer.strip()
        plain = rt.ask(USER, GREEDY, reasoning_prompt="none")
        assert plain.stats.thinking_tokens == 0 and plain.answer.strip()


def test_reasoning_prompt_from_the_cli(cli, smollm2):
    r = cli("run", "What is 17 * 3?", "-m", str(smollm2), "--threads", "1", "--temperature", "0", "--max-tokens", "40",
            "--reasoning-prompt", "r1", "--think-budget", "12", "--json")
    assert r.returncode == 0, r.stderr
    import json

    out = json.loads(r.stdout)
    assert 0 < out["stats"]["thinking_tokens"] <= 12 and out["answer"]


def test_reasoning_prompt_on_the_server(smollm2):
    """``serve --reasoning-prompt`` sets the default; a request's ``reasoning_prompt`` overrides it."""
    import openai

    from edge.server import ServerConfig, ServerThread

    with Runtime(str(smollm2), n_ctx=1024, threads=1, reasoning_prompt="step") as rt:
        srv = ServerThread(rt, ServerConfig(port=0, log_level="warning")).start()
        try:
            c = openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0, timeout=120)
            r = c.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=24, extra_body={"thinking_budget": 8})
            assert r.choices[0].message.reasoning_content and r.usage.completion_tokens_details.reasoning_tokens <= 8
            r = c.chat.completions.create(model="m", messages=USER, temperature=0, max_tokens=24, extra_body={"reasoning_prompt": "none"})
            assert not getattr(r.choices[0].message, "reasoning_content", None) and r.choices[0].message.content
            with pytest.raises(openai.BadRequestError, match="reasoning prompt"):
                c.chat.completions.create(model="m", messages=USER, max_tokens=4, extra_body={"reasoning_prompt": ["step"]})
        finally:
            srv.stop()
