"""Arms as values: a downstream training set by its parts, and the verdict of a paired comparison.

An arm name (`real+classic+pseudo+synthetic`, or `filter:alia`) is parsed here and only here: every other module
asks an `Arm` what it holds instead of searching its name. A leaf module (it imports nothing of augment), so the
config validates arm lists with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

ARM_PARTS = ("real", "classic", "pseudo", "synthetic", "synthetic_unfiltered")
SYNTHETIC_PARTS = frozenset({"synthetic", "synthetic_unfiltered"})
_FILTER = "filter:"


def parse_arm(name: str) -> frozenset[str]:
    """`real+classic+synthetic` -> {"real", "classic", "synthetic"}; a ValueError names what is wrong."""
    parts = name.split("+")
    bad = [p for p in parts if p not in ARM_PARTS]
    if bad or len(set(parts)) != len(parts):
        raise ValueError(f"evaluation arm {name!r}: parts must be distinct, from {', '.join(ARM_PARTS)}")
    if not {"real", *SYNTHETIC_PARTS} & set(parts):
        raise ValueError(f"evaluation arm {name!r} has no training images: add real or synthetic")
    if SYNTHETIC_PARTS <= set(parts):
        raise ValueError(f"evaluation arm {name!r}: synthetic and synthetic_unfiltered exclude each other")
    if "pseudo" in parts and "real" not in parts:
        raise ValueError(f"evaluation arm {name!r}: pseudo needs real")
    return frozenset(parts)


@dataclass(frozen=True)
class Arm:
    """A downstream training set: its parts (ARM_PARTS), or for a filter-ablation arm the one filter whose kept
    samples stand in for the product recipe's synthetic set."""

    parts: frozenset[str] = frozenset()
    filter: str | None = None

    @classmethod
    def of(cls, name: str) -> "Arm":
        if name.startswith(_FILTER):
            return cls(filter=name[len(_FILTER):])
        return cls(parse_arm(name))

    @property
    def name(self) -> str:
        """The arm's name: its parts joined with `+` in ARM_PARTS order, or `filter:<name>`."""
        return _FILTER + self.filter if self.filter is not None else "+".join(p for p in ARM_PARTS if p in self.parts)

    def has(self, part: str) -> bool:
        return part in self.parts

    def plus(self, part: str) -> "Arm":
        return Arm(self.parts | {part})

    @property
    def synthetic(self) -> bool:
        """Trains on synthetic images (kept, unfiltered, or a filter's own set)."""
        return self.filter is not None or bool(self.parts & SYNTHETIC_PARTS)


def arm_plus(name: str, part: str) -> str:
    """The name of arm `name` with `part` added (`real+classic`, `pseudo` -> `real+classic+pseudo`)."""
    return Arm.of(name).plus(part).name


def has_part(name: str | None, part: str) -> bool:
    """Whether the arm named `name` (None or "": no arm) holds `part`."""
    return bool(name) and Arm.of(name).has(part)


def adds_label(arm: str) -> str:
    """The label of what synthetic data adds to `arm` (metrics' evaluation.synthetic_adds keys)."""
    return f"{arm_plus(arm, 'synthetic')} vs {arm}"


class Verdict(str, Enum):
    """The verdict of a paired difference, by its 95% interval. A str (JSON writes it as its text), printed as its
    text on every Python (enum.StrEnum needs 3.11)."""

    GAIN = "significant gain"
    LOSS = "significant loss"
    NONE = "no significant gain"
    NO_INTERVAL = "not enough seeds for an interval"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
