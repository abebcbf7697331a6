"""Fused elementwise layer ops for the GPU decode path, each beside its torch reference.

A decode step of a small model is bound by kernel count, not bytes: unfused, one layer launches about
45 kernels. These three cut it to about ten per layer:
- `add_rmsnorm`: residual += delta, then RMSNorm of the new residual;
- `rope_write`: rotary embedding of q and k straight out of the fused qkv projection, with k and v
  written into the cache at each token's position;
- `silu_mul`: SiLU(gate) * up from the fused gate/up projection.
The references define the results; the kernels compute in float32 and round once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the references
    triton = None
else:
    from .pdl import wait_for_inputs


# --- references ------------------------------------------------------------------------------------
def add_rmsnorm_reference(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual, delta: `[..., dim]`; returns (normalised `[..., dim]`, new residual)."""
    if delta is not None:
        residual = residual + delta
    h = residual.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(residual.dtype), residual


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: `[B, H, T, D]`; cos, sin: `[B, 1, T, D]` (half-split rotation, as in the HF checkpoints)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


def split_heads(qkv: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int):
    """`[B, T, (Hq + 2 Hkv) D]` -> q `[B, Hq, T, D]`, k and v `[B, Hkv, T, D]`."""
    B, T, _ = qkv.shape
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    return (q.view(B, T, n_heads, head_dim).transpose(1, 2), k.view(B, T, n_kv_heads, head_dim).transpose(1, 2),
            v.view(B, T, n_kv_heads, head_dim).transpose(1, 2))


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# --- kernels ---------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _add_rmsnorm_kernel(R, Dl, W, Out, eps, N: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr,
                            PDL: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        w = tl.load(W + cols, mask=ok, other=0.0)  # a weight: safe to read before the wait
        wait_for_inputs(PDL)
        r = tl.load(R + row * N + cols, mask=ok, other=0.0)
        if HAS_DELTA:
            r = (r.to(tl.float32) + tl.load(Dl + row * N + cols, mask=ok, other=0.0).to(tl.float32)).to(R.dtype.element_ty)
            tl.store(R + row * N + cols, r, mask=ok)
        h = r.to(tl.float32)
        h = h * tl.rsqrt(tl.sum(h * h, 0) / N + eps)
        out = w.to(tl.float32) * h.to(R.dtype.element_ty).to(tl.float32)
        tl.store(Out + row * N + cols, out.to(Out.dtype.element_ty), mask=ok)

    @triton.jit
    def _rope_write_kernel(QKV, Cos, Sin, Pos, Q, CK, CV, s_xb, s_xt, s_cb, s_ct, s_qb, s_qh, s_qt,
                           s_kb, s_kh, s_ks, T, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                           PDL: tl.constexpr):
        wait_for_inputs(PDL)
        bt = tl.program_id(0)
        head = tl.program_id(1)  # 0..HQ-1: q, then HKV k heads, then HKV v heads
        b = bt // T
        t = bt % T
        half = tl.arange(0, D // 2)
        base = QKV + b * s_xb + t * s_xt + head * D
        x1 = tl.load(base + half).to(tl.float32)
        x2 = tl.load(base + D // 2 + half).to(tl.float32)
        if head < HQ + HKV:
            c1 = tl.load(Cos + b * s_cb + t * s_ct + half)
            c2 = tl.load(Cos + b * s_cb + t * s_ct + D // 2 + half)
            s1 = tl.load(Sin + b * s_cb + t * s_ct + half)
            s2 = tl.load(Sin + b * s_cb + t * s_ct + D // 2 + half)
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        else:
            y1 = x1
            y2 = x2
        if head < HQ:
            dst = Q + b * s_qb + head * s_qh + t * s_qt
            tl.store(dst + half, y1.to(Q.dtype.element_ty))
            tl.store(dst + D // 2 + half, y2.to(Q.dtype.element_ty))
        else:
            pos = tl.load(Pos + b * T + t)
            kv = head - HQ
            cache_b = b.to(tl.int64) * s_kb  # past 2^31 elements for long caches at large batch
            if kv < HKV:
                dst = CK + cache_b + kv * s_kh + pos * s_ks
            else:
                dst = CV + cache_b + (kv - HKV) * s_kh + pos * s_ks
            tl.store(dst + half, y1.to(CK.dtype.element_ty))
            tl.store(dst + D // 2 + half, y2.to(CK.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(X, Out, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
        wait_for_inputs(PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < N
        g = tl.load(X + row * 2 * N + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(X + row * 2 * N + N + cols, mask=ok, other=0.0).to(tl.float32)
        y = (g / (1.0 + tl.exp(-g))).to(X.dtype.element_ty).to(tl.float32) * u
        tl.store(Out + row * N + cols, y.to(Out.dtype.element_ty), mask=ok)


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `add_rmsnorm_reference`; updates `residual` in place. residual, delta: contiguous `[..., dim]`.
    Under PDL `weight` is read before the previous kernel has finished: it must not be that kernel's output."""
    N = residual.shape[-1]
    rows = residual.numel() // N
    out = torch.empty_like(residual)
    _add_rmsnorm_kernel[(rows,)](residual, delta if delta is not None else residual, weight, out, eps, N=N,
                                 BLOCK=triton.next_power_of_2(N), HAS_DELTA=delta is not None,
                                 **pdl.options(residual.device), num_warps=4)
    return out, residual


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """RoPE on q and k of a fused projection; k and v go into the cache at `positions`.

    qkv: `[B, T, (Hq + 2 Hkv) D]` contiguous; cos, sin: `[B, 1, T, D]` float32; positions: `[B, T]`;
    k_cache, v_cache: `[B, Hkv, S, D]`. Returns q `[B, Hq, T, D]`.
    """
    B, T, _ = qkv.shape
    D = k_cache.shape[-1]
    q = torch.empty(B, n_heads, T, D, device=qkv.device, dtype=qkv.dtype)
    cos, sin = cos[:, 0], sin[:, 0]
    _rope_write_kernel[(B * T, n_heads + 2 * n_kv_heads)](
        qkv, cos, sin, positions.contiguous(), q, k_cache, v_cache, qkv.stride(0), qkv.stride(1), cos.stride(0),
        cos.stride(1), q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), T, HQ=n_heads, HKV=n_kv_heads, D=D, **pdl.options(qkv.device), num_warps=1)
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Fused `silu_mul_reference`. gate_up: contiguous `[..., 2 N]`."""
    N = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * N)
    out = torch.empty(*gate_up.shape[:-1], N, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(N, block))](gate_up, out, N, BLOCK=block, **pdl.options(gate_up.device),
                                                    num_warps=4)
    return out
