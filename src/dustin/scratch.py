"""Zeroed scratch buffers that outlive a kernel launch: the semaphores of the kernels whose last
program merges the others' partials, and the budget split's flag row. Each launch leaves its buffer
zero again, so a buffer is allocated once and never cleared on the hot path."""
from __future__ import annotations

import torch

from .errors import DustinError

_BUFFERS: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers stay allocated: a live CUDA graph may still use them


def zeros(name: str, device: torch.device, n: int, dtype: torch.dtype) -> torch.Tensor:
    """At least `n` zeros of `dtype` on `device`, shared by every caller that asks for `name`."""
    key = (name, torch.device(device), dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        if key[1].type == "cuda" and torch.cuda.is_current_stream_capturing():
            # memory taken inside a capture belongs to that graph's pool: the buffer must predate it
            raise DustinError(f"the {name} scratch buffer must exist before CUDA-graph capture: run the same "
                              "step once eagerly first")
        if buf is not None:
            _RETIRED.append(buf)
        buf = _BUFFERS[key] = torch.zeros(max(n, 1024), dtype=dtype, device=device)
    return buf


def live(name: str) -> list[torch.Tensor]:
    """The current buffers of `name`, one per device and dtype (tests check they are left zero)."""
    return [b for (n, _, _), b in _BUFFERS.items() if n == name]
