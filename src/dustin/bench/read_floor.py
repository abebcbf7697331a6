"""Triton: the gathered bytes of index-set attention read with no attention around them.

A benchmark's yardstick, not an engine kernel. The copy bandwidth is measured on a 2 GiB copy; at that
rate a read of 34 MB takes 8 us, and in a launch that short, launch, ramp and tail weigh far more. This
kernel reads exactly the K and V rows an index set names, one program per (sequence, KV head, split),
and sums them, so its time is what reading those bytes costs in a launch of that size; with `use_pdl`
it launches as the sparse kernel does (`dustin.pdl`), overlapping the launch before it. Reference:
`gather_read_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import pdl
from ..attention.decode import split_range
from ..pdl import wait_for_inputs


@triton.jit
def _gather_read_kernel(K, V, Idx, Out, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_ib, n_kv_heads, n_budget,
                        D: tl.constexpr, BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)  # one (sequence, KV head)
    split = tl.program_id(1)
    wait_for_inputs(PDL)
    b = (pid // n_kv_heads).to(tl.int64)
    h = pid % n_kv_heads
    lo, hi = split_range(n_budget, split, N_SPLITS, BLOCK_N)
    d = tl.arange(0, D)
    acc = tl.zeros([BLOCK_N, D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        idx = tl.load(Idx + b * s_ib + offs, mask=offs < hi, other=0)
        ok = (offs < hi)[:, None]
        k = tl.load(K + b * s_kb + h * s_kh + idx[:, None].to(tl.int64) * s_ks + d[None, :], mask=ok, other=0.0)
        v = tl.load(V + b * s_vb + h * s_vh + idx[:, None].to(tl.int64) * s_vs + d[None, :], mask=ok, other=0.0)
        acc += k.to(tl.float32) + v.to(tl.float32)
    tl.store(Out + (pid * N_SPLITS + split) * D + d, tl.sum(acc, 0))


def gather_read(k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor, *, n_splits: int = 1,
                block_n: int = 64, num_warps: int = 4, num_stages: int = 1, use_pdl: bool = False) -> torch.Tensor:
    """Per (sequence, KV head, split), the sum of the K and V rows at `indices`.

    k_cache, v_cache: `[B, Hkv, S, D]`; indices: `[B, budget]` positions in `[0, S)`, contiguous.
    Returns `[B, Hkv, n_splits, D]` float32.
    """
    B, Hkv, _, D = k_cache.shape
    out = torch.empty(B, Hkv, n_splits, D, device=k_cache.device, dtype=torch.float32)
    _gather_read_kernel[(B * Hkv, n_splits)](
        k_cache, v_cache, indices, out, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), indices.stride(0), Hkv, indices.shape[1],
        D=D, BLOCK_N=block_n, N_SPLITS=n_splits, **(pdl.options(k_cache.device) if use_pdl else {"PDL": False}),
        num_warps=num_warps, num_stages=num_stages)
    return out


def gather_read_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor, *,
                          n_splits: int = 1, block_n: int = 64) -> torch.Tensor:
    """`gather_read` in torch: the same splits of whole `block_n`-row tiles."""
    B, Hkv, _, D = k_cache.shape
    budget = indices.shape[1]
    per = -(-(-(-budget // n_splits)) // block_n) * block_n
    rows = torch.stack([k_cache[b][:, indices[b].long()] + v_cache[b][:, indices[b].long()] for b in range(B)])
    out = torch.zeros(B, Hkv, n_splits, D, dtype=torch.float32, device=k_cache.device)
    for s in range(n_splits):
        lo, hi = min(s * per, budget), min((s + 1) * per, budget)
        out[:, :, s] = rows[:, :, lo:hi].float().sum(2)
    return out
