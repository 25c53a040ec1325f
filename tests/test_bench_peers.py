"""``edge-reason bench --suite peers`` on SmolLM2 with the real llama-bench and llama-server
(built by .ci/build-peers; skipped without them locally, failed under CI)."""

from __future__ import annotations

import json

from peers import require_peer


def test_peers_suite_runs_every_contender_interleaved_and_records_ratios(cli, smollm2, tmp_path):
    require_peer("llama-server")
    require_peer("llama-bench")
    out = tmp_path / "peers.json"
    r = cli("bench", "run", str(smollm2), "--suite", "peers", "--quick", "--threads", "1", "--repeats", "2",
            "--overhead-tokens", "12", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    peers = record["results"]["peers"]
    assert set(record["results"]) == {"peers"} and peers["rounds"] == 2 and peers["tokens"] == 12 and peers["threads"] == 1
    rows = {c["name"]: c for c in peers["contenders"]}
    assert list(rows) == ["llama-bench", "llama-server", "llama-server ngram", "llama-cpp-python", "edge-reason", "edge-reason --speculate"]
    for name, c in rows.items():
        assert c["decode_tok_s"]["n"] == 2 and c["decode_tok_s"]["min"] > 0, name
        ratios = [a / b for a, b in zip(c["decode_tok_s"]["values"], rows["edge-reason"]["decode_tok_s"]["values"])]
        assert c["decode_ratio_to_edge"]["values"] == [round(x, 6) for x in ratios]  # paired per round
    assert rows["edge-reason"]["decode_ratio_to_edge"]["median"] == 1.0
    assert rows["llama-bench"]["prefill_tok_s"]["n"] == 2 and rows["llama-server"]["prefill_tok_s"]["n"] == 2
    # greedy, the same prompt: the same tokens as edge-reason
    assert rows["llama-server"]["same_tokens"] and rows["llama-cpp-python"]["same_tokens"] and rows["edge-reason --speculate"]["same_tokens"]
    assert "## Peers" in r.stdout and "llama-server ngram" in r.stdout


def test_peers_suite_without_the_programs_is_one_line(cli, smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_LLAMA_SERVER", str(tmp_path / "missing"))
    r = cli("bench", "run", str(smollm2), "--suite", "peers", "--quick", "--out", str(tmp_path / "x.json"))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "needs llama.cpp's llama-server" in lines[0] and ".ci/build-peers" in lines[0], r.stderr
