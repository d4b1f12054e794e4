"""Configuration errors: every problem of a config, one line each, reported together."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gkd.errors import GkdError

_BREAKS = re.compile(r"\s*[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+\s*")
"""Line breaks (what ``str.splitlines`` splits on) and the blanks around them."""


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    """Dotted path of the offending field, e.g. ``stages[0].methods[1].config.temperature``."""
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(GkdError):
    """One or more problems in a run config; ``str()`` gives a count line, then one line per
    problem: ``FILE: path: message`` (``path: message`` when there is no file)."""

    def __init__(self, issues: list[ConfigIssue], source: str | None = None) -> None:
        self.issues = issues
        self.source = source
        head = f"{source}: {len(issues)} error(s)" if source else f"{len(issues)} error(s)"
        # A message quoting a value (a YAML string, a library's text) may hold line breaks; each
        # problem must stay one line that names the file, so grep and CI logs keep it whole.
        lines = [_BREAKS.sub(" ", str(i)) for i in issues]
        super().__init__("\n".join([head, *(f"{source}: {line}" if source else line for line in lines)]))
