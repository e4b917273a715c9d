"""What every config section shares: the error type, the section base (unknown keys are errors), and the value
types (precisions, user paths)."""

from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict

from augment.registry import BACKENDS

BACKEND_NAMES: tuple[str, ...] = BACKENDS.names


def _no_is_no(value):
    """YAML reads a bare `no` (in a file or a --set override) as False; for a precision it means "no"."""
    return "no" if value is False else value


Precision = Annotated[Literal["no", "bf16"], BeforeValidator(_no_is_no)]
AutoPrecision = Annotated[Literal["auto", "no", "bf16"], BeforeValidator(_no_is_no)]
# A path as a shell would read it: `~/data` is the home folder's data, not a folder named `~` in the working one.
UserPath = Annotated[str, AfterValidator(os.path.expanduser)]


class ConfigError(ValueError):
    """A configuration file or value the user must fix."""


class Section(BaseModel):
    """A config section: unknown keys are errors, and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
