"""``edge-reason convert``: thin adapters over :mod:`convert` (to_gguf, quantize, to_onnx, verify)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from edge.convert.quantize import QUANT_TYPES
from edge.errors import ConfigError, VerificationError


@click.group()
def convert() -> None:
    """Convert Hugging Face checkpoints to GGUF or ONNX, quantize, and verify parity."""


@convert.command("gguf")
@click.argument("src")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-q", "--quant", default="f16", show_default=True, type=click.Choice(QUANT_TYPES, case_sensitive=False),
              help="Output type: f32/f16/bf16 are written directly, the rest by llama.cpp's quantizer.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--verify", "run_verify", is_flag=True,
              help="Verify the result against SRC afterwards (needs torch and transformers).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def gguf_cmd(src: str, out: Path, quant: str, force: bool, revision: str | None, run_verify: bool, no_progress: bool) -> None:
    """Convert SRC (a checkpoint folder or hub repo id) to the GGUF file OUT."""
    from edge.convert import to_gguf, verify

    path = to_gguf(src, out, quant=quant, force=force, progress=not no_progress, revision=revision)
    click.echo(f"wrote {path} ({quant.lower()})", err=True)
    if run_verify:
        _report(verify(src, path, revision=revision), as_json=False)


@convert.command("quantize")
@click.argument("src_gguf", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-q", "--quant", required=True, type=click.Choice(QUANT_TYPES, case_sensitive=False), help="Output type.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def quantize_cmd(src_gguf: Path, out: Path, quant: str, force: bool) -> None:
    """Quantize an unquantized GGUF (f32/f16/bf16) with llama.cpp's quantizer."""
    from edge.convert import quantize

    path = quantize(src_gguf, out, quant, force=force)
    click.echo(f"wrote {path} ({quant.lower()})", err=True)


