"""Distillation methods, one file each: a pure loss function plus a thin registered class."""

from methods import aekt, ce, dkd, feed, imf, kd, skd  # noqa: F401  (importing registers them)
from methods.base import METHODS, Method, MethodContext, Targets, build_method  # noqa: F401
