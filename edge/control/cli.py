"""Command-line options of the reasoning controllers (filled in by the control package)."""

from __future__ import annotations

from typing import Any

from edge.control.base import Controller


def pop_control(kw: dict[str, Any]) -> dict[str, Any]:
    return {}


def build_controllers(options: dict[str, Any]) -> list[Controller]:
    return []
