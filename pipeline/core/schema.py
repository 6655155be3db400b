"""The base of every config section (raykd.pipeline.core.config's and the methods' own options), kept free of heavy
imports so that a method file can declare its options next to its loss."""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import urlsplit

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


def check_endpoint(v: str | None) -> str | None:
    """An S3 endpoint is a URL: http(s)://host[:port]."""
    if v is None:
        return v
    try:
        u = urlsplit(v)
        u.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as e:
        raise ValueError(f"{v!r} is not an endpoint URL ({e}); give http(s)://host[:port]") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"{v!r} is not an endpoint URL; give http(s)://host[:port], e.g. http://127.0.0.1:9000")
    return v


OutputName = Annotated[str, AfterValidator(check_output_name)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and numbers are
    finite (YAML's .inf and .nan are refused where they would be taken)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
