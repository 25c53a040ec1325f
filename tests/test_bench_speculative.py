"""The speculation benchmark (``python -m edge.benchmarks.speculative``) on the bundled tiny-r1,
real llama.cpp: an assumed batch-cost curve steers how much it drafts."""

from __future__ import annotations

import pytest

from edge.benchmarks import speculative


def test_an_assumed_flat_curve_drafts_and_a_steep_one_does_not():
    flat = speculative.run_speculative(None, task="tiny-r1", items=3, max_tokens=96, threads=1, assume_cost=(1.0,) * 9)
    assert flat["assumed_cost"] == [1.0] * 9 and flat["decision"].startswith("on")
    assert flat["drafted"] > 50 and flat["tokens_per_step"] > 1.2
    # a second token costing as much as ten: drafting never pays, only the periodic retry drafts
    steep = speculative.run_speculative(None, task="tiny-r1", items=3, max_tokens=96, threads=1,
                                        assume_cost=(1.0, 10.0, 20.0, 30.0))
    assert steep["drafted"] < flat["drafted"] / 5 and steep["tokens_per_step"] < flat["tokens_per_step"]
    # greedy tiny-r1 (Q8_0) computes a batch's rows as one-token steps do: the same text either way
    assert flat["same_tokens"] == len(flat["pairs"]) == 3


@pytest.mark.parametrize("bad", ["1,x", "0.5,2", ""])
def test_a_bad_assumed_curve_is_one_line_and_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        speculative.main(["--assume-cost", bad, "--items", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("usage:") is False and "--assume-cost" in err[-1] and "Traceback" not in "\n".join(err)