@convert.command("verify")
@click.argument("src")
@click.argument("gguf_path", metavar="GGUF", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-p", "--prompt", "prompts", multiple=True, help="Prompt to compare on (repeatable; default: built-in set).")
@click.option("--min-top1", type=float, help="Override the minimum top-1 agreement for this type.")
@click.option("--max-kl", type=float, help="Override the maximum mean KL divergence for this type.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=2), help="Tokens per prompt.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(min=1), help="llama.cpp threads.")
@click.option("--revision", help="Hub revision when SRC is a repo id.")
def verify_cmd(src: str, gguf_path: Path, as_json: bool, prompts: tuple[str, ...], min_top1: float | None,
               max_kl: float | None, max_tokens: int, threads: int, revision: str | None) -> None:
    """Compare GGUF with its source SRC: tokenizer, top-1 agreement, KL, perplexity.

    Exits with status 3 when the GGUF fails the thresholds of its type. GGUF may also be an
    ONNX folder written by `convert onnx` (checked with ONNX Runtime, thresholds by weights type).
    """
    from edge.convert import Thresholds, verify
    from edge.convert.verify import THRESHOLDS, gguf_quant_type

    if min_top1 is not None and not 0.0 <= min_top1 <= 1.0:
        raise ConfigError(f"--min-top1 must be within [0, 1], got {min_top1}")
    if max_kl is not None and max_kl <= 0:
        raise ConfigError(f"--max-kl must be positive, got {max_kl}")
    thresholds = None
    if min_top1 is not None or max_kl is not None:
        if gguf_path.is_dir():
            from edge.convert.onnx import onnx_thresholds

            base = onnx_thresholds(gguf_path)
        else:
            base = THRESHOLDS[gguf_quant_type(gguf_path)] if gguf_path.is_file() else Thresholds(0.0, math.inf)
        thresholds = Thresholds(base.min_top1 if min_top1 is None else min_top1, base.max_mean_kl if max_kl is None else max_kl)
    report = verify(src, gguf_path, prompts=list(prompts) or None, thresholds=thresholds, max_tokens=max_tokens,
                    n_threads=threads, revision=revision)
    _report(report, as_json=as_json)


def _parse_budget(text: str) -> float | None:
    """``--size-budget``: a positive number, or ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--size-budget must be a multiple of the Q4_K_M size like 1.1, or 'none'; got {text!r}") from None


def _report(report, *, as_json: bool) -> None:
    """Print ``report`` (table or JSON on stdout); raise VerificationError when it failed."""
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        th = report.thresholds
        n_tok = len(report.tokenizer_mismatches)
        rows = [
            ("type", report.quant, ""),
            ("positions", f"{report.n_positions} in {report.n_texts} texts (after the first of each)", ""),
            ("tokenizer", "identical" if not n_tok else f"{n_tok} mismatch(es)", "identical"),
            ("top-1 agreement", f"{report.top1_agreement:.4f}", f">= {th.min_top1}"),
            ("mean KL (nats)", f"{report.mean_kl:.3g}", f"< {th.max_mean_kl}"),
            ("max KL (nats)", f"{report.max_kl:.3g}", ""),
            ("max |logit diff|", f"{report.max_abs_logit_diff:.3g}", ""),
            ("first positions", f"KL mean {report.first_position_mean_kl:.3g}, max {report.first_position_max_kl:.3g}; "
                                f"top-1 {report.first_position_top1:.2f}", "reported"),
            ("mean KL, all", f"{report.mean_kl_all_positions:.3g}", "reported"),
            ("perplexity source", f"{report.ppl_source:.3f}", ""),
            ("perplexity " + ("onnx" if report.quant.startswith("onnx") else "gguf"), f"{report.ppl_converted:.3f}", ""),
        ]
        for name, value, threshold in rows:
            click.echo(f"{name:<20} {value:<24} {threshold}")
        click.echo(f"{'result':<20} {'PASS' if report.passed else 'FAIL'}")
    if not report.passed:
        raise VerificationError(f"{report.converted} failed verification: {'; '.join(report.failures)}")


@convert.command("onnx")
@click.argument("src")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-w", "--weights", default="fp32", show_default=True,
              type=click.Choice(("fp32", "fp16", "int8", "int4"), case_sensitive=False),
              help="Weight type: fp32 as is, fp16 stored as half, int8 (see --int8-method), int4 (MatMulNBits).")
@click.option("--int8-method", default="blockwise", show_default=True, type=click.Choice(("blockwise", "dynamic")),
              help="int8: blockwise (8-bit MatMulNBits, as accurate as GGUF q8_0) or dynamic (quantize_dynamic: "
                   "standard ONNX ops, activations rounded per tensor, less accurate).")
@click.option("--block-size", type=click.Choice(("16", "32", "64", "128", "256")),
              help="int4: block size of the 4-bit weights [32, or 64/128 where the size budget needs it]; "
                   "blockwise int8: of all weights [32].")
@click.option("--symmetric/--asymmetric", default=None,
              help="int4: 4-bit blocks without / with a zero point [asymmetric].")
@click.option("--method", type=click.Choice(("rtn", "gptq")),
              help="int4: rounding of the 4-bit weights: rtn (round to nearest) or gptq (error feedback through "
                   "the input Hessian measured on calibration text; needs torch+transformers) [rtn].")
@click.option("--grid-search/--no-grid-search", default=None,
              help="int4 --method gptq: each 4-bit block's range shrunk to the ratio (1.0 .. 0.75) with the "
                   "least rounding error (weighted by the calibration inputs), rather than its full min..max [off].")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--method gptq: a UTF-8 text file of calibration texts separated by blank lines "
                   "(default: built-in prose, code and math).")
@click.option("--lm-head-bits", type=click.Choice(("4", "8")), help="int4: bits of the output projection [8].")
@click.option("--embedding-bits", type=click.Choice(("4", "8")), help="int4: bits of the embedding table [4; with a tied lm_head its bits, one shared table].")
@click.option("--attention-bits", type=click.Choice(("4", "8")), help="int4: bits of the q/k/v and o projections [8].")
@click.option("--int8-layers", metavar="LIST",
              help="int4: decoder layers (comma-separated indices, or 'none') whose weights all get 8 bits "
                   "[as many as --size-budget allows, from both ends inward; with --size-budget none the first "
                   "sixth and last third, plus the down projection of the twelfth before that third; a LIST gets "
                   "no extra down layers].")
@click.option("--size-budget", metavar="X",
              help="int4: the weights may take at most X times a Q4_K_M GGUF of the same model (computed from "
                   "the shapes); without --int8-layers it sets the 4-bit block size and the 8-bit layers "
                   "[1.1; 'none': the fixed layer shares].")
@click.option("--accuracy-level", type=click.IntRange(0, 4),
              help="int4 / blockwise int8: MatMulNBits compute type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8; "
                   "default 4: fastest on CPU).")
@click.option("--kv-dtype", type=click.Choice(("float32", "float16")),
              help="KV cache type [float16 for int4 / blockwise int8, float32 otherwise].")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--revision", help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--verify", "run_verify", is_flag=True,
              help="Verify the result against SRC afterwards (needs torch and transformers).")
def onnx_cmd(src: str, out_dir: Path, weights: str, int8_method: str, block_size: str | None, symmetric: bool | None,
             method: str | None, grid_search: bool | None, calibration: Path | None, lm_head_bits: str | None, embedding_bits: str | None,
             attention_bits: str | None, int8_layers: str | None, size_budget: str | None, accuracy_level: int | None, kv_dtype: str | None,
             force: bool, revision: str | None, run_verify: bool) -> None:
    """Export SRC (a checkpoint folder or hub repo id) to the ONNX Runtime model folder OUT_DIR.

    Run it with `edge-reason run --backend onnx -m OUT_DIR`. The int4 options change single
    fields of the default plan (edge.convert.onnx_quant.INT4); the folder's edge_onnx.json
    records the plan used.
    """
    from dataclasses import replace

    from edge.convert.onnx import to_onnx, verify_onnx
    from edge.convert.onnx_quant import default_plan, parse_layers

    weights = weights.lower()
    quant = None
    if weights == "int4" or (weights == "int8" and int8_method == "blockwise"):
        quant = default_plan(weights, block_size=int(block_size) if block_size else None, accuracy_level=accuracy_level,
                             lm_head_bits=int(lm_head_bits) if lm_head_bits else None)
        changes = {"symmetric": symmetric, "method": method, "grid_search": grid_search,
                   "embedding_bits": int(embedding_bits) if embedding_bits else None,
                   "attention_bits": int(attention_bits) if attention_bits else None,
                   "int8_layers": parse_layers(int8_layers) if int8_layers is not None else None}
        quant = replace(quant, **{k: v for k, v in changes.items() if v is not None})
        if size_budget is not None:
            quant = replace(quant, size_budget=_parse_budget(size_budget))
    texts = None
    if calibration is not None:
        texts = [t.strip() for t in calibration.read_text(encoding="utf-8").split("\n\n") if t.strip()]
        if not texts:
            raise ConfigError(f"{calibration} holds no text")
    path = to_onnx(src, out_dir, weights=weights, force=force, int8_method=int8_method, quant=quant,
                   calibration_texts=texts, kv_dtype=kv_dtype, revision=revision)
    click.echo(f"wrote {path} ({weights})", err=True)
    if run_verify:
        _report(verify_onnx(src, path, revision=revision), as_json=False)
