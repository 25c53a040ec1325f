"""The benchmark record schema: valid records pass, broken ones fail with a message that
points at the field, and files are written atomically."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from edge.benchmarks.bench import schema
from edge.benchmarks.bench.schema import RecordError
from edge.errors import ConfigError, EdgeError, OutputExistsError

RECORDS = Path(__file__).resolve().parent / "fixtures" / "bench" / "records"


@pytest.fixture(scope="module")
def good() -> dict:
    return json.loads((RECORDS / "laptop-rtx4070.json").read_text())


def test_fixture_records_validate():
    recs = schema.load_records([RECORDS])
    assert len(recs) == 2
    assert {r["device"]["class"] for r in recs} == {"laptop", "phone"}


def test_contributed_records_validate():
    contributed = sorted((Path(__file__).resolve().parent.parent / "benchmarks" / "records").glob("*.json"))
    for rec in schema.load_records(contributed) if contributed else []:
        assert rec["device"]["label"] and rec["results"]


def test_record_error_is_a_config_error():
    assert issubclass(RecordError, ConfigError) and issubclass(RecordError, EdgeError)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["device"]["cpu"].__setitem__("logical_cores", "eight"), "$.device.cpu.logical_cores: expected integer or null, got \"eight\""),
    (lambda r: r["device"].pop("label"), "$.device: missing required field 'label'"),
    (lambda r: r["device"].__setitem__("class", "toaster"), "$.device.class: \"toaster\" is not one of phone, tablet"),
    (lambda r: r["results"]["throughput"]["configs"][1]["prefill"][0]["tok_s"].__setitem__("median", None),
     "$.results.throughput.configs[1].prefill[0].tok_s.median: expected number, got null"),
    (lambda r: r["results"]["overhead"]["runs"][0].__setitem__("ratio", True), "$.results.overhead.runs[0].ratio: expected number, got true"),
    (lambda r: r.__setitem__("results", {}), "$.results: needs at least 1 of: throughput, overhead, reasoning"),
    (lambda r: r["results"]["throughput"].__setitem__("configs", []), "$.results.throughput.configs: needs at least 1 item(s)"),
    (lambda r: r.__setitem__("kind", "something-else"), "$.kind: \"something-else\" is not one of edge-reason-bench"),
])
def test_broken_records_fail_with_the_field_path(good, mutate, message):
    rec = copy.deepcopy(good)
    mutate(rec)
    with pytest.raises(RecordError) as exc:
        schema.validate(rec, source="run.json")
    assert str(exc.value).startswith("run.json: invalid record: ")
    assert message in str(exc.value)


def test_several_problems_are_counted(good):
    rec = copy.deepcopy(good)
    rec["device"].pop("label")
    rec["model"].pop("file")
    rec["model"]["size_bytes"] = -1.5
    with pytest.raises(RecordError, match=r"\(and 2 more problems\)"):
        schema.validate(rec)


@pytest.mark.parametrize("version, hint", [(2, "upgrade edge-reason"), (0, "re-run the benchmark"), ("1", "re-run the benchmark")])
def test_other_schema_versions_are_refused(good, version, hint):
    rec = dict(good, schema_version=version)
    with pytest.raises(RecordError, match=f"schema_version .* is not supported .*{hint}"):
        schema.validate(rec)


def test_not_a_record():
    with pytest.raises(RecordError, match="no schema_version"):
        schema.validate({"hello": 1})
    with pytest.raises(RecordError, match="JSON object, got list"):
        schema.validate([1, 2])


def test_write_is_atomic_and_refuses_to_overwrite(tmp_path, good):
    out = tmp_path / "sub" / "run.json"
    schema.write_record(good, out)
    assert schema.load_record(out) == good
    assert [p.name for p in out.parent.iterdir()] == ["run.json"]  # no temporary left behind
    with pytest.raises(OutputExistsError, match="--force"):
        schema.write_record(good, out)
    with pytest.raises(OutputExistsError):
        schema.check_output_path(out)
    schema.write_record(good, out, force=True)


def test_an_invalid_record_is_never_written(tmp_path, good):
    bad = copy.deepcopy(good)
    bad["device"]["cpu"]["physical_cores"] = "four"
    with pytest.raises(RecordError):
        schema.write_record(bad, tmp_path / "run.json")
    assert list(tmp_path.iterdir()) == []


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(RecordError, match="record not found"):
        schema.load_record(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"schema_version": 1,\n  "kind": }')
    with pytest.raises(RecordError, match=r"not valid JSON \(line 2, column 11"):
        schema.load_record(tmp_path / "bad.json")
    with pytest.raises(RecordError, match="is a folder"):
        schema.load_record(tmp_path)
    with pytest.raises(RecordError, match="no \\*.json records"):
        schema.expand_paths([tmp_path / "empty"] if (tmp_path / "empty").mkdir() is None else [])
