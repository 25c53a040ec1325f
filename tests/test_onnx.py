"""ONNX export (fp32/fp16/int8/int4) and the ONNX Runtime backend, on tiny checkpoints built here.

Qwen2: hidden 64, 4 heads / 2 KV heads, q/k/v biases, tied embeddings (the R1-Distill-Qwen layout).
Llama: hidden 64, 2 heads / 1 KV head, head_dim 32, untied, llama3 RoPE scaling.
When the project's tiny-r1 checkpoint exists (benchmarks/tiny_r1/checkpoint), it is checked too.

Tolerances: fp32 logits equal transformers' within 1e-4 absolute at every position (measured
~6e-7); rollback re-decodes identical tokens with logits within 1e-5 (measured: bit-identical);
quantized top-1 agreement and KL must meet :data:`convert.onnx.THRESHOLDS`.
"""

from __future__ import annotations

import codecs
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from convert_fixtures import BOS, EOS, LOGIT_PROMPTS, TOKENIZER_TEXTS, TinySpec, build_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("torch")
pytest.importorskip("transformers")

QWEN = TinySpec("qwen2", hidden=64, ffn=128, heads=4, kv_heads=2, tied=True)
LLAMA = TinySpec("llama", hidden=64, ffn=128, heads=2, kv_heads=1, tied=False)
TINY_R1 = Path(__file__).resolve().parent.parent / "benchmarks" / "tiny_r1" / "checkpoint"
WEIGHTS = {  # name -> to_onnx keyword arguments
    "fp32": {"weights": "fp32"},
    "fp16": {"weights": "fp16"},
    "int8": {"weights": "int8"},
    "int8-dynamic": {"weights": "int8", "int8_method": "dynamic"},
    "int4": {"weights": "int4"},
}


# -- session fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx_ckpts")
    return {"qwen2": build_checkpoint(root / "qwen2", QWEN), "llama": build_checkpoint(root / "llama", LLAMA)}


@pytest.fixture(scope="session")
def onnx_of(ckpts, tmp_path_factory):
    """onnx_of(arch, kind) -> the exported folder, exported on first use."""
    from edge.convert.onnx import to_onnx

    out = tmp_path_factory.mktemp("onnx_out")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, kind: str) -> Path:
        if (arch, kind) not in cache:
            cache[arch, kind] = to_onnx(ckpts[arch], out / f"{arch}-{kind}", **WEIGHTS[kind])
        return cache[arch, kind]

    return get


@pytest.fixture(scope="session")
def hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    cache = {}

    def get(folder: Path):
        if folder not in cache:
            cache[folder] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return cache[folder]

    return get


def reference_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def backend(folder: Path, **kw):
    from edge.backends.onnx import OnnxBackend

    return OnnxBackend(folder, **{"n_ctx": 512, "threads": 1, "device": "cpu", **kw})


