"""Request bodies of the OpenAI-compatible API, validated into library objects.

A request becomes one :class:`GenerationRequest`: the messages or prompt, one
:class:`~edge.params.SamplingParams`, fresh controllers (built with the existing
:class:`~edge.control.budget.ThinkingBudget` / :class:`~edge.control.early_exit.EarlyExit`,
which validate their own values) and the presentation options. Anything wrong becomes an
:class:`ApiError` (HTTP 400 with an OpenAI-style body naming the offending field); fields this
server does not know are ignored, as OpenAI-compatible servers usually do.

Fields beyond OpenAI's (all optional):

- ``reasoning_format``: ``deepseek`` (``reasoning_content`` apart from ``content``), ``inline``
  (``<think>...</think>`` inside ``content``) or ``none`` (reasoning dropped);
- ``reasoning_effort``: ``off | low | medium | high | max`` (``minimal`` = low, ``none`` = off),
  a thinking budget from :data:`edge.control.budget.EFFORT_BUDGETS`;
- ``thinking_budget`` (alias ``max_thinking_tokens``) and ``min_thinking_tokens``;
  ``thinking_budget_cut``: ``token`` (default), ``step`` or ``probe`` (where the budget cuts, see
  :class:`~edge.control.budget.ThinkingBudget`);
- ``signal_budget``: ``{"first", "threshold", "low", "high"}`` or the string
  ``"FIRST:THRESHOLD:LOW:HIGH"``: a budget set by one early probe's confidence
  (:class:`~edge.control.budget.SignalBudget`; no other thinking budget with it);
- ``early_exit``: ``true`` or ``{"threshold", "mode", "confidence", "k", "min_thinking", ...}``;
- ``chat_template_kwargs: {"enable_thinking": false}`` skips thinking (vLLM / llama-server style);
- ``reasoning_prompt``: ``"step"``, ``"r1"``, an instruction text, or ``false``/``"none"``: prompted
  reasoning for instruct models (see :mod:`edge.reasoning`; default: ``serve --reasoning-prompt``);
- ``top_k``, ``min_p``, ``repeat_penalty`` (llama-server style sampling extras);
- ``speculate``: speculative decoding from n-gram lookup (:mod:`edge.speculative`). Absent or
  ``null``: auto, on where this machine's batch-cost curve (measured when the server starts,
  once per model and threads, cached) lets drafts pay, each step's draft chosen from the live
  acceptance rate; ``true``: on even where the curve says drafts cannot pay; ``false``: off,
  plain decoding exactly (with it on, greedy output is the same tokens up to llama.cpp's batch
  rounding, which can flip a near tie). ``usage.edge.speculation`` says what the reply did:
  ``status`` (``"on: ..."`` / ``"off: why"``), ``draft_tokens``, ``draft_accepted``,
  ``acceptance_rate``, ``model_steps``, ``tokens_per_step``;
- ``return_tokens_as_token_ids`` (vLLM style): logprob tokens are written ``token_id:N``.

A message with role ``developer`` (what current OpenAI clients send in place of ``system``) is
a system message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from edge.control.base import Controller
from edge.control.budget import CUTS
from edge.control.spec import EARLY_EXIT, EFFORT, SIGNAL, SIGNAL_KEYS, ControlSpec, parse_signal
from edge.errors import ConfigError
from edge.params import MAX_TOP_LOGPROBS, SamplingParams, request_fields

REASONING_FORMATS = ("deepseek", "inline", "none")
EFFORT_ALIASES = {"minimal": "low", "none": "off"}
ROLE_ALIASES = {"developer": "system"}  # current OpenAI clients send "developer" in place of "system"
EARLY_EXIT_KEYS = ("threshold", "mode", "confidence", "k", "min_thinking", "min_gap", "gate", "window", "max_probes", "probe_max_tokens")
MAX_STOP = 4
MAX_LOGPROBS = MAX_TOP_LOGPROBS


class ApiError(Exception):
    """An error answered to the client with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


MAX_TOKENS_LIMIT = 8192
DEFAULT_MAX_TOKENS = 2048
"""The server's defaults for the largest max_tokens a request may ask for, and the max_tokens of
one that gives none (``serve --max-tokens-limit`` / ``--default-max-tokens``)."""


@dataclass
class Limits:
    """What the server accepts (from :class:`edge.server.config.ServerConfig`)."""

    max_tokens_limit: int = MAX_TOKENS_LIMIT
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    reasoning_format: str = REASONING_FORMATS[0]


