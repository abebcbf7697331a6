"""Programmatic dependent launch (PDL) for the decode-path kernels, on Hopper and later GPUs.

A few-row decode pass is a chain of short kernels, and each one costs about as much in launch and
ramp-up as in bytes. Launched with PDL, a kernel is scheduled while the one before it is still
running. It waits in `griddepcontrol.wait` until that kernel has finished and its writes are visible.
Before the wait it may read what no kernel writes during decoding, the weights, and what only kernels
older than its predecessor wrote: index-set attention gathers its first tile of the cache there (the
rows below the lengths, which the pass's projection kernel before it never touches). So the next
kernel's launch and its first tile overlap the tail of the one before.

The contract, for every kernel that takes the `PDL` flag:
- every program calls `wait_for_inputs(PDL)` unconditionally;
- it calls it before any write, and before any read of memory that its immediate predecessor may write.
Then a kernel finishes only after the one before it. Anything older than the immediate predecessor
is complete before a kernel is even scheduled. Kernels launched without PDL (cuBLAS, torch) wait for
their predecessor as usual.

Measured on the H200 (`benchmarks/gpu/e2e.json`, `dustin+draft-selected` against `+no-pdl`), it pays
where every draft kernel is ours: the Qwen2.5-7B/0.5B step at 32k, batch 16 takes 8.77 ms with it and
9.48 without; the Llama pair's draft keeps its cuBLAS projections, which take no part (10.55, 10.58).
The early gather alone is worth 8.77 against 8.81 ms (`+late-gather`).

    >>> _kernel[grid](..., **pdl.options(x.device))   # PDL=, and launch_pdl=True where it is on
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import cuda as tl_cuda
except ImportError:  # CPU-only installs never launch kernels
    triton = None

_enabled = os.environ.get("DUSTIN_PDL", "1") != "0"


def set_enabled(flag: bool) -> None:
    """Turn PDL on or off for launches from now on (the default is on; `DUSTIN_PDL=0` starts it off).

    A CUDA graph keeps the launches it captured: recapture after changing this."""
    global _enabled
    _enabled = bool(flag)


def is_enabled() -> bool:
    return _enabled


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    """Compute capability 9+, compiled (the interpreter has no grid dependency control), by a Triton
    that knows the launch option (3.4 and later)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    from triton.backends.nvidia.compiler import CUDAOptions

    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}) and hasattr(tl_cuda, "gdc_wait")


def options(device: torch.device) -> dict:
    """Launch options for a kernel with a `PDL` constexpr: `PDL` and `launch_pdl` on where supported
    while enabled; else `PDL` off alone (an older Triton refuses `launch_pdl` even when false)."""
    if _enabled and triton is not None and device.type == "cuda" and _supported(
            device.index if device.index is not None else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


if triton is not None:

    @triton.jit
    def wait_for_inputs(PDL: tl.constexpr):
        """Block until the previous kernel's writes are visible, then let the next kernel be scheduled."""
        if PDL:
            tl_cuda.gdc_wait()
            tl_cuda.gdc_launch_dependents()
