"""The base of every config section (pipeline.config's and the methods' own options), kept free of heavy
imports so that a method file can declare its options next to its loss."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

NAME_RE = r"^[A-Za-z][A-Za-z0-9_-]*$"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
