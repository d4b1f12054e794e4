"""Single-teacher distillation methods for gkd; each sub-package is one plugin module."""
