"""The teacher: variable-chain problems with R1-style thinking traces.

Level ``L`` (1..8) is the number of derived variables.  Example, level 3::

    a = 7. b = a + 5. c = b - 3. d = c + 8. What is d?

The teacher writes a trace that works each substitution out, states the result,
and (with probability 0.9) appends a "Wait, let me check." paragraph that redoes
the work -- the overthinking that early exit is meant to skip.  Rarely (p=0.04
per step) a step contains a slip that is immediately corrected.
"""
from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

LEVELS = tuple(range(1, 9))
# longer chains than any training problem: held out to show where the model stops generalising
STRESS_LEVELS = tuple(range(9, 13))
CHECK_PROB = 0.9
SLIP_PROB = 0.04
SPLIT_SEEDS = {"test": 20250101, "validation": 20250202, "stress": 20250303}
SPLIT_SIZES = {"test": 50, "validation": 20, "stress": 25}  # problems per level
SPLIT_LEVELS = {"test": LEVELS, "validation": LEVELS, "stress": STRESS_LEVELS}
TRAIN_SEED = 12345
# the shipped evaluation data of the package (edge.benchmarks/data): tiny-r1-{test,val,stress}.jsonl
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SPLIT_FILES = {"test": "tiny-r1-test.jsonl", "validation": "tiny-r1-val.jsonl", "stress": "tiny-r1-stress.jsonl"}

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class Problem:
    id: str
    level: int
    question: str
    answer: int
    trace: str

    def target(self) -> str:
        """Assistant output after the generation prompt's ``<think>\\n`` (EOS not included)."""
        return f"{self.trace}\n{THINK_CLOSE}\n\n**Final Answer**\n\\boxed{{{self.answer}}}"

    def assistant_output(self) -> str:
        """Full assistant output, including the opening ``<think>\\n`` (EOS not included)."""
        return f"{THINK_OPEN}\n{self.target()}"


def make_problem(rng: random.Random, level: int, pid: str = "") -> Problem:
    if level not in LEVELS + STRESS_LEVELS:
        raise ValueError(f"level must be in 1..12, got {level}")
    names = rng.sample(string.ascii_lowercase, level + 1)
    values = [rng.randint(0, 99)]
    ops: list[tuple[str, int]] = []
    for _ in range(level):
        prev = values[-1]
        k = rng.randint(1, 9)
        choices = [o for o, ok in (("+", prev + k <= 99), ("-", prev - k >= 0)) if ok]
        op = rng.choice(choices)
        values.append(prev + k if op == "+" else prev - k)
        ops.append((op, k))

    target = names[-1]
    q_parts = [f"{names[0]} = {values[0]}."]
    for i, (op, k) in enumerate(ops):
        q_parts.append(f"{names[i + 1]} = {names[i]} {op} {k}.")
    question = " ".join(q_parts) + f" What is {target}?"

    lines = [f"We need {target}. Start from {names[0]} = {values[0]}."]
    for i, (op, k) in enumerate(ops):
        v, prev, var, src = values[i + 1], values[i], names[i + 1], names[i]
        line = f"{var} = {src} {op} {k} = {prev} {op} {k} = "
        if rng.random() < SLIP_PROB:
            wrong = v + rng.choice((-2, -1, 1, 2))
            if wrong < 0 or wrong > 99:
                wrong = v + (1 if v < 99 else -1)
            line += f"{wrong}. Wait, {prev} {op} {k} = {v}, not {wrong}. So {var} = {v}."
        else:
            line += f"{v}."
        lines.append(line)
    lines.append(f"So {target} = {values[-1]}.")
    trace = "\n".join(lines)
    if rng.random() < CHECK_PROB:
        # R1-style overthinking: the whole chain is worked again after the answer is known
        checks = "\n".join(
            f"{names[i + 1]} = {names[i]} {op} {k} = {values[i]} {op} {k} = {values[i + 1]}." for i, (op, k) in enumerate(ops)
        )
        trace += f"\n\nWait, let me check each step again.\n{checks}\nYes, {target} = {values[-1]}."
    return Problem(id=pid, level=level, question=question, answer=values[-1], trace=trace)


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_INT = re.compile(r"-?\d+")


def extract_answer(text: str) -> int | None:
    """The last ``\\boxed{...}`` integer, else the last integer in the text."""
    boxed = _BOXED.findall(text)
    for cand in reversed(boxed):
        m = _INT.findall(cand)
        if m:
            return int(m[-1])
    if boxed:
        return None
    ints = _INT.findall(text)
    return int(ints[-1]) if ints else None


def check_answer(text: str, problem: Problem) -> bool:
    return extract_answer(text) == problem.answer


def _held_out(name: str) -> list[Problem]:
    rng = random.Random(SPLIT_SEEDS[name])
    out: list[Problem] = []
    seen: set[str] = set()
    for level in SPLIT_LEVELS[name]:
        n = 0
        while n < SPLIT_SIZES[name]:
            p = make_problem(rng, level, pid=f"{name}-L{level}-{n:03d}")
            if p.question in seen:
                continue
            seen.add(p.question)
            out.append(p)
            n += 1
    return out


_CACHE: dict[str, list[Problem]] = {}


def held_out_split(name: str) -> list[Problem]:
    if name not in _CACHE:
        if name == "validation":
            test_q = {p.question for p in held_out_split("test")}
            _CACHE[name] = [p for p in _held_out(name) if p.question not in test_q]
        else:
            _CACHE[name] = _held_out(name)
    return _CACHE[name]


def held_out_questions() -> set[str]:
    return {p.question for name in ("test", "validation") for p in held_out_split(name)}


def level_weights(favour_hard: float = 0.0) -> list[float]:
    return [1.0 + favour_hard * (lv - 1) for lv in LEVELS]


def train_stream(seed: int = TRAIN_SEED, favour_hard: float = 0.0) -> Iterator[Problem]:
    """Infinite, seeded stream of training problems, never repeating a held-out question."""
    rng = random.Random(seed)
    banned = held_out_questions()
    weights = level_weights(favour_hard)
    i = 0
    while True:
        level = rng.choices(LEVELS, weights=weights)[0]
        p = make_problem(rng, level, pid=f"train-{seed}-{i}")
        i += 1
        if p.question in banned:
            continue
        yield p


def make_split(name: str, seed: int = TRAIN_SEED):
    """``"train"`` -> infinite iterator; ``"validation"``/``"test"`` -> fixed list."""
    if name == "train":
        return train_stream(seed)
    if name in SPLIT_SEEDS:
        return list(held_out_split(name))
    raise ValueError(f"unknown split {name!r}")


def write_jsonl(problems, path: str | Path, with_trace: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for p in problems:
            row = {"id": p.id, "level": p.level, "question": p.question, "answer": p.answer}
            if with_trace:
                row["trace"] = p.trace
            f.write(json.dumps(row) + "\n")
    return path


def write_split(name: str, path: str | Path | None = None) -> Path:
    """Write a held-out split (``test``, ``validation``, ``stress``) as the package ships it."""
    return write_jsonl(held_out_split(name), path if path is not None else DATA_DIR / SPLIT_FILES[name])


def load_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    for split in SPLIT_FILES:
        print(f"wrote {write_split(split)}")
    p = make_problem(random.Random(0), 3)
    print(p.question)
    print(p.assistant_output())
