"""Configuration errors: every problem of a config, one line each, reported together."""

from __future__ import annotations

from dataclasses import dataclass

from gkd.errors import GkdError


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    """Dotted path of the offending field, e.g. ``stages[0].methods[1].config.temperature``."""
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(GkdError):
    """One or more problems in a run config; ``str()`` gives one line per problem."""

    def __init__(self, issues: list[ConfigIssue], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        head = f"{source}: {len(issues)} error(s)" if source else f"{len(issues)} error(s)"
        super().__init__("\n".join([head, *(str(i) for i in issues)]))
