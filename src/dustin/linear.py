"""Triton: the linear layers of a small-batch decode step, with their neighbours fused in.

A draft model's decode step multiplies a few rows (batch x new tokens) by each weight. cuBLAS reads
the weight well, but each layer then costs about ten launches (norms, split-K reductions, SiLU,
residual adds), and at this size every launch costs about as much as the bytes. One kernel here does

    out = [residual +] epilogue( rmsnorm(x) @ W^T [+ bias] )

so a layer takes four GEMM launches plus RoPE and attention. RMSNorm is linear in its input up to the
row scale, so the kernel multiplies `x * norm_weight` and scales by 1/RMS at the end, accumulating the
RMS in the same pass; SiLU(gate) * up or the residual add run in the epilogue. A program owns a block
of output columns for all rows and a split of K (a short, deep weight needs the whole GPU to read it):
the last split of a tile to finish adds the parked partial sums and runs the epilogue, so there is no
second launch. Reference: `linear_reference`.

The weight may also be float8 e4m3 with a float32 scale per output channel (`quantize_fp8`): the
kernel widens each tile exactly to the input's dtype and applies the scales in the epilogue, so a
bandwidth-bound projection reads half the bytes.

With `swap` a program accumulates out^T = W @ x^T instead: the weight's columns fill the 64-row side
of Hopper's warpgroup MMA and the few rows its short side, where x @ W^T would pad 16 rows to a tile.
`choose` picks a plan per kind of projection. Measured on the H200 over cold weights
(`benchmarks/gpu/linear.md`), a Qwen2.5-0.5B block's four projections take 22.8 us here against 28.9
for cuBLAS plus its norm and SiLU kernels; end to end (`benchmarks/gpu/e2e.json`) the all-fused draft
(`Transformer.linear_backend = "triton"`) is the faster for Qwen2.5-0.5B and cuBLAS with only the down
projection here (`"down"`) for Llama-3.2-1B, which is what `"auto"` picks.

    >>> y = linear(x, w, b, norm_weight=ln.weight, eps=1e-6)          # qkv of a pre-norm block
    >>> y = linear(act, w_down, residual=h)                           # down projection + residual
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import pdl
from .errors import DustinError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs run the reference
    triton = None
else:
    from .pdl import wait_for_inputs

MAX_ROWS = 64  # beyond this cuBLAS's tiling wins; the model routes larger passes there


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite e4m3 value


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, K]` weight -> (`[N, K]` float8 e4m3, `[N]` float32 scales) with weight ~= fp8 * scale per row:
    each output channel's largest magnitude maps to the largest e4m3 value."""
    w = weight.detach().float()
    scale = (w.abs().amax(1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale[:, None]).to(dtype)


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     norm_weight: torch.Tensor | None = None, eps: float = 1e-6, silu: bool = False,
                     residual: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x: `[..., K]`; weight: `[N, K]` (`[2 N, K]`, gate rows then up rows, with `silu`), or float8 with its
    `[N]` (`[2 N]`) `weight_scale`; returns `[..., N]`."""
    if weight_scale is not None:
        weight = dequantize_fp8(weight, weight_scale, x.dtype)
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
    def _linear_kernel(X, W, WScale, Bias, NormW, Res, Out, PartAcc, PartSs, Counter, M, N, K, k_per, eps,
                       s_xm, s_wn, s_rm, s_om,
                       NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                       SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       SPLITS: tl.constexpr, EVEN_K: tl.constexpr, SWAP: tl.constexpr, PRECISION: tl.constexpr,
                       PDL: tl.constexpr):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        pid_m = tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        kk = tl.arange(0, BLOCK_K)
        if SWAP:  # accumulate out^T: the weight's columns fill the MMA's long side, the few rows its short one
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        ss = tl.zeros([BLOCK_M], tl.float32)
        k_lo = split * k_per
        k_hi = tl.minimum(k_lo + k_per, K)
        # no kernel writes the weights: the first tile loads while the kernel before this one finishes
        w, w_up = _weight_tile(W, X, cols, col_ok, k_lo, kk, K, N, s_wn, SILU, EVEN_K, SCALED)
        wait_for_inputs(PDL)
        x, ss = _input_tile(X, NormW, rows, row_ok, k_lo, kk, K, s_xm, ss, NORM, EVEN_K)
        acc, acc_up = _mma(acc, acc_up, x, w, w_up, SILU, SWAP, PRECISION)
        for k0 in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
            w, w_up = _weight_tile(W, X, cols, col_ok, k0, kk, K, N, s_wn, SILU, EVEN_K, SCALED)
            x, ss = _input_tile(X, NormW, rows, row_ok, k0, kk, K, s_xm, ss, NORM, EVEN_K)
            acc, acc_up = _mma(acc, acc_up, x, w, w_up, SILU, SWAP, PRECISION)
        if SWAP:
            acc = tl.trans(acc)
            acc_up = tl.trans(acc_up)
        if SPLITS > 1:
            # split-K: park the partial sums; the last split of this tile to finish adds them up
            tile = pid_m * tl.num_programs(0) + pid_n
            tm = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            base = (tile * SPLITS + split) * BLOCK_M * BLOCK_N
            tl.store(PartAcc + 2 * base + tm, acc)
            if SILU:
                tl.store(PartAcc + 2 * base + BLOCK_M * BLOCK_N + tm, acc_up)
            if NORM:
                tl.store(PartSs + (tile * SPLITS + split) * BLOCK_M + tl.arange(0, BLOCK_M), ss)
            tl.debug_barrier()
            done = tl.atomic_add(Counter + tile, 1, sem="acq_rel", scope="gpu")
            if done == SPLITS - 1:  # ".cg": the parked sums come from L2, after the acquire
                acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                ss = tl.zeros([BLOCK_M], tl.float32)
                for s in tl.static_range(SPLITS):
                    b = (tile * SPLITS + s) * BLOCK_M * BLOCK_N
                    acc += tl.load(PartAcc + 2 * b + tm, cache_modifier=".cg")
                    if SILU:
                        acc_up += tl.load(PartAcc + 2 * b + BLOCK_M * BLOCK_N + tm, cache_modifier=".cg")
                    if NORM:
                        ss += tl.load(PartSs + (tile * SPLITS + s) * BLOCK_M + tl.arange(0, BLOCK_M),
                                      cache_modifier=".cg")
                _epilogue(acc, acc_up, ss, rows, cols, row_ok, col_ok, WScale, Bias, Res, Out, N, K, eps, s_rm,
                          s_om, NORM, SILU, RESIDUAL, HAS_BIAS, SCALED)
                tl.atomic_xchg(Counter + tile, 0)  # ready for the next launch
        else:
            _epilogue(acc, acc_up, ss, rows, cols, row_ok, col_ok, WScale, Bias, Res, Out, N, K, eps, s_rm, s_om,
                      NORM, SILU, RESIDUAL, HAS_BIAS, SCALED)

    @triton.jit
    def _weight_tile(W, X, cols, col_ok, k0, kk, K, N, s_wn, SILU: tl.constexpr, EVEN_K: tl.constexpr,
                     SCALED: tl.constexpr):
        """Columns `cols` x depth `[k0, k0 + BLOCK_K)` of the weight, and of its up half with `SILU`; an
        fp8 weight (`SCALED`) widened to the input's dtype, exactly (its scales apply in the epilogue)."""
        # a mask along K would stop the loads from being vectorised: only a ragged K pays for one
        if EVEN_K:
            w_ok = col_ok[:, None]
        else:
            w_ok = col_ok[:, None] & (k0 + kk < K)[None, :]
        w = tl.load(W + cols[:, None] * s_wn + (k0 + kk)[None, :], mask=w_ok, other=0.0)
        w_up = w
        if SILU:
            w_up = tl.load(W + (cols + N)[:, None] * s_wn + (k0 + kk)[None, :], mask=w_ok, other=0.0)
        if SCALED:
            w = w.to(X.dtype.element_ty)
            w_up = w_up.to(X.dtype.element_ty)
        return w, w_up

    @triton.jit
    def _mma(acc, acc_up, x, w, w_up, SILU: tl.constexpr, SWAP: tl.constexpr, PRECISION: tl.constexpr):
        if SWAP:
            acc += tl.dot(w, tl.trans(x), input_precision=PRECISION)
            if SILU:
                acc_up += tl.dot(w_up, tl.trans(x), input_precision=PRECISION)
        else:
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
            if SILU:
                acc_up += tl.dot(x, tl.trans(w_up), input_precision=PRECISION)
        return acc, acc_up

    @triton.jit
    def _input_tile(X, NormW, rows, row_ok, k0, kk, K, s_xm, ss, NORM: tl.constexpr, EVEN_K: tl.constexpr):
        """Rows x depth `[k0, k0 + BLOCK_K)` of the input, times the norm weight with `NORM`; `ss` gains
        the rows' sums of squares (rmsnorm(x) @ W^T = rstd * ((x * norm_w) @ W^T), so the RMS
        accumulates in the same pass)."""
        if EVEN_K:
            x = tl.load(X + rows[:, None] * s_xm + (k0 + kk)[None, :], mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(X + rows[:, None] * s_xm + (k0 + kk)[None, :],
                        mask=row_ok[:, None] & (k0 + kk < K)[None, :], other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
            if EVEN_K:
                nw = tl.load(NormW + k0 + kk)
            else:
                nw = tl.load(NormW + k0 + kk, mask=k0 + kk < K, other=0.0)
            x = (xf * nw.to(tl.float32)[None, :]).to(X.dtype.element_ty)
        return x, ss

    @triton.jit
    def _epilogue(acc, acc_up, ss, rows, cols, row_ok, col_ok, WScale, Bias, Res, Out, N, K, eps, s_rm, s_om,
                  NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SCALED: tl.constexpr):
        if SCALED:  # each output channel's scale (the up half's from row N + col of the weight)
            acc = acc * tl.load(WScale + cols, mask=col_ok, other=0.0)[None, :]
            if SILU:
                acc_up = acc_up * tl.load(WScale + N + cols, mask=col_ok, other=0.0)[None, :]
        if NORM:
            rstd = 1.0 / tl.sqrt(ss / K + eps)
            acc = acc * rstd[:, None]
            acc_up = acc_up * rstd[:, None]
        if HAS_BIAS:
            acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if RESIDUAL:
            acc += tl.load(Res + rows[:, None] * s_rm + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                           other=0.0).to(tl.float32)
        tl.store(Out + rows[:, None] * s_om + cols[None, :], acc.to(Out.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def row_block(rows: int) -> int:
    """The row block a launch of `rows` rows uses: plans are keyed by it (`use_plans`)."""
    return max(16, 1 << (rows - 1).bit_length())


class Plan(NamedTuple):
    """How `linear` tiles one projection: output columns and depth per program, splits of K (None:
    about two programs per SM), `swap` (accumulate out^T, so the weight's columns fill the MMA's long
    side: Hopper's warpgroup MMA needs 64 of them), warps and software-pipeline depth."""

    block_n: int = 32
    block_k: int | None = None
    splits: int | None = None
    swap: bool = False
    num_warps: int = 4
    num_stages: int = 3


_measured: dict[tuple[int, int, bool, int], Plan] = {}


@contextlib.contextmanager
def use_plans(plans: dict[tuple[int, int, bool, int], Plan]):
    """Within the block, a projection of shape `(n, k, silu, block_m)` found in `plans` runs with that
    plan: a benchmark times whole decode passes under the plans it measured per projection."""
    saved = dict(_measured)
    _measured.update(plans)
    try:
        yield
    finally:
        _measured.clear()
        _measured.update(saved)


def choose(n: int, k: int, *, silu: bool = False, residual: bool = False, block_m: int = 16) -> Plan:
    """The plan for an `[n, k]` projection before its depth and splits are resolved: a measured one from
    `use_plans`, else by the kind of projection, as the H200 sweeps over cold weights found best at 16
    rows (benchmarks/gpu/linear.json): gate/up with SiLU in one pass over K as out^T, 64-deep blocks six
    stages deep (Qwen2.5-0.5B 9.3 us against 15.4 for the plain plan); other weights of 4M elements or
    more as out^T in 128-deep blocks (Llama-3.2-1B qkv 9.0 against 14.9 us, down 12.8 against 14.6);
    a smaller one that adds the residual (the attention's o) the same but in one pass over K, the plan
    that `bench linear`'s tuning in whole passes kept for Qwen2.5-0.5B (alone both take 3.55 us; in a
    pass the plain plan cost 0.891 ms against 0.813); other small ones in the plain plan (Qwen2.5-0.5B
    qkv 4.0 against 4.1 us)."""
    if (n, k, silu, block_m) in _measured:
        return _measured[(n, k, silu, block_m)]
    if silu:
        return Plan(block_n=64, block_k=64, splits=1, swap=True, num_stages=6)
    if n * k >= 1 << 22:
        return Plan(block_n=64, block_k=128, swap=True, num_stages=4)
    if residual:
        return Plan(block_n=64, block_k=128, splits=1, swap=True, num_stages=4)
    return Plan()


def plan(n: int, k: int, m_blocks: int, device: torch.device, *, silu: bool = False, residual: bool = False,
         block_m: int = 16, **fixed) -> Plan:
    """`choose`'s plan, or with any of `fixed` given (not None) the `Plan` of those fields alone; then
    unless given, the depth block is the deepest up to 256 that divides K, and K is split so that there
    are about two programs per SM."""
    from .attention.decode import _sm_count

    given = {f: v for f, v in fixed.items() if v is not None}
    p = Plan(**given) if given else choose(n, k, silu=silu, residual=residual, block_m=block_m)
    block_k = p.block_k
    if block_k is None:
        block_k = 256
        while block_k > 64 and k % block_k:  # a depth block that divides K keeps the loads unmasked
            block_k //= 2
    splits = p.splits
    if splits is None:
        programs = triton.cdiv(n, p.block_n) * m_blocks
        splits = max(1, min(8, (2 * _sm_count(device) + programs - 1) // programs, triton.cdiv(k, block_k)))
    return p._replace(block_k=block_k, splits=splits)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           norm_weight: torch.Tensor | None = None, eps: float = 1e-6, silu: bool = False,
           residual: torch.Tensor | None = None, block_n: int | None = None, block_k: int | None = None,
           splits: int | None = None, swap: bool | None = None, num_warps: int | None = None,
           num_stages: int | None = None, weight_scale: torch.Tensor | None = None,
           check: bool = True) -> torch.Tensor:
    """Fused `linear_reference` for at most `MAX_ROWS` rows. x: `[..., K]` with a contiguous last
    dimension; weight: `[N, K]` or `[2 N, K]` with `silu`, in x's dtype or float8 e4m3 with float32
    per-row `weight_scale` (`quantize_fp8`: half the bytes, widened exactly in the kernel); residual:
    `[..., N]`. Returns `[..., N]`. Any tiling argument given replaces the planned tiling (`plan`).

    Under PDL (`dustin.pdl`) the kernel reads its first weight tile before the previous kernel has
    finished: `weight` must not be an output of the kernel launched just before (a parameter never is)."""
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
        scaled = weight.dtype == FP8
        if scaled != (weight_scale is not None):
            raise DustinError("a float8 weight needs its weight_scale, and only a float8 weight takes one "
                              "(quantize_fp8 makes both)")
        if (x.dtype != weight.dtype and not scaled) or x.device != weight.device or x2.stride(-1) != 1 \
                or weight.stride(-1) != 1:
            raise DustinError("x and weight need one dtype (or a float8 weight), one device and contiguous last "
                              "dimensions")
        if scaled and (weight_scale.shape != (weight.shape[0],) or weight_scale.dtype != torch.float32
                       or weight_scale.device != weight.device):
            raise DustinError(f"weight_scale must be float32 ({weight.shape[0]},) on {weight.device}, got "
                              f"{weight_scale.dtype} {tuple(weight_scale.shape)}")
        for name, t, n in (("bias", bias, N), ("norm_weight", norm_weight, K)):
            if t is not None and t.shape != (n,):
                raise DustinError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
        if residual is not None and (residual.shape[:-1] != x.shape[:-1] or residual.shape[-1] != N):
            raise DustinError(f"residual must be {tuple(x.shape[:-1]) + (N,)}, got {tuple(residual.shape)}")
    from .attention.decode import dot_precision, semaphores

    res2 = residual.reshape(-1, N).contiguous() if residual is not None else x2
    out = torch.empty(*x.shape[:-1], N, device=x.device, dtype=x.dtype)
    out2 = out.view(-1, N)
    block_m = row_block(M)
    p = plan(N, K, triton.cdiv(M, block_m), x.device, silu=silu, residual=residual is not None, block_m=block_m,
             block_n=block_n, block_k=block_k, splits=splits, swap=swap, num_warps=num_warps, num_stages=num_stages)
    bn, bk = p.block_n, p.block_k
    k_per = triton.cdiv(triton.cdiv(K, p.splits), bk) * bk
    splits = triton.cdiv(K, k_per)  # no empty split
    grid = (triton.cdiv(N, bn), splits, triton.cdiv(M, block_m))
    part_acc = part_ss = counter = out2
    if splits > 1:
        tiles = grid[0] * grid[2]
        part_acc = torch.empty(tiles * splits * 2 * block_m * bn, device=x.device, dtype=torch.float32)
        part_ss = torch.empty(tiles * splits * block_m, device=x.device, dtype=torch.float32)
        counter = semaphores(x.device, tiles)
    _linear_kernel[grid](
        x2, weight, weight_scale if weight_scale is not None else out2, bias if bias is not None else weight,
        norm_weight if norm_weight is not None else weight,
        res2, out2, part_acc, part_ss, counter, M, N, K, k_per, eps, x2.stride(0), weight.stride(0), res2.stride(0),
        out2.stride(0), NORM=norm_weight is not None, SILU=silu, RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None, SCALED=weight_scale is not None, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk,
        SPLITS=splits, EVEN_K=K % bk == 0, SWAP=p.swap, PRECISION=dot_precision(x.dtype), **pdl.options(x.device),
        num_warps=p.num_warps, num_stages=p.num_stages)
    return out
