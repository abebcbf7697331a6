"""`dustin bench reads`: what one launch costs, and how much of the copy bandwidth one launch of N bytes reads.

A decoding step is a chain of dependent launches, most of them short: a draft's projections read 1-70 MB
each. The copy bandwidth is measured on a 2 GiB copy; a launch of a few MB never reaches it, because
launch, ramp-up and tail do not shrink with the bytes. This benchmark measures that curve with a plain
streaming kernel: each program sums a contiguous share of a buffer (`stream_read`, reference
`stream_read_reference`). For each size it times a chain of launches in a CUDA graph, each reading
another copy of the buffer (enough copies to overflow the L2 cache), at one, two and four programs per
SM, launched the usual way and with PDL (`dustin.pdl`), and keeps the fastest. Size 0 is an empty
kernel: the cost of a launch alone.
"""
from __future__ import annotations

import itertools

import torch

from .. import pdl
from ..errors import DustinError
from .common import copy_bandwidth, time_graph

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs have the reference alone
    triton = None
else:
    from ..pdl import wait_for_inputs

SIZES_MB = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
COLD_BYTES = 512 << 20  # copies per size: at least this much, ten times the H200's L2
BLOCK = 4096  # elements per program and iteration: 8 KB of bf16, 32 bytes per thread of 8 warps
GRAIN = 64  # shares are multiples of 64 elements (128 bytes), so every program reads from 1 MB up

if triton is not None:

    @triton.jit
    def _stream_kernel(X, Out, n, per, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pid = tl.program_id(0)
        wait_for_inputs(PDL)
        lo = pid * per
        hi = tl.minimum(lo + per, n)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(lo, hi, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(X + offs, mask=offs < hi, other=0.0).to(tl.float32)
        tl.store(Out + pid, tl.sum(acc, 0))


def _share(n: int, programs: int) -> int:
    return max(1, -(-(-(-n // programs)) // GRAIN)) * GRAIN


def stream_read(x: torch.Tensor, *, programs: int, use_pdl: bool = False) -> torch.Tensor:
    """Per program, the sum of its contiguous share of `x`: `[programs]` float32.

    x: `[n]`, contiguous. Shares are whole multiples of 64 elements, so with few elements the last
    programs may get nothing (and return 0).

    >>> stream_read(torch.ones(1 << 20, device="cuda", dtype=torch.bfloat16), programs=264)
    """
    if triton is None:
        raise DustinError("stream_read needs triton; use stream_read_reference")
    if x.dim() != 1 or not x.is_contiguous() or programs < 1:
        raise DustinError(f"stream_read takes a contiguous 1-D tensor and programs >= 1, got shape "
                          f"{tuple(x.shape)}, strides {x.stride()} and {programs} programs")
    out = torch.empty(programs, device=x.device, dtype=torch.float32)
    _stream_kernel[(programs,)](x, out, x.numel(), _share(x.numel(), programs), BLOCK=BLOCK,
                                **(pdl.options(x.device) if use_pdl else {"PDL": False}), num_warps=8)
    return out


def stream_read_reference(x: torch.Tensor, *, programs: int) -> torch.Tensor:
    """`stream_read` in torch."""
    n, per = x.numel(), _share(x.numel(), programs)
    return torch.stack([x[min(p * per, n): min((p + 1) * per, n)].float().sum() for p in range(programs)])


def bench_size(nbytes: int, device: torch.device, sms: int) -> dict:
    n = nbytes // 2  # bf16 elements
    copies = max(2, min(512, -(-COLD_BYTES // nbytes))) if n else 1
    bufs = [torch.ones(max(n, 1), device=device, dtype=torch.bfloat16) for _ in range(copies)]
    rot = itertools.cycle(range(copies))
    pdl_on = pdl.options(device)["PDL"]
    variants, active = {}, {}
    for per_sm, use_pdl in itertools.product((1, 2, 4), (False, True) if pdl_on else (False,)):
        p = per_sm * sms
        name = f"{per_sm}-per-sm" + ("-pdl" if use_pdl else "")
        # an empty buffer's launch still runs every program, each finding no share to read
        launch = (lambda use_pdl=use_pdl, p=p: stream_read(bufs[next(rot)][:n], programs=p, use_pdl=use_pdl))
        variants[name] = time_graph(launch, calls=max(16, copies))
        active[name] = min(p, -(-n // _share(n, p)))
    best = min(variants, key=variants.get)
    del bufs
    return {"bytes": 2 * n, "copies": copies, "best_config": best, "s": variants[best], "variants_s": variants,
            "active_programs": active, "pdl": pdl_on}


def run(*, sizes_mb=SIZES_MB, progress=print) -> dict:
    device = torch.device("cuda")
    copy = copy_bandwidth(device)
    bw = copy["best"]
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    cases = []
    for mb in sizes_mb:
        c = bench_size(int(mb * 2**20), device, sms)
        c["bw_frac"] = c["bytes"] / c["s"] / bw
        c["floor_s"] = c["bytes"] / bw
        cases.append(c)
        progress(f"{mb} MB: {c['s'] * 1e6:.2f} us per launch ({c['bw_frac']:.0%} of the copy bandwidth; floor "
                 f"{c['floor_s'] * 1e6:.2f} us) [{c['best_config']}]")
    return {"copy_bandwidth_Bps": bw, "copy_bandwidth": copy, "sms": sms, "cases": cases}


def table(record: dict) -> str:
    rows = ["| MB read | us per launch | floor us | % of copy bandwidth | fastest launch |", "|---|---|---|---|---|"]
    for c in record["cases"]:
        rows.append(f"| {c['bytes'] / 2**20:g} | {c['s'] * 1e6:.2f} | {c['floor_s'] * 1e6:.2f} | {c['bw_frac']:.0%} "
                    f"| {c['best_config']} |")
    return "\n".join(rows)


def plot(record: dict, path) -> None:
    """Share of the copy bandwidth that one launch reaches, by the bytes it reads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [c for c in record["cases"] if c["bytes"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c["bytes"] / 2**20 for c in cs], [100 * c["bw_frac"] for c in cs], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MB read by one launch")
    ax.set_ylabel("% of the copy bandwidth")
    ax.set_ylim(0, max(110, 10 + max(100 * c["bw_frac"] for c in cs)))
    ax.grid(True, alpha=0.3)
    empty = [c["s"] for c in record["cases"] if not c["bytes"]]
    ax.set_title(f"one launch in a CUDA graph (copy {record['copy_bandwidth_Bps'] / 1e12:.2f} TB/s"
                 + (f"; empty launch {empty[0] * 1e6:.2f} us)" if empty else ")"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