# -- parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_fp32_logits_match_transformers(arch, ckpts, onnx_of, hf_model):
    model = hf_model(ckpts[arch])
    with backend(onnx_of(arch, "fp32")) as b:
        for text in LOGIT_PROMPTS:
            ids = b.tokenize(text, add_bos=b.add_bos)
            ref = reference_logits(model, ids)
            b.rollback(0)
            np.testing.assert_allclose(b.score(ids), ref, rtol=0, atol=1e-4)  # every position at once
            # the decode path: a prefill, then one token at a time through the KV cache
            b.rollback(0)
            got = [b.eval(ids[:3])] + [b.eval([t]) for t in ids[3:]]
            np.testing.assert_allclose(np.stack(got), ref[2:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", ["bf16-safetensors", "pytorch-bin"])
def test_other_checkpoint_layouts_export_exactly(layout, ckpts, tmp_path, hf_model):
    import torch

    from edge.convert.onnx import to_onnx

    src = tmp_path / "src"
    shutil.copytree(ckpts["qwen2"], src)
    for f in src.glob("*.safetensors"):
        f.unlink()
    model = hf_model(ckpts["qwen2"])
    if layout == "bf16-safetensors":  # read without torch: the bf16 bits are widened in numpy
        type(model).from_pretrained(ckpts["qwen2"], dtype=torch.bfloat16).save_pretrained(src)
        ref_model = type(model).from_pretrained(src, dtype=torch.float32).eval()
    else:  # PyTorch shards go through convert.hf.Checkpoint
        torch.save(model.state_dict(), src / "pytorch_model.bin")
        ref_model = model
    with backend(to_onnx(src, tmp_path / "out")) as b:
        ids = b.tokenize(LOGIT_PROMPTS[1], add_bos=True)
        np.testing.assert_allclose(b.score(ids), reference_logits(ref_model, ids), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["fp16", "int8", "int8-dynamic", "int4"])
def test_quantized_exports_meet_their_thresholds(kind, ckpts, onnx_of):
    from edge.convert import verify
    from edge.convert.onnx import THRESHOLDS

    # convert.verify dispatches a folder to verify_onnx
    report = verify(ckpts["qwen2"], onnx_of("qwen2", kind), max_tokens=64, n_threads=1)
    assert report.quant == f"onnx-{kind}"
    assert report.thresholds == THRESHOLDS[kind]
    assert report.passed, report.failures
    assert report.top1_agreement >= THRESHOLDS[kind].min_top1
    assert report.mean_kl < THRESHOLDS[kind].max_mean_kl
    assert not report.tokenizer_mismatches
    assert report.max_abs_logit_diff > 0  # really quantized


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))


def test_exports_shrink_with_the_weight_type(onnx_of):
    sizes = {kind: weight_bytes(onnx_of("qwen2", kind)) for kind in WEIGHTS}
    assert sizes["fp32"] > sizes["fp16"] > sizes["int8"] > sizes["int4"]
    manifest = json.loads((onnx_of("qwen2", "int4") / "edge_onnx.json").read_text())
    # 2 layers x (qkv, o, gate_up, down) + lm_head, all MatMulNBits; the plan is recorded
    assert manifest["quantized_matmuls"] == 9 and manifest["lm_head_bits"] == 8 and manifest["block_size"] == 32
    assert manifest["quantization"]["method"] == "rtn" and manifest["symmetric"] is False
    assert set(manifest["tensors"]) == {"qkv", "o", "gate_up", "down", "lm_head", "embedding"}
    assert manifest["kv_dtype"] == "float16" and manifest["external_data"] == ["model.onnx.data"]
    # the plan's predicted size is the data file's, less alignment padding (page-aligned tensors)
    for kind in ("int4", "int8"):
        folder = onnx_of("qwen2", kind)
        planned = json.loads((folder / "edge_onnx.json").read_text())["planned_weight_bytes"]
        data = (folder / "model.onnx.data").stat().st_size
        assert planned <= weight_bytes(folder) and data - planned < 4096 * 16, (kind, planned, data)


