"""The base of every config section (pipeline.config's and the methods' own options), kept free of heavy
imports so that a method file can declare its options next to its loss."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

NAME_RE = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"  # a teacher: also a cache column name (logits.<name>)
OUTPUT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # a student's or a sweep's folder
MAX_SEED = 2**32 - 1  # numpy, torch and Ray take it, and seed * 1000 + epoch too


def check_output_name(v: str) -> str:
    """A name that becomes one folder under run.out_dir: no separators, no `.`/`..`, no absolute paths."""
    if not OUTPUT_RE.match(v):
        raise ValueError(f"{v[:120]!r} is not a folder name: use letters, digits, '_', '-' and '.', starting with a "
                         "letter or digit, at most 100 characters (it names one folder under run.out_dir)")
    return v


OutputName = Annotated[str, AfterValidator(check_output_name)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and numbers are
    finite (YAML's .inf and .nan are refused where they would be taken)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
