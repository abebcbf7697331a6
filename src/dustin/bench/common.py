"""Timing and recording helpers shared by the benchmarks."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def git_revision() -> str:
    """The checkout's commit (`-dirty` with local changes), or `$DUSTIN_GIT_REVISION` where there is no git."""
    if os.environ.get("DUSTIN_GIT_REVISION"):
        return os.environ["DUSTIN_GIT_REVISION"]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_info(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def time_graph(fn: Callable[[], object], *, calls: int = 10, replays: int = 15, warmup: int = 2) -> float:
    """Median seconds per call of `fn`, captured `calls` times in one CUDA graph and replayed.

    Graph replay removes Python and launch gaps, which otherwise hide everything under ~0.3 ms.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(times)


def time_eager(fn: Callable[[], object], *, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds per call without a graph (for what cannot be captured)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, *, gib: float = 2.0) -> dict:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written: through the
    copy engine (`copy_`, a memcpy node in a graph) and through the SMs (an elementwise kernel). The
    larger is the ceiling the benchmarks compare against."""
    src = torch.randn(int(gib * 2**30) // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    out = {"memcpy": nbytes / time_graph(lambda: dst.copy_(src), calls=5, replays=20, warmup=20),
           "sm_kernel": nbytes / time_graph(lambda: torch.neg(src, out=dst), calls=5, replays=20, warmup=20)}
    out["best"] = max(out.values())
    del src, dst
    return out


def write_record(path: Path, command: str, record: dict) -> None:
    """JSON with the command that made it, the git revision and whatever the benchmark measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command, "git_revision": git_revision(), **record}, indent=1, default=str))
