"""Typed errors raised by the library and rendered by the CLI (exit code 2, no traceback)."""

from __future__ import annotations

from dataclasses import dataclass


class MtlError(Exception):
    """Base class of every error the user can fix: bad recipe, bad data, bad artifact.

    ``hint`` says what to do about it; the CLI prints the message and the hint.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


@dataclass(frozen=True)
class RecipeIssue:
    """One problem found in a recipe: a dotted path into the YAML and what is wrong there."""

    path: str
    message: str
    line: int | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.path or '<recipe>'}: {self.message}"


class RecipeError(MtlError):
    """A recipe failed validation. Carries every issue found, not just the first."""

    def __init__(self, source: str, issues: list[RecipeIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = [issue.render(source) for issue in issues]
        count = f"{len(issues)} problem{'s' if len(issues) != 1 else ''}"
        super().__init__(f"invalid recipe {source} ({count}):\n" + "\n".join(f"  {x}" for x in lines))


class DataError(MtlError):
    """The data does not fit the recipe: missing file or column, unreadable label, empty file..."""


class ArtifactError(MtlError):
    """A run directory, schema, checkpoint or bundle is missing, corrupt or does not match."""
