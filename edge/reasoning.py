"""Prompted reasoning: make an instruct model without native thinking reason in ``<think>``.

R1-Distill models think natively: their template either ends in ``<think>\\n`` (the parser
starts in thinking mode) or leaves the model to write ``<think>`` itself (the parser opens the
block when it sees the tag). Qwen3-style templates take ``enable_thinking``. An ordinary instruct
model (Qwen2.5, SmolLM2, Llama 3 Instruct) does none of this; with a reasoning prompt the runtime
adds a system instruction and opens ``<think>`` in the assistant turn, so the parser, budgets,
early exit and evaluation work on it as on a reasoning model.

Two instruction styles are fixed here (their text goes into evaluation results, and it was
written before any saving was measured, so no threshold is tuned to a wording):

- ``step``: plain step-by-step reasoning, then the answer;
- ``r1``: R1-style: reason, then verify the answer before closing the thinking.

Any other text is used as the instruction itself.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from edge.errors import ConfigError

REASONING_PROMPTS: dict[str, str] = {
    "step": (
        "Think through the problem step by step before you answer. Write your reasoning between "
        "<think> and </think>, then close the thinking with </think> and give the final answer "
        "after it, with the final answer within \\boxed{}."
    ),
    "r1": (
        "Think through the problem before you answer. Write your reasoning between <think> and "
        "</think>: work step by step, and once you have an answer, verify it by checking each "
        "step again before you close the thinking with </think>. Then give the final answer "
        "after it, with the final answer within \\boxed{}."
    ),
}
OFF = ("", "none", "off", "native")
MAX_INSTRUCTION_CHARS = 8192


def reasoning_instruction(spec: str | bool | None) -> str | None:
    """The instruction for a reasoning-prompt setting: a style name (``step``, ``r1``), ``True``
    (``step``), an instruction text, or None/False/``none``/``native`` (no instruction)."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return REASONING_PROMPTS["step"]
    if not isinstance(spec, str):
        raise ConfigError(f"reasoning prompt must be a style ({', '.join(REASONING_PROMPTS)}), an instruction text or none; got {spec!r}")
    name = spec.strip()
    if name.lower() in OFF:
        return None
    if name in REASONING_PROMPTS:
        return REASONING_PROMPTS[name]
    if len(name) > MAX_INSTRUCTION_CHARS:
        raise ConfigError(f"the reasoning instruction is {len(name)} characters; the limit is {MAX_INSTRUCTION_CHARS}")
    return name


def with_instruction(messages: Sequence[Mapping[str, Any]], instruction: str) -> list[dict[str, Any]]:
    """``messages`` with ``instruction`` as the system message (after the user's own system text
    when there is one: the user's setup comes first, the output format last)."""
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("role") == "system" and isinstance(m.get("content"), str):
            m["content"] = (m["content"].rstrip() + "\n\n" + instruction) if m["content"].strip() else instruction
            return out
    return [{"role": "system", "content": instruction}, *out]
