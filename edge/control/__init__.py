"""Reasoning control: thinking budgets and early exit, as controllers over the Backend protocol."""

from edge.control.base import Action, Controller

__all__ = ["Action", "Controller"]
