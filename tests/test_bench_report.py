"""Reports from fixture records of two devices: markdown tables and PNG plots."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge.benchmarks.bench import report
from edge.cli.main import main

RECORDS = Path(__file__).resolve().parent / "fixtures" / "bench" / "records"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def records():
    return report.load_records(sorted(RECORDS.glob("*.json")))


def test_markdown_merges_devices(records):
    md = report.markdown(records)
    assert md.startswith("# edge-reason benchmarks (2 records)")
    for heading in ("## Devices", "## Throughput", "## Overhead", "## Reasoning"):
        assert heading in md
    # one row per device, with what it is
    assert "| 11th-gen-intel-core-i7-1165g7-8t | laptop | 11th Gen Intel(R) Core(TM) i7-1165G7 @ 2.80GHz | 4/8 |" in md
    assert "NVIDIA GeForce RTX 4070 Laptop GPU (8.0 GiB)" in md
    assert "SM8250: 1x Cortex-A77 @2.84 GHz + 3x Cortex-A77 @2.42 GHz + 4x Cortex-A55 @1.80 GHz" in md
    # throughput columns are the union of the records' lengths; missing cells are dashes
    rows = report.throughput_rows(records)
    assert len(rows) == 4
    phone = [r for r in rows if r["device · quant"] == "oneplus-kb2003 · Q8_0"]
    assert [r["threads"] for r in phone] == [4, 8]
    assert phone[0]["prefill@2048 tok/s"] is None and phone[0]["prefill@128 tok/s"].count("[") == 1
    laptop_gpu = next(r for r in rows if r["gpu layers"] == -1)
    assert float(laptop_gpu["decode@64 tok/s"].split()[0]) > 100
    # overhead ratio and reasoning policies
    assert "| 0.984 |" in md and "| 0.912 |" in md
    reasoning = report.reasoning_rows(records)
    assert [r["policy"] for r in reasoning[:3]] == ["unlimited", "budget:128", "early-exit"]
    assert reasoning[0]["accuracy %"] == "100.0"


def test_write_report_makes_plots(tmp_path, records):
    files = report.write_report(records, tmp_path / "out")
    names = sorted(p.name for p in files)
    assert names == ["accuracy_vs_thinking.png", "report.md", "throughput.png", "time_to_answer.png"]
    for p in files:
        assert p.stat().st_size > 1000
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG
    md = (tmp_path / "out" / "report.md").read_text()
    assert "![throughput](throughput.png)" in md
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_plot_labels_name_the_model(records):
    labels = [report.plot_entry(r) for r in records]
    assert all(r["model"]["quant"] in label and r["device"]["label"] in label for r, label in zip(records, labels))
    long = dict(records[0], model=dict(records[0]["model"], name="A Very Long Model Name That Goes On And On"))
    assert "A Very Long Model Nam…" in report.plot_entry(long)


def test_plots_skip_missing_data(tmp_path, records):
    only_throughput = [dict(r, results={"throughput": r["results"]["throughput"]}) for r in records]
    files = report.write_report(only_throughput, tmp_path)
    assert sorted(p.name for p in files) == ["report.md", "throughput.png"]
    assert "## Reasoning" not in (tmp_path / "report.md").read_text()


def test_cli_report(tmp_path, capsys):
    main(["bench", "report", str(RECORDS), "--out", str(tmp_path / "rep"), "--no-plots"])
    out, err = capsys.readouterr()
    assert "## Throughput" in out
    assert (tmp_path / "rep" / "report.md").read_text().startswith("# edge-reason benchmarks (2 records)")
    assert "wrote" in err and not (tmp_path / "rep" / "throughput.png").exists()


def test_cli_report_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDGE_DEBUG", raising=False)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    future = tmp_path / "future.json"
    rec = json.loads((RECORDS / "phone-sm8250.json").read_text())
    future.write_text(json.dumps(dict(rec, schema_version=99)))
    broken = tmp_path / "broken.json"
    rec["device"]["cpu"]["logical_cores"] = "eight"
    broken.write_text(json.dumps(rec))
    cases = [
        (tmp_path / "missing.json", "record not found"),
        (bad_json, "is not valid JSON (line 1, column 2"),
        (future, "schema_version 99 is not supported (this edge-reason reads version 1); upgrade edge-reason"),
        (broken, "$.device.cpu.logical_cores: expected integer or null"),
    ]
    for path, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["bench", "report", str(RECORDS / "laptop-rtx4070.json"), str(path)])
        out, err = capsys.readouterr()
        assert exc.value.code == 2, (path, err)
        assert err.count("\n") == 1 and err.startswith("error: "), err
        assert message in err, err
        assert out == ""


def test_report_accepts_a_copied_folder(tmp_path):
    shutil.copytree(RECORDS, tmp_path / "recs")
    md, files = report.report([tmp_path / "recs"])
    assert "(2 records)" in md and files == []
