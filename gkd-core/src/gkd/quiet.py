"""Silencing the start-up notices of gkd's dependencies, for the ``gkd`` command only.

A first ``gkd distill`` used to print six notices from megatron-core and DeepSpeed before
any line of gkd's own, none of them something a gkd user can act on: gkd never uses
Transformer Engine or Apex, and picks the device itself. Each rule here
matches one known message from one module, so any other warning still shows; ``gkd -v``
shows these too. Importing gkd as a library installs nothing: only the ``gkd`` group calls
:func:`quiet_dependencies`.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class WarningRule:
    """One :func:`warnings.filterwarnings` rule; both patterns match at the start."""

    message: str
    category: type[Warning]
    module: str
    """Regex on the ``__name__`` of the module that calls :func:`warnings.warn`."""


WARNING_RULES: tuple[WarningRule, ...] = (
    # megatron-core, at ``import megatron.core`` (4 times: the FSDP mixed-precision helpers,
    # megatron.core.optimizer, .optimizer.optimizer and .optimizer.clip_grads). gkd's
    # optimizers are torch's, so the fallback is what gkd wants anyway.
    WarningRule(r"Transformer Engine and Apex are not installed\. Falling back to ", UserWarning,
                r"megatron\.core\."),
)

LOG_RULES: dict[str, tuple[str, ...]] = {
    # DeepSpeed's accelerator auto-detection, on its first use (a WARNING on CPU, INFO on GPU).
    "DeepSpeed": (r"Setting accelerator to CPU\. ", r"Setting ds_accelerator to "),
}
"""Logger name -> regexes of the records to drop (matched at the start of the message)."""


class _DropMessages(logging.Filter):
    """Drops the records whose message matches one of a few known patterns."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = tuple(re.compile(p) for p in patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.match(message) for p in self.patterns)


_installed: dict[str, _DropMessages] = {}
_quieted = False


def quiet_dependencies(verbose: bool = False) -> None:
    """Hide the notices in :data:`WARNING_RULES` and :data:`LOG_RULES`; with ``verbose``
    show them (undoing an earlier call in this process).

    Idempotent. Call it before torch, megatron-core or DeepSpeed is imported, so that their
    import-time warnings are caught too.
    """
    global _quieted
    if verbose:
        for name, log_filter in _installed.items():
            logging.getLogger(name).removeFilter(log_filter)
        _installed.clear()
        if _quieted:  # a "default" rule in front overrides the earlier "ignore"
            _add_rules("default")
            _quieted = False
        return
    # filterwarnings moves an identical rule to the front instead of adding it twice.
    _add_rules("ignore")
    _quieted = True
    for name, patterns in LOG_RULES.items():
        if name not in _installed:
            # A filter rather than a level: DeepSpeed sets its logger's level when it is
            # imported, but keeps the filters already attached to it.
            _installed[name] = _DropMessages(patterns)
            logging.getLogger(name).addFilter(_installed[name])


def _add_rules(action: Literal["ignore", "default"]) -> None:
    for rule in WARNING_RULES:
        warnings.filterwarnings(action, message=rule.message, category=rule.category, module=rule.module)


__all__ = ["LOG_RULES", "WARNING_RULES", "WarningRule", "quiet_dependencies"]
