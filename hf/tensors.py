"""torch tensors <-> the numpy arrays the q8kv client sends, without a change of dtype
(float32, float16 and bfloat16: the three the wire carries)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

_WIRE = {torch.float32: np.float32, torch.float16: np.float16}


def to_numpy(t: torch.Tensor, field: str) -> np.ndarray:
    """``t`` as a C-contiguous numpy array on the host, in its own dtype."""
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: the same bits as ml_dtypes' type
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype not in _WIRE:
        raise TypeError(
            f"{field}.dtype: expected torch.float32, float16 or bfloat16, got {t.dtype}"
        )
    return t.numpy()


def from_numpy(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """``a`` as a tensor with ``like``'s dtype and device."""
    a = np.require(a, requirements=["C", "W"])  # the client's answers are read-only views
    if a.dtype == ml_dtypes.bfloat16:
        t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(a)
    return t.to(device=like.device, dtype=like.dtype)
