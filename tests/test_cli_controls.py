"""Controller flags of ``run``/``chat``, checked in process before any model loads."""

from __future__ import annotations

import pytest

from edge.cli.controls import build_controllers
from edge.cli.main import main
from edge.control.early_exit import EarlyExit
from edge.errors import ConfigError


@pytest.mark.parametrize("flags", [["--exit-threshold", "0.95"], ["--exit-threshold", "0.5"], ["--exit-mode", "consistency"]])
def test_early_exit_options_without_early_exit_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "What is 2+2?", *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip().splitlines() == [f"error: {flags[0]} needs --early-exit"]


def test_early_exit_options_build_the_controller():
    (ee,) = build_controllers({"early_exit": True, "exit_threshold": 0.8, "exit_mode": "both"})
    assert isinstance(ee, EarlyExit) and (ee.threshold, ee.mode) == (0.8, "both")
    (default,) = build_controllers({"early_exit": True})
    assert (default.threshold, default.mode) == (EarlyExit().threshold, EarlyExit().mode)
    with pytest.raises(ConfigError):
        build_controllers({"early_exit": True, "exit_threshold": 1.5})
