"""Method descriptions (:class:`MethodSpec`) and the helpers shared by method plugins."""

from gkd.methods.spec import FeatureUse, MethodKind, MethodSpec, StageKind, load_schema

__all__ = ["FeatureUse", "MethodKind", "MethodSpec", "StageKind", "load_schema"]
