"""The GPU backend's tuning knobs: one frozen GpuTuning per CupyBackend.

The server builds it from its ``--gpu-*`` flags (environment fallbacks ``Q8KV_GPU_*``, see
server/config.py) with ``GpuTuning.from_config``; benchmarks and tests construct it directly.
This module imports no CuPy, so the server can validate the knobs without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# Integer knob -> (least, greatest or None). The cp.async pipeline waits for all but
# NSTAGES - 2 stages, so it needs two; 16 blocks of 128 threads fill an SM's 2048.
_BOUNDS = {"max_splits": (1, None), "tc_minblocks": (1, 16), "tc_nstages": (2, None),
           "tc_stage_bytes": (1, None), "prefill_scratch_bytes": (0, None)}  # fmt: skip


def flag(knob: str) -> str:
    """The server flag that sets ``knob``."""
    return "--gpu-" + knob.replace("_", "-")


@dataclass(frozen=True)
class GpuTuning:
    # Splits per row tile, bounded so the last block's merge stays short (48 x 8 kv heads
    # fills one wave of an H100 at batch 1).
    max_splits: int = 48
    # Splits per launch aim at this many waves of resident blocks.
    split_waves: float = 1.0
    # Register cap (blocks per SM, for head_dim <= 128) and pipeline of the attention
    # kernel. Two 32 KiB stages (128 tokens at D = 128) ran 1% faster than three of 16 KiB
    # at 64 x 16384 on an H100.
    tc_minblocks: int = 2
    tc_nstages: int = 2
    tc_stage_bytes: int = 32768  # code bytes per pipeline stage (STAGE_CODE_TARGET)
    # Device scratch for a prefill launch's K/V dequantized to 16 bits (4 KiB a token at
    # KVH = 8, D = 128: 512 MiB holds 128K tokens). A launch that needs more, or finds no
    # free memory for it, runs on the kernel that dequantizes in its loop; 0: always.
    prefill_scratch_bytes: int = 512 << 20

    def __post_init__(self) -> None:
        if not self.split_waves > 0:
            raise ValueError(f"{flag('split_waves')}: expected > 0, got {self.split_waves}")
        for knob, (least, most) in _BOUNDS.items():
            value = getattr(self, knob)
            if value < least or (most is not None and value > most):
                expected = f">= {least}" if most is None else f"{least}..{most}"
                raise ValueError(f"{flag(knob)}: expected {expected}, got {value}")

    @classmethod
    def from_config(cls, config: Any) -> GpuTuning:
        """From the server Config's ``gpu_<knob>`` fields."""
        return cls(**{f.name: getattr(config, "gpu_" + f.name) for f in fields(cls)})
