"""The pydantic base every config section derives from: strict keys, validated assignment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment."""

    # allow_inf_nan=False: a float field given inf or nan (YAML .inf, --rate nan) is refused naming the field
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)
