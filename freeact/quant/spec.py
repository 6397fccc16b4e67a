"""What a quantizer does (:class:`QuantSpec`), with no dependency on torch: the config checks import it
before anything heavy is loaded."""
from __future__ import annotations

from dataclasses import dataclass, replace

GRANULARITIES = ("tensor", "row", "group")
_ALIASES = {"channel": "row", "token": "row", "per_channel": "row", "per_token": "row"}


@dataclass(frozen=True)
class QuantSpec:
    """What a quantizer does. ``bits >= 16`` means "leave in floating point"."""

    bits: int = 16
    symmetric: bool = True
    granularity: str = "row"
    group_size: int = 128
    clip_ratio: float = 1.0

    def __post_init__(self):
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

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    def with_(self, **kw) -> "QuantSpec":
        return replace(self, **kw)
