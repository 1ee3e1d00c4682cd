"""The errors a user of attnc can cause. Every one is an :class:`AttncError`."""

from __future__ import annotations


class AttncError(Exception):
    """Base class of every error attnc raises for a user's mistake."""


class PatternSyntaxError(AttncError):
    """The pattern source does not parse.

    ``path``, ``line`` and ``column`` (1-based) locate the problem; the message shows
    ``file:line:column``, the offending line with a caret under the column, and what was expected.
    """

    def __init__(self, message: str, path: str | None, line: int | None, column: int | None,
                 source_line: str | None = None):
        self.path, self.line, self.column = path, line, column
        self.bare_message = message
        super().__init__(format_located(message, path, line, column, source_line))


class PatternError(AttncError):
    """A semantic error in a pattern: unknown name, arity, types, parameters, imports, ..."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 column: int | None = None, source_line: str | None = None):
        self.path, self.line, self.column = path, line, column
        self.bare_message = message
        super().__init__(format_located(message, path, line, column, source_line))


class InputError(AttncError):
    """Bad tensors or runtime inputs at call time."""


def format_located(message: str, path: str | None, line: int | None, column: int | None,
                   source_line: str | None) -> str:
    """``file:line:column: message`` followed by the source line and a caret, when known."""
    if line is None:
        return f"{path}: {message}" if path else message
    where = f"{path or '<source>'}:{line}:{column or 1}"
    text = f"{where}: {message}"
    if source_line is not None:
        caret = " " * (max(column or 1, 1) - 1) + "^"
        text += f"\n    {source_line.rstrip()}\n    {caret}"
    return text