@pytest.mark.parametrize("tied", [True, False])
def test_int4_keeps_a_large_embedding_small(tied, tmp_path):
    """A checkpoint whose embedding dominates (as in small real models: 136M of Qwen2.5-0.5B's
    494M parameters): the int4 folder is smaller than the float32 table alone, no float copy
    of the table is stored, a tied table is stored once, and the export still passes verify."""
    import onnx
    from onnx import TensorProto

    from edge.convert import verify
    from edge.convert.onnx import to_onnx

    spec = TinySpec("qwen2", hidden=128, ffn=256, layers=1, heads=4, kv_heads=2, tied=tied, pad_vocab=8192)
    src = build_checkpoint(tmp_path / "src", spec)
    config = json.loads((src / "config.json").read_text())
    table = config["vocab_size"] * config["hidden_size"]  # values in the embedding
    folder = to_onnx(src, tmp_path / "int4", weights="int4")
    size = weight_bytes(folder)
    assert size < 4 * table  # smaller than the fp32 embedding alone
    # ~8 bits a value (the embedding and lm_head defaults): a quarter of float32 per table
    assert size < (0.35 if tied else 0.6) * 4 * table, size / (4 * table)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inits = {t.name: (t.data_type, int(np.prod(t.dims))) for t in model.graph.initializer}
    floats = [name for name, (dtype, n) in inits.items() if dtype in (TensorProto.FLOAT, TensorProto.FLOAT16) and n >= table // 8]
    assert not floats  # only scales (one per block) are float
    tables = [name for name, (dtype, n) in inits.items() if dtype == TensorProto.UINT8 and n >= table // 4]
    assert len(tables) == (1 if tied else 2), tables
    assert "GatherBlockQuantized" in {n.op_type for n in model.graph.node}
    assert not [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]  # no float lookup
    report = verify(src, folder, max_tokens=48, n_threads=1)
    assert report.passed, report.failures


def test_output_folder_is_self_contained(ckpts, onnx_of):
    folder = onnx_of("qwen2", "int4")
    names = {p.name for p in folder.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "edge_onnx.json"} <= names
    manifest = json.loads((folder / "edge_onnx.json").read_text())
    assert manifest["weights"] == "int4" and manifest["architecture"] == "Qwen2ForCausalLM"
    assert manifest["bos_token"] == BOS and manifest["eos_token"] == EOS and manifest["add_bos"] is True
    assert manifest["chat_template"] == (ckpts["qwen2"] / "chat_template.jinja").read_text()
    assert "past_key_values.1.value" in manifest["inputs"] and "present.0.key" in manifest["outputs"]
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == manifest["chat_template"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


# -- the backend contract ---------------------------------------------------------------------------


def decode_from(b, prompt, n):
    b.rollback(0)
    logits = b.eval(prompt)
    toks, all_logits = [], []
    for _ in range(n):
        all_logits.append(logits)
        t = int(np.argmax(logits))
        toks.append(t)
        logits = b.eval([t])
    return toks, all_logits


@pytest.mark.parametrize("kind", ["fp32", "int4"])
def test_rollback_then_redecode_equals_fresh_run(kind, onnx_of):
    with backend(onnx_of("qwen2", kind)) as b:
        prompt = b.tokenize("The quick brown fox jumps over the lazy dog. Then it", add_bos=True)
        fresh_toks, fresh_logits = decode_from(b, prompt, 16)
        b.rollback(len(prompt) + 5)
        assert b.n_past == len(prompt) + 5 and list(b.tokens) == prompt + fresh_toks[:5]
        b.rollback(len(prompt) + 4)
        logits = b.eval([fresh_toks[4]])
        again = []
        for i in range(5, 16):
            np.testing.assert_allclose(logits, fresh_logits[i], rtol=0, atol=1e-5)
            t = int(np.argmax(logits))
            again.append(t)
            logits = b.eval([t])
        assert again == fresh_toks[5:]
        b.rollback(len(prompt) - 1)
        logits = b.eval(prompt[-1:])
        for i in range(16):
            np.testing.assert_allclose(logits, fresh_logits[i], rtol=0, atol=1e-5)
            logits = b.eval([fresh_toks[i]])


def test_probe_leaves_the_state_exactly_as_before(onnx_of):
    from edge.events import Stats
    from edge.control.base import Generation
    from edge.params import SamplingParams
    from edge.think import ThinkParser

    with backend(onnx_of("qwen2", "fp32")) as b:
        prompt = b.tokenize("Count with me: one, two, three,", add_bos=True)
        base_toks, base_logits = decode_from(b, prompt, 10)
        b.rollback(0)
        gen = Generation(b, SamplingParams(temperature=0), ThinkParser(), Stats())
        logits = b.eval(prompt)
        toks = []
        for i in range(10):
            if i in (3, 7):
                n_before = b.n_past
                res = gen.probe("\nFinal answer: ", max_tokens=6, stop=("\n",))
                assert res.cost >= 3 and b.n_past == n_before
            np.testing.assert_allclose(logits, base_logits[i], rtol=0, atol=1e-5)
            t = int(np.argmax(logits))
            toks.append(t)
            logits = b.eval([t])  # after a probe: what the cache left by the rollback gives
        assert toks == base_toks


def test_tokenizer_matches_transformers(ckpts, onnx_of):
    from transformers import AutoTokenizer

    from edge.backends.base import Backend

    hf = AutoTokenizer.from_pretrained(ckpts["qwen2"])
    with backend(onnx_of("qwen2", "fp32")) as b:
        assert isinstance(b, Backend)
        for text in TOKENIZER_TEXTS:
            assert b.tokenize(text, add_bos=False) == hf.encode(text, add_special_tokens=False), text
            if text:
                assert b.tokenize(text, add_bos=b.add_bos) == hf.encode(text), text
        # special=False: special tokens in the text are plain text
        assert b.tokenize(BOS, special=True) == [hf.convert_tokens_to_ids(BOS)]
        assert len(b.tokenize(BOS, special=False)) > 1
        assert b.bos_token == BOS and b.eos_token == EOS
        assert b.eos_token_ids == frozenset({hf.convert_tokens_to_ids(EOS)})
        assert b.n_vocab == 768 and b.token_bytes(767) == b""  # padding rows of the embedding


def test_token_bytes_are_raw_bytes_and_never_split_characters(onnx_of):
    from transformers import AutoTokenizer

    folder = onnx_of("qwen2", "fp32")
    hf = AutoTokenizer.from_pretrained(folder)
    text = "naïve café – 数学 😀🎉 ok <think>x</think>"
    with backend(folder) as b:
        toks = b.tokenize(text)
        assert b"".join(b.token_bytes(t) for t in toks).decode("utf-8") == text == hf.decode(toks)
        dec = codecs.getincrementaldecoder("utf-8")()
        pieces = [dec.decode(b.token_bytes(t)) for t in toks]
        assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
        partial = [t for t in toks if _partial(b.token_bytes(t))]
        assert partial  # some token is only part of a character, so the test bites


def _partial(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_reasoning_controls_run_unchanged_on_onnx(onnx_of):
    from edge.control.budget import ThinkingBudget
    from edge.control.early_exit import EarlyExit
    from edge.events import BudgetExhausted
    from edge.params import SamplingParams
    from edge.runtime import Runtime, collect

    class EveryFewTokens(EarlyExit):
        """Probe every 4 thinking tokens: a random model writes no paragraphs or "Wait"s."""

        def on_token(self, gen, sampled):
            if gen.thinking and not gen.pending_bytes and gen.thinking_tokens > 0 and gen.thinking_tokens % 4 == 0:
                return self.probe_step(gen)
            return None

    greedy = SamplingParams(temperature=0, max_tokens=40)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    with Runtime(str(onnx_of("qwen2", "int4")), backend="onnx", n_ctx=512, threads=1, device="cpu") as rt:
        assert rt.backend.info.name == "onnx" and rt.backend.info.extra["providers"] == ["CPUExecutionProvider"]
        assert rt.render(msgs).endswith("<think>\n")
        # hard cap: thinking stops at the budget and an answer follows
        events = list(rt.chat(msgs, greedy, controllers=[ThinkingBudget(max_thinking=6)]))
        capped = collect(iter(events))
        assert capped.stats.thinking_tokens == 6 and capped.stats.exit_reason == "budget"
        assert any(isinstance(e, BudgetExhausted) for e in events)
        assert capped.stats.answer_tokens > 0 and capped.stats.backend["name"] == "onnx"
        # probes roll back: a record-only early exit changes nothing in the run
        plain = collect(rt.chat(msgs, greedy))
        probed = collect(rt.chat(msgs, greedy, controllers=[EveryFewTokens(record_only=True, probe_max_tokens=4)]))
        assert probed.stats.probes >= 3 and probed.stats.probe_tokens > 0
        assert (probed.reasoning, probed.answer) == (plain.reasoning, plain.answer)
        assert probed.stats.thinking_tokens == plain.stats.thinking_tokens and probed.stats.answer_tokens == plain.stats.answer_tokens


def test_auto_speculation_is_off_on_onnx_with_the_reason(onnx_of, tmp_path, monkeypatch):
    """ONNX Runtime's rollback copies the KV cache: drafts cannot pay, so auto does not speculate
    (and measures nothing); asked for, it runs and gives the same greedy reply."""
    from edge.params import SamplingParams
    from edge.runtime import Runtime
    from edge.speculative import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    greedy = SamplingParams(temperature=0, max_tokens=24)
    msgs = [{"role": "user", "content": "What is 2+2? What is 2+2?"}]
    with Runtime(str(onnx_of("qwen2", "fp32")), backend="onnx", n_ctx=512, threads=1, device="cpu") as rt:
        auto = collect_reply(rt, msgs, greedy)
        assert auto.stats.speculation == "off: the onnx backend has no cheap batched verification of drafts"
        assert auto.stats.draft_tokens == auto.stats.model_steps == 0
        on = collect_reply(rt, msgs, greedy.with_(speculate=True))
        assert on.stats.speculation.startswith("on: requested (the onnx backend has no cheap batched verification")
        assert on.stats.model_steps > 0 and (on.reasoning, on.answer) == (auto.reasoning, auto.answer)
        assert collect_reply(rt, msgs, greedy.with_(speculate=False)).stats.speculation == "off: disabled"
    assert not any(tmp_path.iterdir())  # nothing measured, nothing cached


def collect_reply(rt, msgs, params):
    from edge.runtime import collect

    return collect(rt.chat(msgs, params))


# -- devices, files, errors ---------------------------------------------------------------------------


def test_device_selection(onnx_of):
    import onnxruntime

    from edge.backends.onnx import OnnxBackend, resolve_providers
    from edge.errors import ConfigError

    assert resolve_providers("cpu", ["CPUExecutionProvider"]) == ("cpu", ["CPUExecutionProvider"])
    assert resolve_providers("auto", ["CPUExecutionProvider"]) == ("cpu", ["CPUExecutionProvider"])
    assert resolve_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert resolve_providers("metal", ["CoreMLExecutionProvider", "CPUExecutionProvider"])[1][0] == "CoreMLExecutionProvider"
    with pytest.raises(ConfigError, match="unknown device 'tpu'.*choose one of: auto, cpu, cuda"):
        OnnxBackend(onnx_of("qwen2", "fp32"), device="tpu")
    if "QNNExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ConfigError, match="onnxruntime-qnn"):
            OnnxBackend(onnx_of("qwen2", "fp32"), device="qnn")


def test_context_beyond_the_trained_length_needs_the_opt_in(onnx_of, caplog):
    from edge.errors import ConfigError

    with pytest.raises(ConfigError, match="beyond the 512 this model was trained for"):
        backend(onnx_of("qwen2", "fp32"), n_ctx=513)
    b = backend(onnx_of("qwen2", "fp32"), n_ctx=600, ctx_beyond_training=True)
    try:
        assert b.n_ctx == 600 and any("beyond the 512" in r.getMessage() for r in caplog.records)
    finally:
        b.close()


def test_external_data_and_a_folder_without_manifest(ckpts, onnx_of, tmp_path, monkeypatch):
    import edge.convert.onnx as conv

    monkeypatch.setattr(conv, "EXTERNAL_DATA_MIN_BYTES", 0)  # as for a model over ~1.5 GiB
    folder = conv.to_onnx(ckpts["qwen2"], tmp_path / "ext", weights="fp32")
    assert (folder / "model.onnx.data").is_file()
    assert json.loads((folder / "edge_onnx.json").read_text())["external_data"] == ["model.onnx.data"]
    plain = onnx_of("qwen2", "fp32")
    assert not (plain / "model.onnx.data").exists()  # fp32 under the threshold: one file
    with backend(folder) as a, backend(plain) as b:
        ids = a.tokenize("Let me think step by step.", add_bos=True)
        np.testing.assert_array_equal(a.score(ids), b.score(ids))
    # an export without edge_onnx.json (e.g. from another exporter) reads the HF files instead
    bare = tmp_path / "bare"
    shutil.copytree(plain, bare)
    (bare / "edge_onnx.json").unlink()
    with backend(bare) as a, backend(plain) as b:
        assert (a.bos_token, a.eos_token, a.eos_token_ids, a.add_bos, a.chat_template) == (
            b.bos_token, b.eos_token, b.eos_token_ids, b.add_bos, b.chat_template)
        assert a.info.extra["weights"] == "unknown"


def test_output_is_all_or_nothing(ckpts, tmp_path, monkeypatch):
    import edge.convert.onnx as conv
    from edge.errors import ConfigError, OutputExistsError

    out = tmp_path / "model"

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(conv, "_smoke_test", broken)
    with pytest.raises(RuntimeError):
        conv.to_onnx(ckpts["qwen2"], out)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one
    monkeypatch.undo()
    conv.to_onnx(ckpts["qwen2"], out, weights="fp16")
    with pytest.raises(OutputExistsError):
        conv.to_onnx(ckpts["qwen2"], out)
    conv.to_onnx(ckpts["qwen2"], out, weights="int8", force=True)
    assert json.loads((out / "edge_onnx.json").read_text())["weights"] == "int8"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="holds no ONNX export"):
        conv.to_onnx(ckpts["qwen2"], precious, force=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    precious.joinpath("notes.txt").unlink()
    with pytest.raises(ConfigError, match="fp32, fp16, int8, int4"):
        conv.to_onnx(ckpts["qwen2"], tmp_path / "x", weights="int3")
    with pytest.raises(ConfigError, match="block size"):
        conv.to_onnx(ckpts["qwen2"], tmp_path / "x", weights="int4", block_size=24)


def test_unsupported_model_features_are_refused():
    from edge.convert.onnx import Shape
    from edge.errors import ConversionError

    base = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256}
    Shape(base, Path("config.json"))
    for extra, needle in [
        ({"use_sliding_window": True}, "sliding-window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
        ({"hidden_act": "gelu"}, "activation gelu"),
        ({"architectures": ["BertForMaskedLM"]}, "supported: Qwen2ForCausalLM, LlamaForCausalLM"),
    ]:
        with pytest.raises(ConversionError, match=needle):
            Shape({**base, **extra}, Path("config.json"))


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_cli_errors_are_one_line(ckpts, onnx_of, tmp_path, cli):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(gpt2)
    _one_line_error(cli("convert", "onnx", str(gpt2), str(tmp_path / "o1")),
                    "GPT2LMHeadModel is not supported", "Qwen2ForCausalLM, LlamaForCausalLM")

    no_tok = tmp_path / "no_tok"
    shutil.copytree(ckpts["qwen2"], no_tok)
    (no_tok / "tokenizer.json").unlink()
    _one_line_error(cli("convert", "onnx", str(no_tok), str(tmp_path / "o2")), "no tokenizer.json")
    assert not (tmp_path / "o2").exists()

    corrupt = tmp_path / "corrupt"
    shutil.copytree(onnx_of("qwen2", "int4"), corrupt)
    data = (corrupt / "model.onnx").read_bytes()
    (corrupt / "model.onnx").write_bytes(data[: len(data) // 3])
    _one_line_error(cli("run", "--backend", "onnx", "-m", str(corrupt), "hi"), "not a loadable ONNX model")

    # the CLI knows ONNX Runtime's device names; each backend says what its own build lacks
    model = str(onnx_of("qwen2", "int4"))
    _one_line_error(cli("run", "-m", model, "--device", "xnnpack", "hi"), "no XnnpackExecutionProvider", "it has: ")
    _one_line_error(cli("run", "-m", model, "--device", "tpu", "hi"), "unknown device 'tpu'", "xnnpack", "nnapi")


def test_backend_refuses_missing_or_foreign_models(onnx_of, tmp_path):
    from edge.backends.onnx import OnnxBackend
    from edge.errors import BackendError, InvalidModelError, ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="not found"):
        OnnxBackend(tmp_path / "nothing")
    with pytest.raises(ModelNotFoundError, match="holds no model.onnx"):
        OnnxBackend(tmp_path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(InvalidModelError, match="--backend llamacpp"):
        OnnxBackend(gguf)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(onnx_of("qwen2", "int4"), no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(InvalidModelError, match="has no tokenizer.json"):
        OnnxBackend(no_tok)
    with OnnxBackend(onnx_of("qwen2", "int4") / "model.onnx", device="cpu") as b:  # the .onnx file itself
        assert b.n_ctx == 512  # the model's trained length, below the 4096 default
    with pytest.raises(BackendError, match="closed"):
        b.eval([1])


def test_cli_convert_then_run(ckpts, tmp_path, cli):
    out = tmp_path / "int4"
    proc = cli("convert", "onnx", str(ckpts["qwen2"]), str(out), "--weights", "int4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == f"wrote {out} (int4)"  # nothing from the quantizers' loggers
    proc = cli("run", "--backend", "onnx", "-m", str(out), "--threads", "1", "--temperature", "0",
               "--max-tokens", "12", "--think-budget", "4", "--json", "What is 2+2?")
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["stats"]["backend"]["name"] == "onnx" and reply["stats"]["backend"]["extra"]["weights"] == "int4"
    assert reply["stats"]["thinking_tokens"] == 4 and reply["stats"]["exit_reason"] == "budget"


def test_cli_int4_options_are_recorded(ckpts, tmp_path, cli):
    out = tmp_path / "int4"
    proc = cli("convert", "onnx", str(ckpts["llama"]), str(out), "--weights", "int4", "--symmetric", "--block-size", "16",
               "--embedding-bits", "8", "--int8-layers", "1", "--kv-dtype", "float32", "--accuracy-level", "0")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "edge_onnx.json").read_text())
    assert manifest["quantization"] == {
        "bits": 4, "block_size": 16, "symmetric": True, "attention_bits": 8, "lm_head_bits": 8, "embedding_bits": 8,
        "int8_layers": [1], "int8_down_layers": [], "int8_block_size": 128, "method": "rtn", "accuracy_level": 0,
        "grid_search": False, "size_budget": 1.1}
    assert manifest["tensors"]["down"] == "4-bit sym b16; 8-bit sym b128 in layers 1"  # the plan (b128 fitted to 64)
    assert manifest["kv_dtype"] == "float32" and manifest["embedding"] == "GatherBlockQuantized 8-bit sym b128"
    _one_line_error(cli("convert", "onnx", str(ckpts["llama"]), str(tmp_path / "bad"), "--weights", "int4",
                        "--int8-layers", "7"), "int8 layers 7", "layers 0..1")
    _one_line_error(cli("convert", "onnx", str(ckpts["llama"]), str(tmp_path / "bad"), "--weights", "int4",
                        "--grid-search"), "--grid-search needs --method gptq")
    _one_line_error(cli("convert", "onnx", str(ckpts["llama"]), str(tmp_path / "bad"), "--weights", "int4",
                        "--size-budget", "small"), "--size-budget", "'small'")
    _one_line_error(cli("convert", "onnx", str(ckpts["llama"]), str(tmp_path / "bad"), "--weights", "int4",
                        "--size-budget", "-1"), "size budget must be a positive multiple")
    assert not (tmp_path / "bad").exists()


def test_gptq_export(ckpts, tmp_path):
    from dataclasses import replace

    from edge.convert import verify
    from edge.convert.onnx import to_onnx
    from edge.convert.onnx_quant import INT4

    texts = [" ".join(LOGIT_PROMPTS)] * 2 + ["def f(x):\n    return x * 2\n"]
    rtn = to_onnx(ckpts["qwen2"], tmp_path / "rtn", weights="int4")
    gptq = to_onnx(ckpts["qwen2"], tmp_path / "gptq", weights="int4", quant=replace(INT4, method="gptq"),
                   calibration_texts=texts)
    searched = to_onnx(ckpts["qwen2"], tmp_path / "searched", weights="int4",
                       quant=replace(INT4, method="gptq", grid_search=True), calibration_texts=texts)
    recorded = json.loads((gptq / "edge_onnx.json").read_text())["quantization"]
    assert recorded["method"] == "gptq" and recorded["grid_search"] is False
    assert json.loads((searched / "edge_onnx.json").read_text())["quantization"]["grid_search"] is True
    assert weight_bytes(gptq) == weight_bytes(rtn) == weight_bytes(searched)  # same format, other integers
    data = {f: (f / "model.onnx.data").read_bytes() for f in (rtn, gptq, searched)}
    assert len(set(data.values())) == 3
    report = verify(ckpts["qwen2"], gptq, max_tokens=64, n_threads=1)
    assert report.passed, report.failures


def test_runtime_imports_no_torch(onnx_of):
    code = (
        "import sys\n"
        "from edge.runtime import Runtime\n"
        "from edge.params import SamplingParams\n"
        f"rt = Runtime({str(onnx_of('qwen2', 'int8'))!r}, backend='onnx', threads=1, device='cpu')\n"
        "r = rt.ask('hi', SamplingParams(temperature=0, max_tokens=5))\n"
        "assert r.stats.thinking_tokens + r.stats.answer_tokens == 5\n"
        "heavy = [m for m in ('torch', 'transformers', 'onnx', 'llama_cpp') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr


# -- the project's own tiny reasoning model ------------------------------------------------------------


@pytest.mark.skipif(not (TINY_R1 / "model.safetensors").is_file(), reason="no tiny-r1 checkpoint yet")
def test_tiny_r1_parity(tmp_path, hf_model):
    from transformers import AutoTokenizer

    from edge.benchmarks.tiny_r1.tasks import held_out_split
    from edge.convert.onnx import THRESHOLDS, to_onnx, verify_onnx
    from edge.errors import ConversionError

    src = tmp_path / "tiny-r1"
    for _ in range(3):  # a stable copy: training may be writing a new checkpoint right now
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(TINY_R1, src)
        try:
            fp32 = to_onnx(src, tmp_path / "fp32", force=True)
            break
        except ConversionError:
            time.sleep(2)
    tok = AutoTokenizer.from_pretrained(src)
    # in-distribution text: its own chat template and R1-style traces on held-out problems
    texts = [tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False, add_generation_prompt=True)
             + p.target() for p in held_out_split("validation")[:3]]
    with backend(fp32) as b:
        ids = tok.encode(texts[0], add_special_tokens=False)
        ref = reference_logits(hf_model(src), ids)
        diff = np.abs(b.score(ids) - ref).max()
        assert diff <= 1e-3 * max(1.0, float(np.abs(ref).max())), diff
    for kind in ("int8", "int8-dynamic", "int4"):
        folder = to_onnx(src, tmp_path / kind, **WEIGHTS[kind])
        report = verify_onnx(src, folder, prompts=texts[:-1], heldout=texts[-1], chat=False, max_tokens=200, n_threads=1)
        assert report.passed, report.failures
        assert report.top1_agreement >= THRESHOLDS[kind].min_top1
