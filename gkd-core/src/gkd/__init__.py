"""gkd — a general knowledge-distillation framework for large pre-trained language models.

The public surface for plugin authors and research code::

    import gkd
    gkd.hookimpl          # decorate gkd_* hook implementations
    gkd.MethodSpec        # describe a method as data
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
})

__all__ = ["FeatureUse", "MethodRegistrar", "MethodSpec", "__version__", "hookimpl"]

if TYPE_CHECKING:
    from gkd.hookspecs import hookimpl
    from gkd.methods.spec import FeatureUse, MethodSpec
    from gkd.plugins.registry import MethodRegistrar
