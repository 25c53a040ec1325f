"""GGUF conversion and verification on tiny Qwen2 and Llama checkpoints built in the session.

Qwen2: hidden 256 (K-quant blocks fit), 4 heads / 2 KV heads, q/k/v biases, tied embeddings.
Llama: hidden 128, head_dim 32, untied, llama3 RoPE scaling (rope_freqs tensor), Q/K permuted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from convert_fixtures import BOS, END_THINK, EOS, THINK, TOKENIZER_TEXTS, USER, TinySpec, build_checkpoint

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")

QWEN = TinySpec("qwen2", hidden=256, tied=True)
LLAMA = TinySpec("llama", hidden=128, tied=False)


# Tiny models on a small, possibly busy machine: one thread each for torch and llama.cpp is
# several times faster than two threads spinning against each other.
THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def _single_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


# -- session fixtures: checkpoints, conversions and verification reports, each made once ---------


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("convert_ckpts")
    return {"qwen2": build_checkpoint(root / "qwen2", QWEN), "llama": build_checkpoint(root / "llama", LLAMA)}


@pytest.fixture(scope="session")
def gguf_of(ckpts, tmp_path_factory):
    """gguf_of(arch, quant) -> path of that conversion, converted on first use."""
    from edge.convert import to_gguf

    out_dir = tmp_path_factory.mktemp("convert_out")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str, quant: str) -> Path:
        if (arch, quant) not in cache:
            cache[arch, quant] = to_gguf(ckpts[arch], out_dir / f"{arch}-{quant}.gguf", quant=quant, progress=False)
        return cache[arch, quant]

    return get


@pytest.fixture(scope="session")
def report_of(ckpts, gguf_of):
    from edge.convert import verify

    cache = {}

    def get(arch: str, quant: str):
        if (arch, quant) not in cache:
            cache[arch, quant] = verify(ckpts[arch], gguf_of(arch, quant), n_threads=THREADS)
        return cache[arch, quant]

    return get


def _run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from edge.cli.main import main

    try:
        main(["convert", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


# -- tokenizer and metadata ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tokenizer_matches_hf(arch, ckpts, gguf_of):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(ckpts[arch])
    llm = Llama(str(gguf_of(arch, "f32")), vocab_only=True, verbose=False)
    try:
        for text in TOKENIZER_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == hf.encode(text, add_special_tokens=False), text
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf.encode(text), text
        # <think> is a user-defined token: one id, also without special parsing.
        think_id = hf.convert_tokens_to_ids(THINK)
        assert llm.tokenize(f"a{THINK}b".encode(), add_bos=False, special=False)[1] == think_id
    finally:
        llm.close()


def test_metadata_qwen2(ckpts, gguf_of):
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(gguf_of("qwen2", "f16"))
    kv = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    hf = AutoTokenizer.from_pretrained(ckpts["qwen2"])
    assert kv["general.architecture"] == "qwen2"
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (kv["qwen2.embedding_length"], kv["qwen2.block_count"], kv["qwen2.feed_forward_length"]) == (256, 2, 512)
    assert (kv["qwen2.attention.head_count"], kv["qwen2.attention.head_count_kv"]) == (4, 2)
    assert kv["qwen2.rope.freq_base"] == pytest.approx(10000.0)
    assert kv["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "qwen2"
    assert kv["tokenizer.ggml.bos_token_id"] == hf.convert_tokens_to_ids(BOS)
    assert kv["tokenizer.ggml.eos_token_id"] == hf.convert_tokens_to_ids(EOS)
    assert kv["tokenizer.ggml.add_bos_token"] is True
    assert "<｜Assistant｜><think>" in kv["tokenizer.chat_template"]
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == kv["qwen2.vocab_size"] > len(hf)  # padded to the embedding rows
    assert types[tokens.index(USER)] == gguf.TokenType.CONTROL
    assert types[tokens.index(THINK)] == types[tokens.index(END_THINK)] == gguf.TokenType.USER_DEFINED
    assert types[-1] == gguf.TokenType.UNUSED
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied embeddings
    assert tensors["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def test_metadata_llama(gguf_of):
    import gguf

    reader = gguf.GGUFReader(gguf_of("llama", "f32"))
    kv = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert kv["general.architecture"] == "llama" and kv["tokenizer.ggml.pre"] == "llama-bpe"
    assert kv["llama.rope.dimension_count"] == 32 and kv["llama.attention.head_count_kv"] == 2
    names = {t.name for t in reader.tensors}
    assert {"output.weight", "rope_freqs.weight"} <= names


# -- numerical parity ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_f32_logits_match_transformers(arch, report_of):
    r = report_of(arch, "f32")
    assert r.passed, r.failures
    assert not r.tokenizer_mismatches
    assert r.top1_agreement == 1.0
    assert r.max_abs_logit_diff < 1e-3
    assert r.mean_kl < 1e-8
    assert r.ppl_converted == pytest.approx(r.ppl_source, rel=1e-4)


@pytest.mark.parametrize(("arch", "quant"), [("qwen2", "f16"), ("llama", "bf16")])
def test_half_precision_logits_close(arch, quant, report_of):
    r = report_of(arch, quant)
    assert r.passed, r.failures
    assert r.max_abs_logit_diff < 3e-2
    assert r.mean_kl < 1e-5
    assert r.top1_agreement >= 0.995


def test_q8_0_top1(report_of):
    r = report_of("qwen2", "q8_0")
    assert r.passed, r.failures
    assert r.top1_agreement >= 0.99
    assert r.mean_kl < 1e-3


def test_q4_k_m_top1(gguf_of, report_of):
    import gguf

    types = {t.tensor_type for t in gguf.GGUFReader(gguf_of("qwen2", "q4_k_m")).tensors}
    assert gguf.GGMLQuantizationType.Q4_K in types  # real K-quants, not a fallback
    r = report_of("qwen2", "q4_k_m")
    assert r.passed, r.failures
    assert r.top1_agreement >= 0.90
    assert r.mean_kl < 0.02


def _compare(ref_logits: list, got_logits: list):
    """compare_logits on given per-text logits [seq, vocab] (source and converted)."""
    import numpy as np
    import torch

    from edge.convert.verify import THRESHOLDS, VerifyReport, compare_logits

    table = {tuple(range(len(r))): (r, g) for r, g in zip(ref_logits, got_logits)}
    model = lambda ids: type("Out", (), {"logits": torch.tensor(table[tuple(ids[0].tolist())][0])[None]})  # noqa: E731
    report = VerifyReport("src", "out", "q4_k_m", THRESHOLDS["q4_k_m"])
    return compare_logits(report, model, list(map(list, table)), lambda ids: np.asarray(table[tuple(ids)][1]), "gguf")


def test_verify_reports_the_first_position_apart():
    """The first position of a text (a prediction from one token; Qwen2.5's attention-sink token)
    is reported on its own: a converter that gets it wrong, as llama.cpp does on
    Qwen2.5-Coder-1.5B, still passes when every position with context agrees, and fails when
    one with context does not."""
    import numpy as np

    rng = np.random.default_rng(0)
    ref = [rng.normal(size=(n, 50)) * 3 for n in (6, 9)]
    got = [r.copy() for r in ref]
    for g in got:
        g[0] = rng.normal(size=50) * 3  # the first position: another distribution altogether
    r = _compare(ref, got)
    assert r.passed, r.failures
    assert r.n_positions == 6 + 9 - 2
    assert r.mean_kl < 1e-12 and r.top1_agreement == 1.0
    assert r.first_position_mean_kl > 0.5 and r.first_position_max_kl >= r.first_position_mean_kl
    assert r.mean_kl_all_positions == pytest.approx(r.first_position_mean_kl * 2 / 15)
    got[1][4] = rng.normal(size=50) * 3  # one position with context off: the same size of error fails
    r = _compare(ref, got)
    assert not r.passed and r.mean_kl > 0.08


def test_quantize_existing_gguf(ckpts, gguf_of, tmp_path):
    import gguf

    from edge.convert import quantize, verify

    out = quantize(gguf_of("llama", "f32"), tmp_path / "llama-q8_0.gguf", "q8_0")
    assert gguf.GGUFReader(out).get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    r = verify(ckpts["llama"], out, prompts=["The quick brown fox jumps over the lazy dog."], chat=False, n_threads=THREADS)
    assert r.passed and r.top1_agreement >= 0.99, r.failures


def test_chunked_streaming_writes_identical_file(ckpts, gguf_of, tmp_path, monkeypatch):
    """Row chunks (head-aligned for the permuted Q/K) give byte-identical output."""
    import edge.convert.gguf_writer as writer
    from edge.convert import to_gguf

    monkeypatch.setattr(writer, "CHUNK_BYTES", 4096)
    out = to_gguf(ckpts["llama"], tmp_path / "chunked.gguf", quant="f32", progress=False)
    assert out.read_bytes() == gguf_of("llama", "f32").read_bytes()


def _tensors(path: Path) -> dict[str, bytes]:
    import gguf

    return {t.name: t.data.tobytes() for t in gguf.GGUFReader(path).tensors}


def test_sharded_safetensors_and_pytorch_bin_convert_alike(ckpts, gguf_of, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from edge.convert import to_gguf

    src = ckpts["llama"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="1MB")  # into a fresh folder: never through a link
    for f in src.iterdir():
        if not (sharded / f.name).exists() and f.name != "model.safetensors":
            (sharded / f.name).symlink_to(f)
    assert len(list(sharded.glob("*.safetensors"))) > 1

    binned = _copy_ckpt(src, tmp_path / "bin", skip=("model.safetensors",))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        file = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({k: state[k] for k in part}, binned / file)
        weight_map.update(dict.fromkeys(part, file))
    (binned / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    reference = _tensors(gguf_of("llama", "f32"))
    for folder in (sharded, binned):
        out = to_gguf(folder, tmp_path / f"{folder.name}.gguf", quant="f32", progress=False)
        assert _tensors(out) == reference, folder.name


# -- verify catches broken conversions -----------------------------------------------------------


def test_verify_catches_swapped_layers(ckpts, tmp_path, monkeypatch, capsys):
    import edge.convert.gguf_writer as writer
    from edge.convert import to_gguf, verify

    real_plan = writer.plan_tensors

    def swapped(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        by_name = {p.name: p for p in plan}
        for p in plan:
            if p.name.startswith("blk.0."):
                other = by_name[p.name.replace("blk.0.", "blk.1.", 1)]
                p.source, other.source = other.source, p.source
        return plan

    monkeypatch.setattr(writer, "plan_tensors", swapped)
    bad = to_gguf(ckpts["qwen2"], tmp_path / "swapped.gguf", quant="f32", progress=False)
    r = verify(ckpts["qwen2"], bad, n_threads=THREADS)
    assert not r.passed
    assert any("KL" in f for f in r.failures)

    code, _, err = _run_cli(capsys, "verify", str(ckpts["qwen2"]), str(bad), "-p", "Let me think step by step.", "--threads", "1")
    assert code == 3
    assert "failed verification" in err.strip().splitlines()[-1]


def test_verify_catches_missing_qk_permutation(ckpts, tmp_path, monkeypatch):
    import edge.convert.gguf_writer as writer
    from edge.convert import to_gguf, verify

    monkeypatch.setattr(writer, "_permute_rows", lambda n_head, head_dim: (lambda x: x))
    bad = to_gguf(ckpts["llama"], tmp_path / "unpermuted.gguf", quant="f32", progress=False)
    r = verify(ckpts["llama"], bad, chat=False, n_threads=THREADS)
    assert not r.passed
    assert r.mean_kl > 1e-3


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_convert_and_verify_json(ckpts, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    code, _, err = _run_cli(capsys, "gguf", str(ckpts["llama"]), str(out), "--quant", "f16", "--no-progress")
    assert code == 0 and out.is_file(), err
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    code, stdout, err = _run_cli(capsys, "verify", str(ckpts["llama"]), str(out), "--json", "-p", "Hello world, 1 2 3.", "--threads", "1")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["passed"] and report["quant"] == "f16" and report["tokenizer_mismatches"] == []
    assert report["converted"] == str(out) and report["ppl_converted"] == pytest.approx(report["ppl_source"], rel=1e-2)


def test_cli_missing_config(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    code, _, err = _run_cli(capsys, "gguf", str(tmp_path / "src"), str(tmp_path / "o.gguf"))
    _assert_one_line_error(code, err, "config.json")
    assert not (tmp_path / "o.gguf").exists()


def test_cli_missing_source(tmp_path, capsys):
    code, _, err = _run_cli(capsys, "gguf", str(tmp_path / "nope"), str(tmp_path / "o.gguf"))
    _assert_one_line_error(code, err, "no such folder")


def _copy_ckpt(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).symlink_to(f)
    return dst


def test_cli_unsupported_architecture(ckpts, tmp_path, capsys):
    src = _copy_ckpt(ckpts["qwen2"], tmp_path / "gpt2", skip=("config.json",))
    config = json.loads((ckpts["qwen2"] / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = _run_cli(capsys, "gguf", str(src), str(tmp_path / "o.gguf"))
    _assert_one_line_error(code, err, "GPT2LMHeadModel", "Qwen2ForCausalLM", "LlamaForCausalLM")
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2"]


def test_cli_missing_tokenizer(ckpts, tmp_path, capsys):
    src = _copy_ckpt(ckpts["qwen2"], tmp_path / "notok", skip=("tokenizer.json",))
    code, _, err = _run_cli(capsys, "gguf", str(src), str(tmp_path / "o.gguf"))
    _assert_one_line_error(code, err, "tokenizer.json")
    assert [p.name for p in tmp_path.iterdir()] == ["notok"]


def test_cli_unknown_pre_tokenizer(ckpts, tmp_path, capsys):
    src = _copy_ckpt(ckpts["qwen2"], tmp_path / "gpt2tok", skip=("tokenizer.json",))
    tok = json.loads((ckpts["qwen2"] / "tokenizer.json").read_text(encoding="utf-8"))
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (src / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    code, _, err = _run_cli(capsys, "gguf", str(src), str(tmp_path / "o.gguf"))
    _assert_one_line_error(code, err, "pre-tokenizer", "qwen2", "llama-bpe")


def test_cli_output_exists_refused_without_force(ckpts, tmp_path, capsys, monkeypatch):
    import edge.convert.hf as convert_hf

    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep me")
    # Refused before any heavy work: the checkpoint is never even resolved.
    monkeypatch.setattr(convert_hf, "resolve_source", lambda *a, **k: pytest.fail("resolved the source"))
    code, _, err = _run_cli(capsys, "gguf", str(ckpts["llama"]), str(out))
    _assert_one_line_error(code, err, "exists", "--force")
    assert out.read_bytes() == b"keep me"
    monkeypatch.undo()
    code, _, err = _run_cli(capsys, "gguf", str(ckpts["llama"]), str(out), "--force", "--no-progress")
    assert code == 0, err
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_interrupted_conversion_leaves_nothing(ckpts, tmp_path, capsys, monkeypatch, quant):
    import edge.convert.gguf_writer as writer

    calls = []
    real_tofile = writer._StreamedTensor.tofile

    def interrupt_on_third(self, fp):
        calls.append(self.pt.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_tofile(self, fp)

    monkeypatch.setattr(writer._StreamedTensor, "tofile", interrupt_on_third)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = _run_cli(capsys, "gguf", str(ckpts["qwen2"]), str(out_dir / "m.gguf"), "-q", quant, "--no-progress")
    assert code == 130 and "Traceback" not in err
    assert len(calls) == 3
    assert list(out_dir.iterdir()) == []  # neither output nor temporary files


def test_interrupted_quantization_leaves_nothing(ckpts, tmp_path, capsys, monkeypatch):
    import edge.convert.pipeline as convert_pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_pipeline, "quantize_file", interrupt)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, _ = _run_cli(capsys, "gguf", str(ckpts["qwen2"]), str(out_dir / "m.gguf"), "-q", "q4_k_m", "--no-progress")
    assert code == 130
    assert list(out_dir.iterdir()) == []


def test_hub_id_downloads_only_needed_files(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from edge.convert.hf import resolve_source

    online = {}
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files",
        lambda self, repo_id, revision=None: ["config.json", "model-00001-of-00002.safetensors", "README.md", "pytorch_model.bin"],
    )

    def fake_snapshot(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not in the cache")
        online.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert resolve_source("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B") == tmp_path
    assert online["repo_id"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    patterns = online["allow_patterns"]
    assert "*.safetensors" in patterns and "tokenizer.json" in patterns and "config.json" in patterns
    assert not any(p.endswith(".bin") for p in patterns) and "*.md" not in patterns


def test_hub_id_uses_complete_cached_snapshot_offline(tmp_path, monkeypatch):
    import huggingface_hub

    from edge.convert.hf import resolve_source

    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tmp_path))
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda *a, **k: pytest.fail("went online"))
    assert resolve_source("owner/model") == tmp_path


def test_cli_missing_local_folder_is_not_a_repo_id(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    code, _, err = _run_cli(capsys, "gguf", "models/typo", "o.gguf")
    _assert_one_line_error(code, err, "models/typo", "no such folder")


def test_cli_quantize_rejects_non_gguf(tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    code, _, err = _run_cli(capsys, "quantize", str(junk), str(tmp_path / "q.gguf"), "-q", "q8_0")
    assert code == 2 and "failed to quantize" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf"]
