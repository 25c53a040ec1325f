"""Device names each backend understands (no heavy imports: the CLI checks names with these
before any engine is loaded; each backend then says whether its build really has the device)."""

from __future__ import annotations

LLAMACPP_DEVICES = ("auto", "cpu", "cuda", "metal")

# device name -> ONNX Runtime execution provider
ONNX_PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "metal": "CoreMLExecutionProvider",  # the CLI's name for Apple GPUs
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}
ONNX_DEVICES = ("auto", *ONNX_PROVIDERS)

# every name some backend accepts, llama.cpp's first
KNOWN_DEVICES = (*LLAMACPP_DEVICES, *(d for d in ONNX_DEVICES if d not in LLAMACPP_DEVICES))
