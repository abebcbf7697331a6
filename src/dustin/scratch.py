"""Zeroed scratch buffers that outlive a kernel launch: the semaphores of the kernels whose last
program merges the others' partials, and the budget split's flag row. Each launch leaves its buffer
zero again, so a buffer is allocated once and never cleared on the hot path."""
from __future__ import annotations

import torch

from .errors import DustinError

_BUFFERS: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers stay allocated: a live CUDA graph may still use them


def zeros(name: str, device: torch.device | str, n: int, dtype: torch.dtype, *, hint: str = "") -> torch.Tensor:
    """At least `n` zeros of `dtype` on `device`, shared by every caller that asks for `name`. `hint` ends
    the error raised when the buffer would have to grow inside a CUDA-graph capture."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one buffer
        device = torch.device("cuda", torch.cuda.current_device())
    key = (name, device, dtype)
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # memory taken inside a capture belongs to that graph's pool: the buffer must predate it
            raise DustinError(f"the {name} scratch buffer must exist before CUDA-graph capture: run the same "
                              f"step once eagerly first{hint}")
        if buf is not None:
            _RETIRED.append(buf)
        # doubling keeps the retired buffers few when sizes creep up
        buf = _BUFFERS[key] = torch.zeros(max(n, 2 * buf.numel() if buf is not None else 0, 1024), dtype=dtype,
                                          device=device)
    return buf


def live(name: str) -> list[torch.Tensor]:
    """The current buffers of `name`, one per device and dtype (tests check they are left zero)."""
    return [b for (n, _, _), b in _BUFFERS.items() if n == name]
