"""Evaluation tasks: loading problems, extracting answers, and checking them.

Every task yields :class:`Item` s with a prompt, a gold answer and a difficulty level:

- ``tiny-r1``: the held-out test split of the project's miniature reasoning model
  (``benchmarks/tiny_r1/data/test.jsonl``; ``tiny-r1-val`` is the validation split;
  ``tiny-r1-stress`` holds levels 9-12, longer chains than any training problem);
- ``gsm8k``, ``math500``, ``aime24``, ``amc23``: public sets read from the shared data folder
  (``EDGE_DATA_DIR`` or ``../shared/data`` next to the repository).

Answers are extracted from the last ``\\boxed{...}`` (else the last number) and compared with
math equivalence: LaTeX normalisation (``\\dfrac``/``\\frac``, ``\\left``/``\\right``, spaces,
degrees, dollars, text units, ``x =`` prefixes) and numeric comparison of numbers, fractions
and percentages.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from edge.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
TINY_DIR = Path(__file__).resolve().parent / "tiny_r1" / "data"
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
TASKS = ("tiny-r1", "tiny-r1-val", "tiny-r1-stress", "gsm8k", "math500", "aime24", "amc23")


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    gold: str
    level: int | str = ""
    meta: dict = field(default_factory=dict, compare=False)


def data_dir() -> Path:
    env = os.environ.get("EDGE_DATA_DIR")
    if env:
        return Path(env)
    for cand in (REPO.parent / "shared" / "data", REPO / "shared" / "data"):
        if cand.exists():
            return cand
    raise ConfigError("evaluation data not found: set EDGE_DATA_DIR to the folder with gsm8k.jsonl, math500.jsonl, ...")


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise ConfigError(f"task data not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_task(name: str, limit: int | None = None) -> list[Item]:
    if name in ("tiny-r1", "tiny-r1-val", "tiny-r1-stress"):
        if name in ("tiny-r1", "tiny-r1-stress"):
            rows = _jsonl(TINY_DIR / ("test.jsonl" if name == "tiny-r1" else "stress.jsonl"))
        else:
            from benchmarks.tiny_r1.tasks import held_out_split

            rows = [{"id": p.id, "level": p.level, "question": p.question, "answer": p.answer} for p in held_out_split("validation")]
        items = [Item(r["id"], r["question"], str(r["answer"]), r["level"]) for r in rows]
    elif name == "gsm8k":
        rows = _jsonl(data_dir() / "gsm8k.jsonl")
        items = [Item(f"gsm8k-{i}", r["question"] + MATH_SUFFIX, r["answer"].split("####")[-1].strip().replace(",", "")) for i, r in enumerate(rows)]
    elif name == "math500":
        rows = _jsonl(data_dir() / "math500.jsonl")
        items = [Item(r.get("unique_id", f"math500-{i}"), r["problem"] + MATH_SUFFIX, str(r["answer"]), r.get("level", "")) for i, r in enumerate(rows)]
    elif name in ("aime24", "amc23"):
        rows = _jsonl(data_dir() / f"{name}.jsonl")
        items = [Item(f"{name}-{r.get('id', i)}", (r.get("problem") or r.get("question")) + MATH_SUFFIX, _num(r["answer"])) for i, r in enumerate(rows)]
    else:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
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


def _num(x) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


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
    pred = extract_answer(text)
    return pred, is_equiv(pred, item.gold)
