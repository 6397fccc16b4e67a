"""What a method works on: the model and its adapter, the quantizer specs, the calibration data and where
to compute (:class:`QuantContext`), and what the method's transforms hand to the shared pipeline."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..data.calib import CalibSet
from ..models.adapter import ModelAdapter
from ..quant.quantizer import QuantSpec
from .streaming import CACHES


@dataclass
class QuantSettings:
    weight: QuantSpec
    act: QuantSpec
    kv: QuantSpec


@dataclass
class QuantContext:
    model: nn.Module
    adapter: ModelAdapter
    quant: QuantSettings
    calib: CalibSet | None
    device: str = "cpu"
    batch_size: int = 4
    seed: int = 0
    progress: bool = True
    input_transforms: dict = field(default_factory=dict)  # nn.Linear -> nn.Module
    qk_transform: object = None  # callable () -> nn.Module applied to post-RoPE q and k
    learnable_act_clip: bool = False
    streaming: bool = False  # keep the model on the CPU, page one decoder layer at a time onto `device`
    stream_cache: str = "device"  # streaming: calibration hidden states on the device or in "pinned" CPU memory

    def __post_init__(self):
        if self.stream_cache not in CACHES:
            raise ValueError(f"stream_cache must be one of {CACHES}, got {self.stream_cache!r}")
