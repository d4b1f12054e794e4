"""gkd — a general knowledge-distillation framework for large pre-trained language models.

The public surface for plugin authors and research code::

    import gkd
    gkd.hookimpl          # decorate gkd_* hook implementations
    gkd.MethodSpec        # describe a method as data
"""

from gkd.hookspecs import hookimpl
from gkd.methods.spec import FeatureUse, MethodSpec
from gkd.plugins.registry import MethodRegistrar

__version__ = "0.1.0"

__all__ = ["FeatureUse", "MethodRegistrar", "MethodSpec", "__version__", "hookimpl"]
