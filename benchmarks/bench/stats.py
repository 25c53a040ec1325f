"""Summaries of repeated measurements, shared by the suites and the peers comparison."""

from __future__ import annotations

import statistics
from typing import Any, Sequence


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min/max and quartiles of repeated measurements."""
    vs = [float(v) for v in values]
    if not vs:
        raise ValueError("no measurements")
    q1, q3 = (statistics.quantiles(vs, n=4, method="inclusive")[::2] if len(vs) > 1 else (vs[0], vs[0]))
    r = lambda x: round(x, 6)  # noqa: E731
    return {"median": r(statistics.median(vs)), "min": r(min(vs)), "max": r(max(vs)), "q1": r(q1), "q3": r(q3),
            "n": len(vs), "values": [r(v) for v in vs]}
