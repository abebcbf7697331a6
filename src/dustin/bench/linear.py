"""`dustin bench linear`: one decoder block's linear layers at draft sizes, cuBLAS against the fused kernel.

Per model shape and row count (batch x new tokens), the four projections of a block are timed the way
a decode step runs them:
- cuBLAS path: the RMSNorm kernel + `F.linear` (qkv, gate/up), SiLU * up kernel, `F.linear` + the
  residual add riding in the next norm (o, down);
- fused path: `dustin.linear.linear` with the norm in the prologue and SiLU / residual in the epilogue,
  over a sweep of column blocks, depth blocks and splits of K.
Each is timed inside a CUDA graph; the weight bytes over the copy bandwidth give the floor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import fused as fused_ops
from ..linear import linear, linear_reference
from ..shapes import get_shape
from .common import copy_bandwidth, time_graph

DRAFT_SHAPES = ("qwen2.5-0.5b", "llama-3.2-1b")
VARIANTS = [(bn, bk, sp) for bn in (16, 32, 64) for bk in (128, 256) for sp in (None, 1, 2, 4, 8)]


def _layers(shape: str, device, dtype, g) -> dict:
    a = get_shape(shape)
    D, I, qkv = a.dim, a.intermediate_size, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
    w = lambda n, k: (torch.randn(n, k, device=device, generator=g) / k ** 0.5).to(dtype)  # noqa: E731
    vec = lambda n: (1 + 0.1 * torch.randn(n, device=device, generator=g)).to(dtype)  # noqa: E731
    return {"qkv": dict(weight=w(qkv, D), bias=vec(qkv) if a.qkv_bias else None, norm_weight=vec(D)),
            "o": dict(weight=w(D, a.n_heads * a.head_dim), residual=True, next_norm=vec(D)),
            "gate_up": dict(weight=w(2 * I, D), norm_weight=vec(D), silu=True),
            "down": dict(weight=w(D, I), residual=True, next_norm=vec(D))}


def _cublas(x, spec, res):
    """What the unfused decode path launches for this projection. Its two norms per block ride with the
    residual adds (`add_rmsnorm`), so they are counted at o and down, not at qkv and gate/up."""
    y = F.linear(x, spec["weight"], spec.get("bias"))
    if spec.get("silu"):
        y = fused_ops.silu_mul(y)
    if spec.get("residual"):
        y, _ = fused_ops.add_rmsnorm(res, y, spec["next_norm"], 1e-6)
    return y


def bench_case(shape: str, rows: int, *, device="cuda", dtype=torch.bfloat16) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    out = {"shape": shape, "rows": rows, "layers": {}}
    for name, spec in _layers(shape, device, dtype, g).items():
        W = spec["weight"]
        N = W.shape[0] // 2 if spec.get("silu") else W.shape[0]
        x = torch.randn(rows, W.shape[1], device=device, generator=g).to(dtype)
        res = torch.randn(rows, N, device=device, generator=g).to(dtype) if spec.get("residual") else None
        kw = dict(bias=spec.get("bias"), norm_weight=spec.get("norm_weight"), silu=spec.get("silu", False),
                  residual=res)
        ref = linear_reference(x.float(), W.float(), **{k: (v.float() if torch.is_tensor(v) else v)
                                                        for k, v in kw.items()})
        rec = {"n": N, "k": W.shape[1], "weight_bytes": W.numel() * W.element_size(),
               "rel_err": float((linear(x, W, **kw).float() - ref).norm() / ref.norm()),
               "cublas_s": time_graph(lambda: _cublas(x, spec, res), calls=20)}
        times = {}
        for bn, bk, sp in VARIANTS:
            try:
                times[f"bn{bn}-bk{bk}-splits{sp}"] = time_graph(
                    lambda: linear(x, W, **kw, block_n=bn, block_k=bk, splits=sp, check=False), calls=20)
            except Exception as e:  # noqa: BLE001 - a variant the compiler cannot fit is a result, not a crash
                times[f"bn{bn}-bk{bk}-splits{sp}"] = f"failed: {type(e).__name__}"
        ok = {k: v for k, v in times.items() if isinstance(v, float)}
        rec["fused_default_s"] = time_graph(lambda: linear(x, W, **kw, check=False), calls=20)
        rec["fused_best"], rec["fused_best_s"], rec["fused_variants_s"] = min(ok, key=ok.get), min(ok.values()), times
        out["layers"][name] = rec
    out["cublas_block_s"] = sum(r["cublas_s"] for r in out["layers"].values())
    out["fused_block_s"] = sum(r["fused_default_s"] for r in out["layers"].values())
    return out


def run(*, shapes=DRAFT_SHAPES, rows=(16, 32), progress=print) -> dict:
    device = torch.device("cuda")
    copy = copy_bandwidth(device)
    bw = copy["best"]
    cases = []
    for shape in shapes:
        for m in rows:
            c = bench_case(shape, m)
            c["floor_block_s"] = sum(r["weight_bytes"] for r in c["layers"].values()) / bw
            cases.append(c)
            progress(f"{shape} x{m}: cuBLAS path {c['cublas_block_s'] * 1e6:.1f} us, fused {c['fused_block_s'] * 1e6:.1f} "
                     f"us per block (weight floor {c['floor_block_s'] * 1e6:.1f} us)")
    return {"copy_bandwidth_Bps": bw, "copy_bandwidth": copy, "cases": cases}


def table(record: dict) -> str:
    rows = ["| shape | rows | layer | N x K | cuBLAS path us | fused us (default) | best fused us [variant] | floor us |",
            "|" + "---|" * 8]
    bw = record["copy_bandwidth_Bps"]
    for c in record["cases"]:
        for name, r in c["layers"].items():
            rows.append(f"| {c['shape']} | {c['rows']} | {name} | {r['n']} x {r['k']} | {r['cublas_s'] * 1e6:.1f} "
                        f"| {r['fused_default_s'] * 1e6:.1f} | {r['fused_best_s'] * 1e6:.1f} [{r['fused_best']}] "
                        f"| {r['weight_bytes'] / bw * 1e6:.1f} |")
        rows.append(f"| {c['shape']} | {c['rows']} | **block** | | {c['cublas_block_s'] * 1e6:.1f} "
                    f"| {c['fused_block_s'] * 1e6:.1f} | | {c['floor_block_s'] * 1e6:.1f} |")
    return "\n".join(rows)


def plot(record: dict, path) -> None:
    """Per-block time of the four projections, cuBLAS path against fused, with the weight-read floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = record["cases"]
    labels = [f"{c['shape']}\nx{c['rows']}" for c in cases]
    x = range(len(cases))
    fig, ax = plt.subplots(figsize=(2 + 2 * len(cases), 4))
    ax.bar([i - 0.2 for i in x], [c["cublas_block_s"] * 1e6 for c in cases], 0.4, label="cuBLAS + norm/SiLU kernels")
    ax.bar([i + 0.2 for i in x], [c["fused_block_s"] * 1e6 for c in cases], 0.4, label="fused linear kernels")
    ax.scatter(list(x), [c["floor_block_s"] * 1e6 for c in cases], color="k", marker="_", s=400, label="weight floor")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("us per block (4 projections)")
    ax.set_title(f"draft block linears (copy bandwidth {record['copy_bandwidth_Bps'] / 1e12:.2f} TB/s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
