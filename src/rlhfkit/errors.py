"""Errors meant for people: each names the file, line, field or value at fault and what to do."""

from __future__ import annotations


class RlhfkitError(Exception):
    """Base class: the CLI prints these without a traceback and exits with status 2."""


class ConfigError(RlhfkitError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


class DataError(RlhfkitError, ValueError):
    """Input data is malformed. The message names the source, the line (1-based) and the field."""

    def __init__(self, message: str, source: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = ""
        if source:
            where = str(source)
            if line is not None:
                where += f", line {line}"
        if field:
            where += (", " if where else "") + f"field '{field}'"
        super().__init__(f"{where}: {message}" if where else message)
        self.message, self.source, self.line, self.field = message, source, line, field


class NonFiniteError(RlhfkitError, FloatingPointError):
    """A reward, loss or gradient became NaN or infinite; the step was not applied."""
