"""Evaluation tasks: loading problems, extracting answers, and checking them.

Every task yields :class:`Item` s with a prompt, a gold answer and a difficulty level. The data
ships inside the package (``edge/benchmarks/data``, read through ``importlib.resources``, so an
installed wheel needs no other folder and no environment variable):

- ``tiny-r1``: the held-out test split of the project's miniature reasoning model
  (``tiny-r1-test.jsonl``; ``tiny-r1-val`` is the validation split; ``tiny-r1-stress`` holds
  levels 9-12, longer chains than any training problem);
- ``gsm8k``, ``math500``, ``aime24``, ``amc23``: public sets (sources and licences in
  ``data/README.md``).

A task is a :class:`TaskSpec`: the file, which fields hold the question, the answer, the id and
the level, the text appended to each question and the scorer. Point any task at your own JSONL
with ``TaskSpec.with_file`` (``edge-reason eval --tasks NAME --data FILE``), or describe a new
one with ``custom_task`` (``--data FILE --question-field F --answer-field F --scorer S``).

Scorers: ``math`` takes the last ``\\boxed{...}`` (else the last number) and compares it with
math equivalence: LaTeX normalisation (``\\dfrac``/``\\frac``, ``\\left``/``\\right``, spaces,
degrees, dollars, text units, ``x =`` prefixes) and numeric comparison of numbers, fractions and
percentages; ``exact`` compares the whole answer text (stripped, case-folded) with the gold.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from importlib import resources
from pathlib import Path

from edge.errors import ConfigError

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
SCORERS = ("math", "exact")


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    gold: str
    level: int | str = ""
    meta: dict = field(default_factory=dict, compare=False)
    scorer: str = "math"


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's problems are and how to read and score them.

    ``file`` is a file name inside the package's data folder or, when ``path`` is set, ignored in
    favour of that path. Field names are tried in order; the gold answer keeps what follows the
    last ``####`` (GSM8K's worked solutions) and drops thousands separators and ``.0``.
    """

    name: str
    file: str = ""
    path: Path | None = None
    question: tuple[str, ...] = ("question", "problem", "prompt")
    answer: tuple[str, ...] = ("answer", "gold", "target")
    id: str = "id"
    level: str = "level"
    suffix: str = ""
    scorer: str = "math"
    validation: str | None = None  # the task whose problems fit budgets and thresholds

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ConfigError(f"unknown scorer {self.scorer!r}; choose one of: {', '.join(SCORERS)}")

    def with_file(self, path: str | Path) -> "TaskSpec":
        return replace(self, path=Path(path))

    def rows(self) -> list[dict]:
        if self.path is not None:
            if not self.path.is_file():
                raise ConfigError(f"task data not found: {self.path}")
            return _jsonl(self.path.read_text(encoding="utf-8"), str(self.path))
        res = resources.files("edge.benchmarks").joinpath("data", self.file)
        try:
            return _jsonl(res.read_text(encoding="utf-8"), self.file)
        except FileNotFoundError:
            raise ConfigError(f"task data {self.file} is missing from the installed package; reinstall edge-reason") from None

    def items(self) -> list[Item]:
        out = []
        for i, r in enumerate(self.rows()):
            q = _field(r, self.question, "question", self, i)
            gold = _gold(_field(r, self.answer, "answer", self, i))
            rid = r.get(self.id, i)
            rid = rid if isinstance(rid, str) else f"{self.name}-{rid}"  # a numeric id is named after the task
            out.append(Item(rid, str(q) + self.suffix, gold, r.get(self.level, ""), scorer=self.scorer))
        return out


TASK_SPECS: dict[str, TaskSpec] = {
    "tiny-r1": TaskSpec("tiny-r1", "tiny-r1-test.jsonl", validation="tiny-r1-val"),
    "tiny-r1-val": TaskSpec("tiny-r1-val", "tiny-r1-val.jsonl"),
    "tiny-r1-stress": TaskSpec("tiny-r1-stress", "tiny-r1-stress.jsonl", validation="tiny-r1-val"),
    "gsm8k": TaskSpec("gsm8k", "gsm8k.jsonl", id="", suffix=MATH_SUFFIX),
    "math500": TaskSpec("math500", "math500.jsonl", id="unique_id", suffix=MATH_SUFFIX),
    "aime24": TaskSpec("aime24", "aime24.jsonl", level="", suffix=MATH_SUFFIX),
    "amc23": TaskSpec("amc23", "amc23.jsonl", level="", suffix=MATH_SUFFIX),
}
TASKS = tuple(TASK_SPECS)


