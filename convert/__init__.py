"""Conversion of Hugging Face checkpoints to GGUF, with parity verification.

Library functions first; ``edge-reason convert`` is a thin adapter over them::

    from edge.convert import to_gguf, quantize, verify

    to_gguf("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "r1-1.5b-q8_0.gguf", quant="q8_0")
    report = verify("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "r1-1.5b-q8_0.gguf")
    assert report.passed, report.failures

Supported architectures: Qwen2ForCausalLM (R1-Distill-Qwen) and LlamaForCausalLM
(R1-Distill-Llama). Heavy dependencies (torch, transformers, llama_cpp) load on first use.
"""

from __future__ import annotations

from edge.convert.pipeline import to_gguf
from edge.convert.quantize import QUANT_TYPES, quantize
from edge.convert.verify import Thresholds, VerifyReport, verify
from edge.convert.onnx import to_onnx, verify_onnx

__all__ = ["QUANT_TYPES", "Thresholds", "VerifyReport", "quantize", "to_gguf", "to_onnx", "verify", "verify_onnx"]
