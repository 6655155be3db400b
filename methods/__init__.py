"""Distillation methods, one file each: a pure loss function plus a thin registered class that declares its
own options. Every module of this package is imported here, so a new file registers itself."""

import importlib
import pkgutil

from raykd.methods.base import METHODS, Method, MethodContext, Targets, build_method  # noqa: F401

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
