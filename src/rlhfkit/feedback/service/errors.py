"""What the service's operations refuse with; the app maps each to an HTTP status."""

from __future__ import annotations


class InvalidAnswer(ValueError):
    """A submitted answer does not fit the question; `field` names the offending part (422)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field


class Forbidden(Exception):
    """The caller may not do this (HTTP 403), whatever its role: e.g. reviewing their own label."""


class Conflict(Exception):
    """The request conflicts with stored state (already labelled, key reused, not assigned) (409)."""