@dataclass
class GenerationRequest:
    kind: str  # "chat" | "completion"
    model: str | None
    params: SamplingParams
    controllers: list[Controller]
    reasoning_format: str
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt: str | list[int] | None = None
    think: bool = True
    reasoning_prompt: Any = None  # None: the server's setting; else a style, an instruction, or False/"none"
    logprobs: int = 0
    tokens_as_ids: bool = False


# -- typed field readers ---------------------------------------------------------------------
def _present(body: dict, name: str) -> bool:
    return body.get(name) is not None


def _number(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float | None:
    if not _present(body, name):
        return None
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
        raise bad(name, f"'{name}' must be a number, got {v!r}", "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise bad(name, f"'{name}' must be in {left}{lo}, {hi}{right}, got {v}")
    return float(v)


def _int(body: dict, name: str, lo: int, hi: int | None = None) -> int | None:
    if not _present(body, name):
        return None
    v = body[name]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"'{name}' must be an integer, got {v!r}", "invalid_type")
    if v < lo or (hi is not None and v > hi):
        raise bad(name, f"'{name}' must be between {lo} and {hi}, got {v}" if hi is not None else f"'{name}' must be >= {lo}, got {v}")
    return v


def _bool(body: dict, name: str) -> bool | None:
    if not _present(body, name):
        return None
    v = body[name]
    if not isinstance(v, bool):
        raise bad(name, f"'{name}' must be true or false, got {v!r}", "invalid_type")
    return v


def _str(body: dict, name: str) -> str | None:
    if not _present(body, name):
        return None
    v = body[name]
    if not isinstance(v, str):
        raise bad(name, f"'{name}' must be a string, got {type(v).__name__}", "invalid_type")
    return v


def _object(body: dict, name: str) -> dict | None:
    if not _present(body, name):
        return None
    v = body[name]
    if not isinstance(v, dict):
        raise bad(name, f"'{name}' must be an object, got {type(v).__name__}", "invalid_type")
    return v


# -- pieces ------------------------------------------------------------------------------------
# Sampling fields passed to SamplingParams as sent: it checks types and ranges (the same check
# as the CLI and the Python API); a ConfigError becomes a 400 naming the field.
SAMPLING_FIELDS = request_fields(SamplingParams)  # temperature, top_p, top_k, min_p, repeat_penalty, seed, speculate
MAX_TEMPERATURE = 2.0  # OpenAI's documented range for this API; the library itself allows more


def sampling_params(body: dict, limits: Limits, *, logprobs: int = 0) -> SamplingParams:
    """OpenAI sampling fields -> one SamplingParams (validated by it, with the field named)."""
    kw: dict[str, Any] = {name: body[name] for name in SAMPLING_FIELDS if _present(body, name)}
    # presence_penalty / frequency_penalty: type-checked, then ignored (not implemented)
    _number(body, "presence_penalty", -2.0, 2.0)
    _number(body, "frequency_penalty", -2.0, 2.0)

    name = "max_completion_tokens" if _present(body, "max_completion_tokens") else "max_tokens"
    if _present(body, name):
        kw["max_tokens"] = body[name]
    else:
        kw["max_tokens"] = min(limits.default_max_tokens, limits.max_tokens_limit)

    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad("stop", "'stop' must be a string or a list of strings", "invalid_type")
        if len(stop) > MAX_STOP:
            raise bad("stop", f"'stop' takes at most {MAX_STOP} strings, got {len(stop)}")
        kw["stop"] = tuple(s for s in stop if s)
    if logprobs:
        kw["logprobs"], kw["top_logprobs"] = True, logprobs
    try:
        params = SamplingParams(**kw)
    except ConfigError as exc:
        raise bad(name if exc.param == "max_tokens" else exc.param, str(exc)) from None
    if params.temperature > MAX_TEMPERATURE:
        raise bad("temperature", f"'temperature' must be in [0, {MAX_TEMPERATURE:g}] on this API, got {body['temperature']}")
    if params.max_tokens > limits.max_tokens_limit:
        raise bad(name, f"'{name}' is {params.max_tokens} but this server allows at most {limits.max_tokens_limit}", "max_tokens_too_large")
    return params


def control_spec(body: dict) -> tuple[ControlSpec, str | None]:
    """Thinking budget and early exit fields -> a ControlSpec, and the name the request gave
    its thinking budget (``thinking_budget`` or ``max_thinking_tokens``; None if neither)."""
    budget_name = next((n for n in ("thinking_budget", "max_thinking_tokens") if _present(body, n)), None)
    budget = _int(body, budget_name, 0) if budget_name else None
    effort = _str(body, "reasoning_effort")
    if effort is not None and budget_name:
        raise bad("reasoning_effort", f"give either 'reasoning_effort' or '{budget_name}', not both")
    min_thinking = _int(body, "min_thinking_tokens", 0) or None  # 0 asks for nothing
    signal = _signal(body)
    if signal is not None and (budget_name or effort is not None):
        raise bad("signal_budget", f"'signal_budget' sets its own caps; give no '{budget_name or 'reasoning_effort'}' with it")
    cut = _str(body, "thinking_budget_cut")
    if cut is not None:
        if cut not in CUTS:
            raise bad("thinking_budget_cut", f"'thinking_budget_cut' must be one of {', '.join(CUTS)}, got {cut!r}")
        if signal is None and not budget_name and effort is None:
            raise bad("thinking_budget_cut", "'thinking_budget_cut' needs 'thinking_budget' or 'reasoning_effort'")
        if signal is not None and cut != "probe":
            raise bad("thinking_budget_cut", f"'signal_budget' cuts at probe points; 'thinking_budget_cut' {cut!r} does not apply")

    ee = body.get("early_exit")
    early_exit: dict[str, Any] | None = None
    if ee is not None and ee is not False:
        if ee is True:
            early_exit = {}
        elif isinstance(ee, dict):
            unknown = sorted(set(ee) - set(EARLY_EXIT_KEYS))
            if unknown:
                raise bad("early_exit", f"unknown early_exit setting(s) {', '.join(unknown)}; known: {', '.join(EARLY_EXIT_KEYS)}")
            early_exit = {k: v for k, v in ee.items() if v is not None}
        else:
            raise bad("early_exit", "'early_exit' must be true, false or an object", "invalid_type")
    spec = ControlSpec(think_budget=budget, effort=None if effort is None else EFFORT_ALIASES.get(effort, effort),
                       min_thinking=min_thinking, cut=cut or "token", signal=signal, early_exit=early_exit)
    return spec, budget_name


def _signal(body: dict) -> dict[str, Any] | None:
    v = body.get("signal_budget")
    if v is None or v is False:
        return None
    try:
        if isinstance(v, str):
            return parse_signal(v)
    except ConfigError as exc:
        raise bad("signal_budget", str(exc)) from None
    if not isinstance(v, dict):
        raise bad("signal_budget", "'signal_budget' must be an object {first, threshold, low, high} or 'FIRST:THRESHOLD:LOW:HIGH'",
                  "invalid_type")
    unknown = sorted(set(v) - set(SIGNAL_KEYS))
    if unknown:
        raise bad("signal_budget", f"unknown signal_budget setting(s) {', '.join(unknown)}; known: {', '.join(SIGNAL_KEYS)}")
    return {k: v.get(k) for k in SIGNAL_KEYS}  # no "high": no cap; the controller checks the rest


def controllers(body: dict) -> list[Controller]:
    """Thinking budget and early exit from the request; the controllers validate the values,
    and a bad one is a 400 naming the request field it came from."""
    spec, budget_name = control_spec(body)
    try:
        return spec.controllers()
    except ConfigError as exc:
        if exc.param == EARLY_EXIT:
            raise bad("early_exit", f"invalid early_exit: {exc}") from None
        if exc.param == EFFORT:
            raise bad("reasoning_effort", str(exc)) from None
        if exc.param == SIGNAL:
            raise bad("signal_budget", f"invalid signal_budget: {exc}") from None
        raise bad(budget_name or ("reasoning_effort" if spec.effort else "min_thinking_tokens"), str(exc)) from None


def _reasoning_format(body: dict, limits: Limits) -> str:
    fmt = _str(body, "reasoning_format")
    if fmt is None:
        return limits.reasoning_format
    if fmt not in REASONING_FORMATS:
        raise bad("reasoning_format", f"'reasoning_format' must be one of {', '.join(REASONING_FORMATS)}, got {fmt!r}")
    return fmt


def _stream(body: dict) -> tuple[bool, bool]:
    stream = bool(_bool(body, "stream"))
    opts = _object(body, "stream_options") or {}
    include_usage = bool(_bool(opts, "include_usage")) if opts else False
    return stream, include_usage


def _check_n(body: dict) -> None:
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise bad("n", "this server returns one choice per request; 'n' must be 1")


def _content(value: Any, i: int) -> str:
    """A message's content: a string, null, or a list of text parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content", "only text content parts are supported", "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content", "'content' must be a string or a list of text parts", "invalid_type")


def _messages(body: dict) -> list[dict[str, Any]]:
    if "messages" not in body or body["messages"] is None:
        raise bad("messages", "'messages' is required", "missing_required_parameter")
    msgs = body["messages"]
    if not isinstance(msgs, list):
        raise bad("messages", "'messages' must be a list of {role, content} objects", "invalid_type")
    if not msgs:
        raise bad("messages", "'messages' must not be empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "each message must be an object with 'role' and 'content'", "invalid_type")
        role = m.get("role")
        if not isinstance(role, str):
            raise bad(f"messages[{i}].role", "each message needs a string 'role'", "invalid_type")
        out.append({"role": ROLE_ALIASES.get(role, role), "content": _content(m.get("content"), i)})
    return out


def _prompt(body: dict) -> str | list[int]:
    if "prompt" not in body or body["prompt"] is None:
        raise bad("prompt", "'prompt' is required", "missing_required_parameter")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p.strip():
            raise bad("prompt", "'prompt' is empty")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if any(t < 0 for t in p):
            raise bad("prompt", "token ids must be >= 0")
        return list(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise bad("prompt", "batched prompts are not supported; send one prompt per request")
    raise bad("prompt", "'prompt' must be a string or a non-empty list of token ids", "invalid_type")


def _body(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object", "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "'model' must be a string", "invalid_type")
    return body


def parse_chat(body: Any, limits: Limits) -> GenerationRequest:
    body = _body(body)
    messages = _messages(body)
    _check_n(body)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs", "logprobs are not available on chat completions here; use /v1/completions", "unsupported_parameter")
    if body.get("tools"):
        raise bad("tools", "tool calls are not supported by this server", "unsupported_parameter")
    think = True
    kwargs = _object(body, "chat_template_kwargs")
    if kwargs is not None:
        enable = _bool(kwargs, "enable_thinking")
        think = True if enable is None else enable
    reasoning_prompt = body.get("reasoning_prompt")
    if reasoning_prompt is not None:
        from edge.reasoning import reasoning_instruction

        try:
            reasoning_instruction(reasoning_prompt)
        except ConfigError as exc:
            raise bad("reasoning_prompt", str(exc)) from None
    stream, include_usage = _stream(body)
    return GenerationRequest(
        kind="chat",
        model=body.get("model"),
        params=sampling_params(body, limits),
        controllers=controllers(body),
        reasoning_format=_reasoning_format(body, limits),
        stream=stream,
        include_usage=include_usage,
        messages=messages,
        think=think,
        reasoning_prompt=reasoning_prompt,
    )


def parse_completion(body: Any, limits: Limits) -> GenerationRequest:
    body = _body(body)
    prompt = _prompt(body)
    _check_n(body)
    if _bool(body, "echo"):
        raise bad("echo", "'echo' is not supported; the completion holds the continuation only", "unsupported_parameter")
    if _present(body, "suffix"):
        raise bad("suffix", "'suffix' (fill-in-the-middle) is not supported", "unsupported_parameter")
    logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS) or 0
    stream, include_usage = _stream(body)
    return GenerationRequest(
        kind="completion",
        model=body.get("model"),
        params=sampling_params(body, limits, logprobs=logprobs),
        controllers=controllers(body),
        reasoning_format=_reasoning_format(body, limits),
        stream=stream,
        include_usage=include_usage,
        prompt=prompt,
        logprobs=logprobs,
        tokens_as_ids=bool(_bool(body, "return_tokens_as_token_ids")),
    )


def token_list(body: dict, name: str = "tokens") -> list[int]:
    v = body.get(name)
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
        raise bad(name, f"'{name}' must be a list of token ids", "invalid_type")
    return v


def text_field(body: dict, name: str) -> str:
    v = body.get(name)
    if not isinstance(v, str):
        raise bad(name, f"'{name}' must be a string", "invalid_type" if name in body else "missing_required_parameter")
    return v


def bool_field(body: dict, name: str, default: bool) -> bool:
    v = _bool(body, name)
    return default if v is None else v


__all__: Sequence[str] = ("ApiError", "GenerationRequest", "Limits", "parse_chat", "parse_completion", "REASONING_FORMATS")
