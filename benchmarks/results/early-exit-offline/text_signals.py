"""Exploratory: does a condition on the last paragraph before a probe (read from the journal's
reasoning text) time probes better? The hindsight ceiling (benchmarks/offline.py: hindsight_rule)
with probes only where the condition holds, on the 1.5B GSM8K r1 run, validation and test slices.

    python benchmarks/results/early-exit-offline/text_signals.py
"""

import re
from pathlib import Path

from edge.benchmarks import offline as o

recs = o.load_records(Path(__file__).parent / "qwen2.5-coder-1.5b-gsm8k" / "runs" / "r1")
val, test = recs[:50], recs[50:]


def last_par(rec, chars):
    return rec["reasoning"][:chars].rstrip().split("\n\n")[-1]


conds = {
 "all": lambda p: True,
 "eq_number_end": lambda p: re.search(r"=\s*\\?\$?\s*[-\d.,]+\s*(\\text\{[^}]*\})?\s*(\\\]|\$|\.)?\s*$", p) is not None,
 "has_eq": lambda p: "=" in p,
 "conclude": lambda p: re.search(r"(?i)\b(therefore|thus|so,|total|answer|in total|final)\b", p) is not None,
 "conclude_and_eq": lambda p: re.search(r"(?i)\b(therefore|thus|so,|total|answer|final)\b", p) is not None and "=" in p,
 "boxed": lambda p: "boxed" in p,
}
for name, c in conds.items():
    for sl, rs in (("val", val), ("test", test)):
        runs = []
        for r in rs:
            rr = dict(r, trials=[t for t in r["trials"] if c(last_par(r, t[5]))])
            runs.append(o.replay(rr, o.hindsight_rule(r)))
        row = o._summary(rs, runs, name)
        print(f"{name:16s} {sl:4s} hindsight net {row['saved_net']:.3f} share {row['share_of_bound']:.2f} probes {row['probe_tokens']:.1f}")
