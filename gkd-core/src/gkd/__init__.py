"""gkd — a general knowledge-distillation framework for large pre-trained language models.

The public surface for plugin authors and research code::

    import gkd
    gkd.hookimpl          # decorate gkd_* hook implementations
    gkd.MethodSpec        # describe a method as data
    gkd.distill           # run a config (file or dict) from Python; returns the run summary
    gkd.Callback          # observe a run: stage start/end, step end, evaluation, checkpoint
    gkd.format_table      # the teacher/student table of a run summary, as `gkd distill` prints it
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd._lazy import lazy_exports

__version__ = "0.1.0"

# Lazy (PEP 562): ``gkd --help`` and ``gkd --version`` then import neither pluggy nor jsonschema.
__getattr__, __dir__ = lazy_exports(__name__, {
    "hookimpl": "gkd.hookspecs",
    "FeatureUse": "gkd.methods.spec",
    "MethodSpec": "gkd.methods.spec",
    "MethodRegistrar": "gkd.plugins.registry",
    "distill": "gkd.api",
    "Callback": "gkd.engine.callbacks",
    "CallbackError": "gkd.engine.callbacks",
    "StepInfo": "gkd.engine.callbacks",
    "format_table": "gkd.engine.report",
})

__all__ = ["Callback", "CallbackError", "FeatureUse", "MethodRegistrar", "MethodSpec", "StepInfo", "__version__",
           "distill", "format_table", "hookimpl"]

if TYPE_CHECKING:
    from gkd.api import distill
    from gkd.engine.callbacks import Callback, CallbackError, StepInfo
    from gkd.engine.report import format_table
    from gkd.hookspecs import hookimpl
    from gkd.methods.spec import FeatureUse, MethodSpec
    from gkd.plugins.registry import MethodRegistrar
