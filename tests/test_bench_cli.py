"""``edge-reason bench``: a real --quick run on a real model, and option errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edge.benchmarks.bench import schema
from edge.benchmarks.bench.suites import BenchConfig, spread
from edge.cli.main import main
from edge.errors import ConfigError
from edge.model_ref import BUNDLED_DIR, DEFAULT_MODEL_FILE
from tests.conftest import run_cli

RECORD = Path(__file__).resolve().parent / "fixtures" / "bench" / "records" / "phone-sm8250.json"


@pytest.fixture(scope="module")
def model(smollm2) -> Path:
    bundled = BUNDLED_DIR / DEFAULT_MODEL_FILE
    return bundled if bundled.exists() else smollm2


def test_quick_run_writes_a_valid_record(tmp_path, model):
    out = tmp_path / "records" / "run.json"
    # `bench MODEL` is `bench run MODEL`; lengths are cut down so the test stays short
    # (OpenMP threads that spin while waiting collapse on a loaded test machine; this test checks
    # the record, not the speed, so they sleep instead)
    r = run_cli("bench", str(model), "--quick", "--threads", "1", "--prompt-lengths", "16,32", "--depths", "16",
                "--decode-tokens", "4", "--repeats", "2", "--warmup", "0", "--overhead-tokens", "4", "--limit", "1",
                "--policy", "unlimited", "--policy", "budget:8", "--max-tokens", "8", "--device-name", "test-box",
                "--out", str(out), env={"OMP_WAIT_POLICY": "PASSIVE"}, timeout=600)
    assert r.returncode == 0, r.stderr
    rec = schema.load_record(out)
    assert rec["device"]["label"] == "test-box"
    assert rec["model"]["file"] == model.name and rec["model"]["quant"]
    assert str(model.parent) not in out.read_text()  # portable: no local paths
    assert rec["config"]["quick"] is True and rec["config"]["threads"] == [1]
    assert rec["device"]["software"]["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert len(rec["conditions"]["load_average_start"]) == 3

    tp = rec["results"]["throughput"]["configs"]
    assert len(tp) == 1 and tp[0]["threads"] == 1 and tp[0]["gpu_layers"] == 0
    assert [p["tokens"] for p in tp[0]["prefill"]] == [16, 32]
    assert [(d["depth"], d["tokens"]) for d in tp[0]["decode"]] == [(16, 4)]
    assert all(p["tok_s"]["n"] == 2 and p["tok_s"]["median"] > 0 for p in tp[0]["prefill"] + tp[0]["decode"])
    assert tp[0]["load_seconds"] > 0 and tp[0]["ttft"]["seconds"]["median"] > 0
    assert tp[0]["peak_rss_bytes"] > 10 * 2**20 and tp[0]["ru_maxrss_bytes"] >= tp[0]["peak_rss_bytes"] // 2

    ov = rec["results"]["overhead"]["runs"]
    assert len(ov) == 1 and ov[0]["threads"] == 1 and ov[0]["tokens"] == 4 and ov[0]["ratio"] > 0
    # both loops ran through one llama context, each from an emptied KV cache: same tokens
    assert ov[0]["same_tokens"] is True

    rs = rec["results"]["reasoning"]
    assert rs["task"] == "tiny-r1" and rs["n_problems"] == 1
    assert [p["policy"] for p in rs["policies"]] == ["unlimited", "budget:8"]
    assert len(rs["records"]) == 2 and all(0 <= p["accuracy"] <= 1 for p in rs["policies"])

    assert "## Throughput" in r.stdout and "## Overhead" in r.stdout and "## Reasoning" in r.stdout
    assert re.search(r"\[\s*\d+\.\d+s\] throughput threads=1 gpu_layers=0: prefill", r.stderr)  # progress
    assert f"wrote {out}" in r.stderr


def run_main(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--suite", "speed"], "unknown suite speed"),
    (["--threads", "two"], "'two' is not an integer"),
    (["--threads", "0"], "0 is out of range for --threads"),
    (["--gpu-layers", "-1"], "needs a llama-cpp-python build with GPU offload"),
    (["--task", "nope"], "unknown task 'nope'"),
    (["--policy", "budget:lots"], "bad value 'lots'"),
    (["--repeats", "0"], "repeats must be >= 1"),
])
def test_bad_options_fail_before_measuring(capsys, monkeypatch, smollm2, args, message):
    monkeypatch.delenv("EDGE_DEBUG", raising=False)
    if args[0] == "--gpu-layers":
        from edge.backends.llamacpp import offload_supported

        if offload_supported():
            pytest.skip("this build can offload")
    code, err = run_main(capsys, "bench", "run", str(smollm2), "--quick", *args)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 or "Usage" in err


def test_existing_out_is_refused_before_measuring(tmp_path, capsys, smollm2):
    out = tmp_path / "run.json"
    out.write_text("{}")
    code, err = run_main(capsys, "bench", str(smollm2), "--quick", "--out", str(out))
    assert code == 2 and "exists; pass --force" in err
    assert out.read_text() == "{}"


def test_missing_model_is_one_line(capsys, tmp_path):
    code, err = run_main(capsys, "bench", str(tmp_path / "nope.gguf"), "--quick", "--suite", "throughput")
    assert code == 2 and err.startswith("error: model not found")


def test_group_help_lists_subcommands(capsys):
    main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "run " in out and "report " in out and "bench MODEL" in out


def test_quick_config_and_spread():
    q = BenchConfig.quick_config(threads=(1, 2))
    assert q.quick and q.threads == (1, 2) and q.repeats == 3 and max(q.prompt_lengths) <= q.n_ctx
    with pytest.raises(ConfigError, match="unknown suite"):
        BenchConfig(suites=("nope",))
    s = spread([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["q1"] <= s["median"] <= s["q3"]
    assert spread([5.0])["q1"] == spread([5.0])["q3"] == 5.0


def test_fixture_record_roundtrip():
    assert json.loads(RECORD.read_text())["schema_version"] == schema.SCHEMA_VERSION


def test_loop_cost_replays_a_real_run():
    from edge.benchmarks.loop_cost import run_loop_cost

    res = run_loop_cost(None, tokens=16, repeats=3)  # the bundled tiny-r1
    assert res["model"] == "tiny-r1" and res["tokens"] == 16
    for key in ("parser_only", "full_loop"):
        assert 0 < res[key]["us_per_token_min"] <= res[key]["us_per_token_median"]
