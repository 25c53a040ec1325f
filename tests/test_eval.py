"""Evaluation harness: tasks, answer checking, policies, summaries (no model needed)."""

from __future__ import annotations

import json

import pytest

from edge.benchmarks import harness
from edge.benchmarks.tasks import Item, extract_answer, is_equiv, last_boxed, load_task, score
from edge.errors import ConfigError


@pytest.mark.parametrize(
    "pred,gold,ok",
    [
        ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
        ("0.5", "\\frac12", True),
        ("1/2", "\\frac{1}{2}", True),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
        ("x = 5", "5", True),
        ("90^\\circ", "90", True),
        ("\\$18", "18", True),
        ("10\\%", "10", True),
        ("1,000", "1000", True),
        ("\\text{(C)}", "(C)", True),
        ("27", "27.0", True),
        ("3", "4", False),
        ("\\frac{1}{3}", "0.33", False),
        (None, "1", False),
    ],
)
def test_math_equivalence(pred, gold, ok):
    assert is_equiv(pred, gold) is ok


def test_answer_extraction():
    assert last_boxed("so \\boxed{\\frac{1}{2}} and later \\boxed{7}") == "7"
    assert last_boxed("\\boxed{\\sqrt{2}}") == "\\sqrt{2}"
    assert extract_answer("the answer is 1,234.") == "1234"
    assert extract_answer("no digits") is None
    assert score("**Final Answer**\n\\boxed{17}", Item("x", "q", "17")) == ("17", True)


def test_tasks_load():
    tiny = load_task("tiny-r1")
    assert len(tiny) == 400 and {i.level for i in tiny} == set(range(1, 9))
    sl = load_task("tiny-r1", limit=16)
    assert sorted(i.level for i in sl) == sorted(list(range(1, 9)) * 2)
    g = load_task("gsm8k", limit=3)
    assert len(g) == 3 and g[0].gold.lstrip("-").isdigit() and "\\boxed{}" in g[0].prompt
    assert len(load_task("math500")) == 500 and len(load_task("aime24")) == 30 and len(load_task("amc23")) == 40
    with pytest.raises(ConfigError):
        load_task("mmlu")
    with pytest.raises(ConfigError):
        load_task("gsm8k", limit=0)


def test_policy_parsing():
    names = [p.name for spec in ("unlimited", "budget:16,32", "early-exit", "dynasor:3", "adaptive:0.5,1") for p in harness.parse_policies(spec)]
    assert names == ["unlimited", "budget:16", "budget:32", "early-exit:0.95", "dynasor:3", "adaptive:0.5", "adaptive:1.0"]
    for bad in ("budget", "budget:-5", "budget:x", "early-exit:1.5", "vibes", "unlimited:3", "effort:extreme", "dynasor:0"):
        with pytest.raises(ConfigError):
            harness.parse_policies(bad)


def rec(pid, policy, think, probe=0, correct=True, **kw):
    return {"id": pid, "level": 1, "policy": policy, "family": policy.split(":")[0], "correct": correct,
            "thinking_tokens": think, "probe_tokens": probe, "seconds": 0.1, **kw}


def test_summary_savings_and_oracle_efficiency():
    records = [
        rec("a", "oracle", 100, oracle_savings=60),
        rec("b", "oracle", 100, oracle_savings=40),
        rec("a", "early-exit:0.9", 40, probe=10),
        rec("b", "early-exit:0.9", 60, probe=10, correct=False),
        rec("a", "budget:50", 50),
        rec("b", "budget:50", 50),
    ]
    rows = {r["policy"]: r for r in harness.summarize(records)}
    ee = rows["early-exit:0.9"]
    assert ee["accuracy"] == 0.5 and ee["net_tokens"] == 60
    assert ee["saved_net"] == pytest.approx((200 - 120) / 200)
    assert ee["oracle_share"] == pytest.approx(100 / 200)
    assert ee["efficiency"] == pytest.approx(80 / 100)
    assert rows["oracle"]["saved_net"] == 0
    md = harness.markdown_table(list(rows.values()))
    assert "early-exit:0.9" in md and md.count("\n") == 5


