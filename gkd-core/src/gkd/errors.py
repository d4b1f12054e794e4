"""The one base class of every error gkd reports to the user.

A :class:`GkdError` reaching the ``gkd`` command line is printed as one line on standard
error (``Error: <message>``) and exits with code 2; no traceback. Method plugins raise it
(or a subclass) for problems the user can fix: a teacher without the head a loss needs, a
config that does not fit the models.
"""

from __future__ import annotations


class GkdError(Exception):
    """Base of every error gkd reports to the user without a traceback (exit code 2)."""


__all__ = ["GkdError"]
