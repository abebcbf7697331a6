"""Triton: the linear layers of a small-batch decode step, with their neighbours fused in.

A draft model's decode step multiplies a few rows (batch x new tokens) by each weight. cuBLAS reads
the weight well, but each layer then costs about ten launches (norms, split-K reductions, SiLU,
residual adds), and at this size every launch costs about as much as the bytes. One kernel here does

    out = [residual +] epilogue( rmsnorm(x) @ W^T [+ bias] )

so a layer takes four GEMM launches plus RoPE and attention: RMSNorm rides in the prologue (each
program recomputes the norm of its rows, which are a few KB), and SiLU(gate) * up or the residual add
in the epilogue. A program owns a block of output columns for all rows, so the weight is read once.
Reference: `linear_reference`.

    >>> y = linear(x, w, b, norm_weight=ln.weight, eps=1e-6)          # qkv of a pre-norm block
    >>> y = linear(act, w_down, residual=h)                           # down projection + residual
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DustinError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None

MAX_ROWS = 64  # beyond this cuBLAS's tiling wins; the model routes larger passes there


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     norm_weight: torch.Tensor | None = None, eps: float = 1e-6, silu: bool = False,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: `[..., K]`; weight: `[N, K]` (`[2 N, K]`, gate rows then up rows, with `silu`); returns `[..., N]`."""
    if norm_weight is not None:
        h = x.float()
        x = norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    y = F.linear(x, weight, bias)
    if silu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else residual + y


if triton is not None:

    @triton.jit
    def _linear_kernel(X, W, Bias, NormW, Res, Out, M, N, K, eps, s_xm, s_wn, s_rm, s_om,
                       NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        kk = tl.arange(0, BLOCK_K)
        if NORM:  # the rows' RMS over all of K, before any of the weight is read
            ss = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = tl.load(X + rows[:, None] * s_xm + (k0 + kk)[None, :],
                            mask=row_ok[:, None] & (k0 + kk < K)[None, :], other=0.0).to(tl.float32)
                ss += tl.sum(x * x, 1)
            rstd = 1.0 / tl.sqrt(ss / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if SILU:
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = k0 + kk < K
            x = tl.load(X + rows[:, None] * s_xm + (k0 + kk)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:  # rounded where the reference rounds: normalised to the input dtype, then times the weight
                nw = tl.load(NormW + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
                x = ((x.to(tl.float32) * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32) * nw[None, :])
                x = x.to(X.dtype.element_ty)
            w = tl.load(W + cols[:, None] * s_wn + (k0 + kk)[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w))
            if SILU:
                w_up = tl.load(W + (cols + N)[:, None] * s_wn + (k0 + kk)[None, :],
                               mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                acc_up += tl.dot(x, tl.trans(w_up))
        if HAS_BIAS:
            acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if RESIDUAL:
            acc += tl.load(Res + rows[:, None] * s_rm + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                           other=0.0).to(tl.float32)
        tl.store(Out + rows[:, None] * s_om + cols[None, :], acc.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def plan_blocks(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): narrow column blocks when the weight is short and deep, so that enough
    programs share its read (measured on the H200: benchmarks/gpu/linear.json)."""
    return (16 if n <= 2048 and k >= 2048 else 32), 128


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           norm_weight: torch.Tensor | None = None, eps: float = 1e-6, silu: bool = False,
           residual: torch.Tensor | None = None, block_n: int | None = None, block_k: int | None = None,
           num_warps: int = 4, num_stages: int = 3, check: bool = True) -> torch.Tensor:
    """Fused `linear_reference` for at most `MAX_ROWS` rows. x: `[..., K]` with a contiguous last
    dimension; weight: `[N, K]` or `[2 N, K]` with `silu`; residual: `[..., N]`. Returns `[..., N]`."""
    K = x.shape[-1]
    N = weight.shape[0] // 2 if silu else weight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if check:
        if triton is None:
            raise DustinError("the fused linear kernel needs triton; use linear_reference")
        if weight.dim() != 2 or weight.shape[1] != K or (silu and weight.shape[0] % 2):
            raise DustinError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}"
                              + (" (silu needs [2 N, K])" if silu else ""))
        if silu and bias is not None:
            raise DustinError("a biased gate/up projection is not supported; gate/up layers carry no bias")
        if not 1 <= M <= MAX_ROWS:
            raise DustinError(f"the fused linear kernel takes 1..{MAX_ROWS} rows, got {M}; use F.linear")
        if x.dtype != weight.dtype or x.device != weight.device or x2.stride(-1) != 1 or weight.stride(-1) != 1:
            raise DustinError("x and weight need one dtype, one device and contiguous last dimensions")
        for name, t, n in (("bias", bias, N), ("norm_weight", norm_weight, K)):
            if t is not None and t.shape != (n,):
                raise DustinError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        if residual is not None and (residual.shape[:-1] != x.shape[:-1] or residual.shape[-1] != N):
            raise DustinError(f"residual must be {tuple(x.shape[:-1]) + (N,)}, got {tuple(residual.shape)}")
    res2 = residual.reshape(-1, N) if residual is not None else x2
    out = torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    out2 = out.view(-1, N)
    bn, bk = plan_blocks(N, K)
    block_n, block_k = block_n or bn, block_k or bk
    block_m = max(16, triton.next_power_of_2(M))
    _linear_kernel[(triton.cdiv(N, block_n), triton.cdiv(M, block_m))](
        x2, weight, bias if bias is not None else weight, norm_weight if norm_weight is not None else weight,
        res2, out2, M, N, K, eps, x2.stride(0), weight.stride(0), res2.stride(0), out2.stride(0),
        NORM=norm_weight is not None, SILU=silu, RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out