def custom_task(name: str, path: str | Path, *, question: str | None = None, answer: str | None = None,
                scorer: str = "math", suffix: str = "") -> TaskSpec:
    """A task over the user's own JSONL (one object per line)."""
    spec = TaskSpec(name or Path(path).stem, path=Path(path), scorer=scorer, suffix=suffix)
    if question:
        spec = replace(spec, question=(question,))
    if answer:
        spec = replace(spec, answer=(answer,))
    return spec


def task_spec(name: str, data: str | Path | None = None, **fields) -> TaskSpec:
    """The built-in task ``name`` (optionally reading ``data`` instead of the shipped file), or a
    custom task over ``data`` when ``name`` is not built in."""
    if name in TASK_SPECS:
        spec = TASK_SPECS[name]
        if data is not None:
            spec = spec.with_file(data)
        over = {k: v for k, v in fields.items() if v}
        if "question" in over:
            over["question"] = (over["question"],)
        if "answer" in over:
            over["answer"] = (over["answer"],)
        return replace(spec, **over)
    if data is None:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)} (or pass --data FILE)")
    return custom_task(name, data, **{k: v for k, v in fields.items() if v is not None})


def _jsonl(text: str, where: str) -> list[dict]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{where}, line {n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}, line {n}: expected a JSON object")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{where}: no problems in the file")
    return rows


def _field(row: dict, names: tuple[str, ...], what: str, spec: TaskSpec, i: int):
    for n in names:
        if row.get(n) is not None:
            return row[n]
    raise ConfigError(f"task {spec.name}: problem {i + 1} has no {what} field (looked for {', '.join(names)})")


def _gold(x) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    s = str(x)
    if "####" in s:
        s = s.split("####")[-1].strip().replace(",", "")
    return s.strip()


def load_task(name: str | TaskSpec, limit: int | None = None) -> list[Item]:
    spec = name if isinstance(name, TaskSpec) else task_spec(name)
    items = spec.items()
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {limit}")
        items = _spread(items, limit)
    return items


def _spread(items: list[Item], limit: int) -> list[Item]:
    """The first ``limit`` items, taken evenly across levels when items have levels."""
    levels = sorted({i.level for i in items}, key=str)
    if len(levels) <= 1 or limit >= len(items):
        return items[:limit]
    by = {lv: [i for i in items if i.level == lv] for lv in levels}
    out: list[Item] = []
    k = 0
    while len(out) < limit:
        for lv in levels:
            if k < len(by[lv]) and len(out) < limit:
                out.append(by[lv][k])
        k += 1
    return out


# -- answer extraction -------------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    i = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if i == -1:
        return None
    j = text.index("{", i) + 1
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            if depth == 0:
                return text[j:k]
            depth -= 1
    return text[j:]


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    b = last_boxed(text)
    if b is not None:
        return b.strip()
    nums = _NUM.findall(text)
    return nums[-1].replace(",", "") if nums else None


# -- math equivalence ----------------------------------------------------------------------------
def normalize(ans: str) -> str:
    s = ans.strip()
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(mathrm|mathbf|textbf)\{([^}]*)\}", r"\2", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""), ("dfrac", "frac"), ("tfrac", "frac"),
                 ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\$", ""), ("$", ""), ("\\displaystyle", "")):
        s = s.replace(a, b)
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = re.sub(r"\s*(degrees|degree|units|unit|cm|inches|inch|meters|dollars|cents)$", "", s)
    s = s.replace(" ", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1]
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def to_number(s: str) -> Fraction | None:
    s = s.strip()
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    try:
        if m:
            v = Fraction(int(m[2]), int(m[3]))
            return -v if m[1] else v
        m = re.fullmatch(r"(-?\d+)/(\d+)", s)
        if m:
            return Fraction(int(m[1]), int(m[2]))
        if re.fullmatch(r"-?\d+(\.\d+)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def is_equiv(pred: str | None, gold: str) -> bool:
    if pred is None:
        return False
    a, b = normalize(pred), normalize(gold)
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return x == y or abs(float(x) - float(y)) <= 1e-6 * max(1.0, abs(float(y)))
    return False


def score(text: str, item: Item) -> tuple[str | None, bool]:
    if item.scorer == "exact":
        pred = text.strip()
        return pred, pred.casefold() == item.gold.strip().casefold()
    pred = extract_answer(text)
    return pred, is_equiv(pred, item.gold)
