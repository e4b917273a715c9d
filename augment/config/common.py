"""What every config section shares: the error type, the section base (unknown keys are errors, numbers finite),
and the value types (precisions, user paths, seeds); and `slug`, the ASCII form of a name for keys."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from augment.errors import UserError
from augment.registry import BACKENDS

BACKEND_NAMES: tuple[str, ...] = BACKENDS.names


def _no_is_no(value):
    """YAML reads a bare `no` (in a file or a --set override) as False; for a precision it means "no"."""
    return "no" if value is False else value


def _user_path(value: str) -> str:
    """A path as a shell would read it: `~/data` is the home folder's data, not a folder named `~` in the working
    one. A blank path is refused: it would silently mean the working directory (a cache or run folder written
    wherever the command happens to run)."""
    if not value.strip():
        raise ValueError("must be a path, not an empty string (write `.` for the working directory)")
    return os.path.expanduser(value)


Precision = Annotated[Literal["no", "bf16"], BeforeValidator(_no_is_no)]
AutoPrecision = Annotated[Literal["auto", "no", "bf16"], BeforeValidator(_no_is_no)]
UserPath = Annotated[str, AfterValidator(_user_path)]
# Seeds reach numpy, torch and scikit-learn (random_state < 2**32), some with an offset (evaluation seeds are
# seed, seed+1, ..., fold models seed+1+fold), and int64 columns: 2**31 - 1 leaves every derived seed in range. A
# larger one failed deep in evaluation ("Overflow when unpacking long long"), after the whole generator had run.
MAX_SEED = 2**31 - 1


def seed_field(description: str):
    """The field of a section's seed: 0 <= seed <= MAX_SEED."""
    return Field(0, ge=0, le=MAX_SEED, description=description)


class ConfigError(UserError, ValueError):
    """A configuration file or value the user must fix."""


class Section(BaseModel):
    """A config section: unknown keys are errors, and assignments are validated. No float of any section may be
    NaN or infinite: NaN compares false with every bound (a NaN min_confidence switched the filter off) and an
    infinite LoRA alpha trains to NaN."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def slug(name: str) -> str:
    """`name` as lowercase ASCII letters, digits and dashes (what Prefect allows in an artifact key): accents
    folded (`café` -> `cafe`), every other run of characters one dash. A name with nothing left (`日本`) is a short
    hash of it, so that different names still get different keys."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").lower()
    return re.sub(r"[^a-z0-9]+", "-", folded).strip("-") or hashlib.sha256(name.encode()).hexdigest()[:10]