def test_outputs_are_written_whole(tmp_path):
    records = [rec("a", "unlimited", 10), rec("a", "budget:5", 5, correct=False)]
    rows = harness.summarize(records)
    files = harness.write_outputs(tmp_path, records, rows)
    assert all(f.exists() and f.stat().st_size > 0 for f in files)
    assert [json.loads(l)["policy"] for l in (tmp_path / "records.jsonl").read_text().splitlines()] == ["unlimited", "budget:5"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no part file left behind


def test_tasks_read_the_packaged_data_not_a_folder_beside_the_repository(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    val = load_task("tiny-r1-val")
    assert len(val) == 160 and {i.level for i in val} == set(range(1, 9))
    assert not {i.prompt for i in val} & {i.prompt for i in load_task("tiny-r1")}
    stress = load_task("tiny-r1-stress")
    assert {i.level for i in stress} == {9, 10, 11, 12}
    m = load_task("math500", limit=5)
    assert all(i.id.startswith("test/") for i in m) and len({i.level for i in m}) == 5


def test_a_task_reads_the_users_own_jsonl(tmp_path):
    from edge.benchmarks.tasks import task_spec

    f = tmp_path / "mine.jsonl"
    f.write_text('{"q": "2+2?", "a": 4.0, "id": "x1"}\n\n{"q": "3+3?", "a": "#### 6", "id": 7}\n')
    items = load_task(task_spec("mine", f, question="q", answer="a"))
    assert [(i.id, i.prompt, i.gold) for i in items] == [("x1", "2+2?", "4"), ("mine-7", "3+3?", "6")]
    # a built-in task pointed at another file keeps its own reading and scoring rules
    t = tmp_path / "tiny.jsonl"
    t.write_text('{"id": "t0", "level": 3, "question": "a = 1. b = a + 1. What is b?", "answer": 2}\n')
    (tiny,) = load_task(task_spec("tiny-r1", t))
    assert (tiny.id, tiny.level, tiny.gold) == ("t0", 3, "2") and task_spec("tiny-r1", t).validation == "tiny-r1-val"
    (g,) = load_task(task_spec("gsm8k", t))
    assert g.prompt.endswith("\\boxed{}.")
    exact = load_task(task_spec("names", f, question="q", answer="a", scorer="exact", suffix=" Answer:"))
    assert exact[0].prompt == "2+2? Answer:" and score(" 4 ", exact[0]) == ("4", True) and score("4.0", exact[0])[1] is False


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"q": 1}\nnot json\n', "line 2: not JSON"),
        ('[1, 2]\n', "line 1: expected a JSON object"),
        ("\n\n", "no problems"),
        ('{"question": "x"}\n', "has no answer field"),
    ],
)
def test_bad_task_files_say_what_is_wrong(tmp_path, content, message):
    from edge.benchmarks.tasks import task_spec

    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_task(task_spec("bad", f))
    with pytest.raises(ConfigError, match="task data not found"):
        load_task(task_spec("gsm8k", tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="unknown scorer"):
        task_spec("bad", f, scorer="fuzzy")
    with pytest.raises(ConfigError, match="or pass --data"):
        task_spec("mmlu")


def test_evaluation_resumes_from_its_journal(tmp_path):
    from tests.scripted import ScriptedBackend

    from edge.params import SamplingParams
    from edge.runtime import Runtime

    tpl = "{% for m in messages %}{{ m['content'] }}{% endfor %}<think>\n"
    backend = ScriptedBackend(["Step.", "\n\n", "So 7.", "\n\n", "Yes.", "</think>"], "\n\\boxed{7}", chat_template=tpl)
    rt = Runtime(backend=backend)
    items = [Item(f"q{i}", "What is x?", "7") for i in range(4)]
    pols = harness.parse_policies("unlimited") + harness.parse_policies("oracle")
    params = SamplingParams(temperature=0, max_tokens=64)
    journal, settings = tmp_path / "progress.jsonl", {"model": "scripted", "prompt": None}
    first = harness.evaluate(rt, items, pols, params, journal=journal, settings=settings)
    assert len(first) == 8 and all(r["correct"] for r in first)
    oracle = [r for r in first if r["policy"] == "oracle"][0]
    assert oracle["trials"] and all(len(t) == 7 for t in oracle["trials"])  # at, answer, confidence, cost, finished, chars, stream
    assert all(0 < t[5] <= len(oracle["reasoning"]) and 0.0 < t[6] <= 1.0 for t in oracle["trials"])
    # killed after three records, in the middle of writing the fourth
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    evals = backend.evals
    again = harness.evaluate(rt, items, pols, params, journal=journal, settings=settings)
    assert [(r["id"], r["policy"]) for r in again] == [(r["id"], r["policy"]) for r in first]
    assert [r["thinking_tokens"] for r in again] == [r["thinking_tokens"] for r in first]
    ran = backend.evals - evals
    assert 0 < ran < evals  # only the five missing pairs ran
    with pytest.raises(ConfigError, match="other settings"):
        harness.evaluate(rt, items, pols, params, journal=journal, settings={"model": "another"})


def test_a_journal_from_before_a_new_sampling_field_resumes_while_the_field_is_at_its_default(tmp_path):
    """A journal written before ``speculate`` existed lacks it; off (eval's default) the run is the
    same, so it resumes; turned on or auto (or any other value changed) it is another run."""
    import dataclasses
    import json

    from tests.scripted import ScriptedBackend

    from edge.params import SamplingParams
    from edge.runtime import Runtime

    tpl = "{% for m in messages %}{{ m['content'] }}{% endfor %}<think>\n"
    rt = Runtime(backend=ScriptedBackend(["Step.", "\n\n", "So 7.", "</think>"], "\n\\boxed{7}", chat_template=tpl))
    items = [Item(f"q{i}", "What is x?", "7") for i in range(2)]
    pols = harness.parse_policies("unlimited")
    params = SamplingParams(temperature=0, max_tokens=64, speculate=False)
    settings = lambda p: {"model": "scripted", "sampling": dataclasses.asdict(p)}  # noqa: E731
    journal = tmp_path / "progress.jsonl"
    harness.evaluate(rt, items[:1], pols, params, journal=journal, settings=settings(params))
    lines = journal.read_text().splitlines()
    head = json.loads(lines[0])
    del head["settings"]["sampling"]["speculate"]  # as written before the field existed
    journal.write_text("\n".join([json.dumps(head)] + lines[1:]) + "\n")
    again = harness.evaluate(rt, items, pols, params, journal=journal, settings=settings(params))
    assert len(again) == 2
    for mode in (True, None):
        with pytest.raises(ConfigError, match="other settings"):
            on = dataclasses.replace(params, speculate=mode)
            harness.evaluate(rt, items, pols, on, journal=journal, settings=settings(on))
    with pytest.raises(ConfigError, match="other settings"):
        longer = dataclasses.replace(params, max_tokens=65)
        harness.evaluate(rt, items, pols, longer, journal=journal, settings=settings(longer))
