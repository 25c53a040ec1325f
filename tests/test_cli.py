"""The command line as a user meets it: streams, REPL, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_help_is_fast_and_imports_nothing_heavy():
    code = (
        "import sys, time; t=time.perf_counter(); from edge.cli.main import cli; "
        "from click.testing import CliRunner; r=CliRunner().invoke(cli, ['--help']); "
        "assert r.exit_code == 0, r.output; assert 'chat' in r.output; "
        "heavy=[m for m in ('llama_cpp','torch','onnxruntime','transformers','numpy') if m in sys.modules]; "
        "print(heavy, time.perf_counter()-t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy, _ = out.rsplit("]", 1)
    assert heavy.strip() == "[", f"heavy modules imported by --help: {out}"


def test_run_prints_answer_on_stdout(cli, smollm2):
    r = cli("run", "Say hello in one word.", "-m", str(smollm2), "--temperature", "0", "--max-tokens", "8", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "Traceback" not in r.stderr


def test_run_json(cli, smollm2):
    r = cli("run", "Hi", "-m", str(smollm2), "--temperature", "0", "--max-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert set(obj) >= {"answer", "reasoning", "stats"}
    assert obj["stats"]["answer_tokens"] == 6 and obj["stats"]["finish_reason"] == "length"
    assert obj["stats"]["backend"]["name"] == "llamacpp"


def test_chat_repl_through_stdin(cli, smollm2):
    r = cli(
        "chat", "-m", str(smollm2), "--temperature", "0", "--max-tokens", "8",
        input="Hello!\n/stats\n/reset\n/help\n/nope\nBye\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") >= 2  # two answers on stdout
    assert "answer_tokens: 8" in r.stderr and "(conversation reset)" in r.stderr
    assert "/reset" in r.stderr and "unknown command /nope" in r.stderr
    assert "Traceback" not in r.stderr and "tiny-r1 is a" not in r.stderr  # the demo-model hint is for tiny-r1 only


def _assert_one_line_error(r, *needles):
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:")
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in r.stderr


def test_missing_model_path(cli, tmp_path):
    _assert_one_line_error(cli("run", "hi", "-m", str(tmp_path / "nope.gguf")), "not found")


def test_file_that_is_not_gguf(cli, tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("definitely not a model\n" * 10)
    _assert_one_line_error(cli("run", "hi", "-m", str(p)), "not a GGUF file")


def test_truncated_gguf(cli, tmp_path, smollm2):
    p = tmp_path / "truncated.gguf"
    with open(smollm2, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(3_000_000))
    _assert_one_line_error(cli("run", "hi", "-m", str(p)), "truncated")


def test_empty_prompt(cli, smollm2):
    _assert_one_line_error(cli("run", "   ", "-m", str(smollm2)), "empty")


def test_prompt_longer_than_context(cli, smollm2):
    _assert_one_line_error(cli("run", "word " * 400, "-m", str(smollm2), "--ctx", "128"), "context")


def test_unknown_device(cli, smollm2):
    _assert_one_line_error(cli("run", "hi", "-m", str(smollm2), "--device", "tpu"), "unknown device")


def test_onnx_only_device_on_a_gguf(cli, smollm2):
    _assert_one_line_error(cli("run", "hi", "-m", str(smollm2), "--device", "xnnpack"), "unknown device 'xnnpack'; choose one of: auto, cpu, cuda, metal")


def test_cuda_on_a_cpu_build_explains_how_to_get_one(cli, smollm2):
    _assert_one_line_error(cli("run", "hi", "-m", str(smollm2), "--device", "cuda"), "GGML_CUDA")


def test_bad_sampling_option(cli, smollm2):
    _assert_one_line_error(cli("run", "hi", "-m", str(smollm2), "--top-p", "2"), "top_p")


@pytest.mark.parametrize("option", ["--temperature", "--top-p", "--min-p", "--repeat-penalty"])
def test_nan_sampling_option_is_one_line(cli, smollm2, option):
    _assert_one_line_error(cli("run", "hi", "-m", str(smollm2), option, "nan"), "must be a finite number, got nan")


def test_seed_minus_one_is_random_other_negative_seeds_are_one_line(cli, smollm2):
    r = cli("run", "Hi", "-m", str(smollm2), "--seed", "-1", "--temperature", "1", "--max-tokens", "2", "--threads", "1")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    _assert_one_line_error(cli("run", "hi", "-m", str(smollm2), "--seed", "-7"), "or -1 for a random seed")
    assert "-1 or none = random" in " ".join(cli("run", "--help").stdout.split())


def test_more_threads_than_cpus_is_one_line(cli, smollm2):
    r = cli("run", "hi", "-m", str(smollm2), "--threads", "100000")
    _assert_one_line_error(r, "100000 threads is more than the", "logical CPUs")
    assert r.returncode == 2  # a refusal, not a crash (was a segfault: 139)


def test_edge_debug_shows_the_traceback(cli, tmp_path):
    r = cli("run", "hi", "-m", str(tmp_path / "nope.gguf"), env={"EDGE_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "ModelNotFoundError" in r.stderr
