"""Multi-teacher and teacher-assistant distillation methods for gkd; each sub-package is one plugin module."""
