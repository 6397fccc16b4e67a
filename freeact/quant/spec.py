"""What a quantizer does (:class:`QuantSpec`), with no dependency on torch: the config checks import it
before anything heavy is loaded. Its fields are those of the config schema
(:class:`freeact.config.QuantSpecConfig`, mutable so that Hydra can override them); this frozen copy adds
the checks and the normalised granularity."""
from __future__ import annotations

from dataclasses import field, fields, make_dataclass, replace

from ..config import QuantSpecConfig

GRANULARITIES = ("tensor", "row", "group")
_ALIASES = {"channel": "row", "token": "row", "per_channel": "row", "per_token": "row"}


def _check(self) -> None:
    g = _ALIASES.get(self.granularity, self.granularity)
    object.__setattr__(self, "granularity", g)
    if g not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES} (or channel/token), got {self.granularity!r}")
    if not 2 <= self.bits <= 32:
        raise ValueError(f"bits must be in 2..16 (16+ = off), got {self.bits}")
    if g == "group" and self.group_size <= 0:
        raise ValueError(f"group_size must be positive for group granularity, got {self.group_size}")
    if not 0.0 < self.clip_ratio <= 1.0:
        raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")


def _with(self, **kw) -> "QuantSpec":
    """A copy with some fields changed (checked again)."""
    return replace(self, **kw)


QuantSpec = make_dataclass(
    "QuantSpec",
    [(f.name, f.type, field(default=f.default)) for f in fields(QuantSpecConfig)],
    frozen=True,
    namespace={
        "__doc__": 'What a quantizer does. ``bits >= 16`` means "leave in floating point".',
        "__post_init__": _check,
        "enabled": property(lambda self: self.bits < 16, doc="False when bits >= 16 (left in floating point)."),
        "with_": _with,
    },
)
QuantSpec.__module__ = __name__  # pickles and reprs name this module
