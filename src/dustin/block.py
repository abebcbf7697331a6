"""Triton: a whole decoder block of a few-row sparse decode pass in one persistent launch.

A draft's decode step runs 16-32 rows through each block. The weights are a few MB per block, but
a block launched as separate kernels pays each kernel's start, its first DRAM round trip and its tail
about eight times (benchmarks/gpu/profile: ~35 us per Qwen2.5-0.5B block against a 7 us weight-read
floor). Here one grid of about one program per SM runs the block's five phases, with a grid-wide
barrier between them:

    0. qkv = rmsnorm(x) @ Wqkv^T + b              (`linear.linear_tile`, split-K)
    1. RoPE, K/V into the cache, attention over the index set + the new tokens   (`attn_program`)
    2. h = x + attn @ Wo^T [+ b]
    3. act = SiLU(gate) * up of rmsnorm(h) @ Wgu^T
    4. out = h + act @ Wd^T

Each phase is the device function of its standalone kernel, so the math is the one the other tests
check. A program loops over its phase's work items (tiles x splits) with a stride of the grid.
Reference: `block_reference`.

The barrier needs every program resident at once, which the grid size guarantees on a GPU but not
under the Triton interpreter, which runs programs one after another: there (`one_launch=False`) each
phase is its own launch of the same kernel.

    >>> out = fused_block(x, w, k_cache, v_cache, seq_lens, indices, cos, sin, positions)  # ~= block_reference
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention import reference
from .errors import DustinError
from .fused import rope_reference, split_heads
from .linear import MAX_ROWS, linear_reference

try:
    import triton
    import triton.language as tl

    from .attention.decode import LOG2E, attn_program, dot_precision, plan_sparse_splits, semaphores, _sm_count
    from .linear import linear_tile, plan
except ImportError:  # CPU-only installs run the reference
    triton = None

PHASES = 5


@dataclass(frozen=True)
class BlockWeights:
    """One pre-norm decoder block's parameters, as the model holds them (q/k/v and gate/up fused)."""

    ln1: torch.Tensor  # [dim]
    qkv: torch.Tensor  # [(Hq + 2 Hkv) D, dim]
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hkv) D]
    o: torch.Tensor  # [dim, Hq D]
    o_bias: torch.Tensor | None  # [dim]
    ln2: torch.Tensor  # [dim]
    gate_up: torch.Tensor  # [2 I, dim], gate rows then up rows
    down: torch.Tensor  # [dim, I]
    eps: float
    n_heads: int


def block_reference(x: torch.Tensor, w: BlockWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    seq_lens: torch.Tensor, indices: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
    """The block in torch; writes the new K/V into the caches.

    x: `[B, T, dim]` residual stream; k_cache, v_cache: `[B, Hkv, S, D]`; seq_lens: `[B]`;
    indices: `[B, budget]` / `[B, Hkv, budget]`; cos, sin: `[B, T, D]` float32; positions: `[B, T]`
    cache slots of the new tokens. Returns the block's output residual `[B, T, dim]`.
    """
    B, T, _ = x.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    qkv = linear_reference(x, w.qkv, w.qkv_bias, norm_weight=w.ln1, eps=w.eps)
    q, k, v = split_heads(qkv, w.n_heads, Hkv, D)
    q = rope_reference(q, cos[:, None], sin[:, None])
    k = rope_reference(k, cos[:, None], sin[:, None])
    slot = positions.long()[:, None, :, None].expand(-1, Hkv, -1, D)
    k_cache.scatter_(2, slot, k)
    v_cache.scatter_(2, slot, v)
    attn = reference.sparse_attention(q, k_cache, v_cache, seq_lens, indices).transpose(1, 2).reshape(B, T, -1)
    h = linear_reference(attn, w.o, w.o_bias, residual=x)
    act = linear_reference(h, w.gate_up, norm_weight=w.ln2, eps=w.eps, silu=True)
    return linear_reference(act, w.down, residual=h)


if triton is not None:

    @triton.jit
    def _gemm_phase(pid, n_prog, X, W, Bias, NormW, Res, Out, PartAcc, PartSs, Counter, M, N, K, n_per, k_per, eps,
                    NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
                    EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
        """`out = [res +] epilogue(rmsnorm(x) @ W^T [+ bias])` over contiguous rows, as `dustin.linear`."""
        tiles_n = tl.cdiv(N, n_per)
        per_m = tiles_n * SPLITS
        for item in range(pid, per_m * tl.cdiv(M, BLOCK_M), n_prog):
            r = item % per_m
            linear_tile(r % tiles_n, r // tiles_n, item // per_m, tiles_n, n_per, X, W, Bias, NormW, Res, Out, PartAcc,
                        PartSs, Counter, M, N, K, k_per, eps, K, K, N, N, NORM, SILU, RESIDUAL, HAS_BIAS,
                        BLOCK_M, BLOCK_N, BLOCK_K, SPLITS, EVEN_K, PRECISION)

    @triton.jit
    def _grid_sync(Bar, target):
        """Wait until `target` arrivals: every program's writes before it are visible after it."""
        tl.debug_barrier()
        tl.atomic_add(Bar, 1, sem="release", scope="gpu")
        while tl.load(Bar, volatile=True) < target:
            pass
        tl.atomic_add(Bar, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def _block_kernel(X, Ln1, Wqkv, Bqkv, Wo, Bo, Ln2, Wgu, Wd, Qkv, Attn, H, Act, Out,
                      Kc, Vc, SeqLens, Idx, Cos, Sin, Pos, PartO, PartLse, AttnCounter,
                      PartAcc, PartSs, LinCounter, Bar,
                      M, n_kv_heads, n_budget, n_cache, eps, scale,
                      np_qkv, kp_qkv, np_o, kp_o, np_gu, kp_gu, np_d, kp_d,
                      s_kb, s_kh, s_ks, s_ib, s_ih, s_cb, s_ct,
                      DIM: tl.constexpr, N_QKV: tl.constexpr, INTER: tl.constexpr, QKV_BIAS: tl.constexpr,
                      O_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      QKV_BN: tl.constexpr, QKV_BK: tl.constexpr, QKV_S: tl.constexpr, QKV_EVEN: tl.constexpr,
                      O_BN: tl.constexpr, O_BK: tl.constexpr, O_S: tl.constexpr, O_EVEN: tl.constexpr,
                      GU_BN: tl.constexpr, GU_BK: tl.constexpr, GU_S: tl.constexpr, GU_EVEN: tl.constexpr,
                      D_BN: tl.constexpr, D_BK: tl.constexpr, D_S: tl.constexpr, D_EVEN: tl.constexpr,
                      T: tl.constexpr, G: tl.constexpr, D: tl.constexpr, ATT_BM: tl.constexpr,
                      ATT_BN: tl.constexpr, ATT_BT: tl.constexpr, ATT_S: tl.constexpr,
                      FIRST: tl.constexpr, LAST: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        m_tiles = tl.cdiv(M, BLOCK_M)
        hq = G * n_kv_heads
        # split-K semaphores, one region per linear phase
        c_o = LinCounter + tl.cdiv(N_QKV, np_qkv) * m_tiles
        c_gu = c_o + tl.cdiv(DIM, np_o) * m_tiles
        c_d = c_gu + tl.cdiv(INTER, np_gu) * m_tiles
        if FIRST <= 0 and LAST >= 0:
            _gemm_phase(pid, n_prog, X, Wqkv, Bqkv, Ln1, X, Qkv, PartAcc, PartSs, LinCounter, M, N_QKV, DIM,
                        np_qkv, kp_qkv, eps, True, False, False, QKV_BIAS, BLOCK_M, QKV_BN, QKV_BK, QKV_S,
                        QKV_EVEN, PRECISION)
        if FIRST <= 0 and LAST >= 1:
            _grid_sync(Bar, (1 - FIRST) * n_prog)
        if FIRST <= 1 and LAST >= 1:
            for item in range(pid, (M // T) * n_kv_heads * ATT_S, n_prog):
                attn_program(item // ATT_S, item % ATT_S, Qkv, Kc, Vc, SeqLens, Idx, Attn, PartO, PartLse,
                             AttnCounter, Cos, Sin, Pos, T * N_QKV, D, N_QKV, s_kb, s_kh, s_ks, s_kb, s_kh, s_ks,
                             s_ib, s_ih, T * hq * D, D, hq * D, s_cb, s_ct, n_kv_heads, n_budget, n_cache, scale,
                             T, G, G, D, ATT_BM, ATT_BN, ATT_BT, ATT_S, True, ATT_S > 1, True, True, PRECISION)
        if FIRST <= 1 and LAST >= 2:
            _grid_sync(Bar, (2 - FIRST) * n_prog)
        if FIRST <= 2 and LAST >= 2:
            _gemm_phase(pid, n_prog, Attn, Wo, Bo, Wo, X, H, PartAcc, PartSs, c_o, M, DIM, hq * D, np_o, kp_o, eps,
                        False, False, True, O_BIAS, BLOCK_M, O_BN, O_BK, O_S, O_EVEN, PRECISION)
        if FIRST <= 2 and LAST >= 3:
            _grid_sync(Bar, (3 - FIRST) * n_prog)
        if FIRST <= 3 and LAST >= 3:
            _gemm_phase(pid, n_prog, H, Wgu, Wgu, Ln2, H, Act, PartAcc, PartSs, c_gu, M, INTER, DIM, np_gu, kp_gu,
                        eps, True, True, False, False, BLOCK_M, GU_BN, GU_BK, GU_S, GU_EVEN, PRECISION)
        if FIRST <= 3 and LAST >= 4:
            _grid_sync(Bar, (4 - FIRST) * n_prog)
        if FIRST <= 4 and LAST >= 4:
            _gemm_phase(pid, n_prog, Act, Wd, Wd, Wd, H, Out, PartAcc, PartSs, c_d, M, DIM, INTER, np_d, kp_d, eps,
                        False, False, True, False, BLOCK_M, D_BN, D_BK, D_S, D_EVEN, PRECISION)
        if FIRST < LAST:
            # the last program out resets the barrier for the next launch: everyone has passed every wait
            tl.debug_barrier()
            if tl.atomic_add(Bar, 1, sem="acq_rel", scope="gpu") == (LAST - FIRST + 1) * n_prog - 1:
                tl.atomic_xchg(Bar, 0)


def _check(x, w, k_cache, v_cache, seq_lens, indices, cos, sin, positions) -> None:
    if x.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise DustinError(f"expected x [B, T, dim] and caches [B, Hkv, S, D] of one shape, got {tuple(x.shape)}, "
                          f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, T, dim = x.shape
    Hkv, S, D = k_cache.shape[1:]
    width = (w.n_heads + 2 * Hkv) * D
    if not 1 <= B * T <= MAX_ROWS or T > 16:
        raise DustinError(f"the fused block takes 1..{MAX_ROWS} rows of at most 16 new tokens, got B={B}, T={T}")
    if k_cache.shape[0] != B or w.n_heads % Hkv or D & (D - 1) or D < 16:
        raise DustinError(f"{w.n_heads} query heads do not fit the cache {tuple(k_cache.shape)} for batch {B}")
    shapes = {"ln1": (w.ln1, (dim,)), "qkv": (w.qkv, (width, dim)), "o": (w.o, (dim, w.n_heads * D)),
              "ln2": (w.ln2, (dim,)), "down": (w.down, (dim, w.down.shape[-1])),
              "gate_up": (w.gate_up, (2 * w.down.shape[-1], dim)), "qkv_bias": (w.qkv_bias, (width,)),
              "o_bias": (w.o_bias, (dim,))}
    for name, (t, shape) in shapes.items():
        if t is None:
            continue
        if tuple(t.shape) != shape or not t.is_contiguous() or t.dtype != x.dtype or t.device != x.device:
            raise DustinError(f"block weight {name} must be a contiguous {x.dtype} {shape} on {x.device}, "
                              f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if not x.is_contiguous() or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DustinError(f"x must be a contiguous float16, bfloat16 or float32 tensor, got {x.dtype}")
    if k_cache.dtype != x.dtype or k_cache.device != x.device or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise DustinError("the caches need x's dtype and device, a contiguous last dimension and one layout")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (B, T, D) or t.dtype != torch.float32 or t.stride(-1) != 1 or t.device != x.device:
            raise DustinError(f"{name} must be float32 [B, T, D] = {(B, T, D)} on {x.device}, got "
                              f"{tuple(t.shape)} {t.dtype}")
    if positions.shape != (B, T) or positions.dtype not in (torch.int32, torch.int64) or not positions.is_contiguous():
        raise DustinError(f"positions must be a contiguous integer [B, T] = {(B, T)}, got {tuple(positions.shape)}")
    if seq_lens.shape != (B,) or seq_lens.dtype not in (torch.int32, torch.int64) or seq_lens.device != x.device:
        raise DustinError(f"seq_lens must be an integer [{B}] on {x.device}, got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if indices.dim() not in (2, 3) or indices.shape[0] != B or (indices.dim() == 3 and indices.shape[1] not in (1, Hkv)):
        raise DustinError(f"indices must be [B, budget] or [B, Hkv, budget], got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64) or indices.device != x.device or indices.stride(-1) != 1:
        raise DustinError("indices must be a contiguous integer tensor on the device of x")
    # a position or key past the cache would be an out-of-bounds access: refuse it (one host sync)
    if bool(((positions < 0) | (positions >= S)).any()) or int(seq_lens.min()) < 0 or int(seq_lens.max()) + T > S:
        raise DustinError(f"positions and seq_lens + {T} new tokens must lie in the cache's [0, {S})")


@dataclass(frozen=True)
class _Gemm:
    """How a persistent grid shares one linear phase: each program takes one tile of `n_per` columns (its
    block padded to `block_n`) by `k_per` of K, so that one round of the grid reads the whole weight."""

    n: int
    n_per: int
    block_n: int
    block_k: int
    splits: int
    k_per: int
    even_k: bool

    @property
    def tiles(self) -> int:
        return triton.cdiv(self.n, self.n_per)


def _gemm_plan(n: int, k: int, m_tiles: int, programs: int, silu: bool) -> _Gemm:
    """The fullest padded tile (to a tenth, at most 128 columns), then the fewest splits of K; every
    option gives each program about the same weight bytes. Depth blocks hold about 32 KB of weight, so
    a program keeps enough loads in flight, and divide K where they can (a ragged K masks every load)."""
    options = []
    for splits in (1, 2, 4, 8):
        n_per = triton.cdiv(n, max(1, programs // (splits * m_tiles)))
        block_n = max(16, triton.next_power_of_2(n_per))
        if block_n <= 128 or splits == 1:
            options.append((-round(n_per / block_n, 1), splits, n_per, block_n))
    _, splits, n_per, block_n = min(options)
    target = max(32, min(512, 32768 // (block_n * 2 * (2 if silu else 1))))
    block_k = next((b for b in (512, 256, 128, 64, 32) if b <= target and k % b == 0), target)
    k_per = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return _Gemm(n, n_per, block_n, block_k, triton.cdiv(k, k_per), k_per, k % block_k == 0)


def fused_block(x: torch.Tensor, w: BlockWeights, k_cache: torch.Tensor, v_cache: torch.Tensor,
                seq_lens: torch.Tensor, indices: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                positions: torch.Tensor, *, one_launch: bool | None = None, programs: int | None = None,
                num_warps: int = 4, num_stages: int = 3, check: bool = True) -> torch.Tensor:
    """`block_reference` in one launch (`one_launch`, the default on a GPU) or one launch per phase
    (the default under the interpreter). Shapes as `block_reference`; at most `MAX_ROWS` rows.
    `programs`: the grid (default one program per SM; never more than can be resident at once)."""
    if check:
        if triton is None:
            raise DustinError("the fused block needs triton; use block_reference")
        _check(x, w, k_cache, v_cache, seq_lens, indices, cos, sin, positions)
    B, T, dim = x.shape
    Hkv, S, D = k_cache.shape[1:]
    M, inter, n_qkv = B * T, w.down.shape[1], w.qkv.shape[0]
    G = w.n_heads // Hkv
    dev = x.device
    programs = programs or _sm_count(dev)
    block_m = max(16, triton.next_power_of_2(M))
    m_tiles = triton.cdiv(M, block_m)
    gemms = [_gemm_plan(n, k, m_tiles, programs, silu) for n, k, silu in
             ((n_qkv, dim, False), (dim, w.n_heads * D, False), (inter, dim, True), (dim, inter, False))]
    units = B * Hkv
    att_bm = max(16, triton.next_power_of_2(G * T))
    idx = indices if indices.dim() == 3 else indices[:, None]
    n_budget = idx.shape[-1]
    # one round of the grid: a program's second item would wait for its first one's loads
    att_splits = max(1, min(programs // units, n_budget // 64, 32))

    tiles = [g.tiles * m_tiles for g in gemms]
    part_acc = max(t * g.splits * 2 * block_m * g.block_n for t, g in zip(tiles, gemms))
    part_ss = max(t * g.splits * block_m for t, g in zip(tiles, gemms))
    f32 = dict(device=dev, dtype=torch.float32)
    part_acc, part_ss = torch.empty(part_acc, **f32), torch.empty(part_ss, **f32)
    part_o = torch.empty(units * att_splits * att_bm, D, **f32)
    part_lse = torch.empty(units * att_splits * att_bm, **f32)
    counters = semaphores(dev, 1 + units + sum(tiles))
    bar, att_counter, lin_counter = counters[:1], counters[1:1 + units], counters[1 + units:]

    qkv = torch.empty(M, n_qkv, device=dev, dtype=x.dtype)
    attn = torch.empty(B, T, w.n_heads, D, device=dev, dtype=x.dtype)
    h = torch.empty(M, dim, device=dev, dtype=x.dtype)
    act = torch.empty(M, inter, device=dev, dtype=x.dtype)
    out = torch.empty_like(x)
    if one_launch is None:
        one_launch = dev.type == "cuda"
    args = (x, w.ln1, w.qkv, w.qkv_bias if w.qkv_bias is not None else w.qkv, w.o,
            w.o_bias if w.o_bias is not None else w.o, w.ln2, w.gate_up, w.down, qkv, attn, h, act, out,
            k_cache, v_cache, seq_lens, idx, cos, sin, positions, part_o, part_lse, att_counter,
            part_acc, part_ss, lin_counter, bar,
            M, Hkv, n_budget, S, w.eps, LOG2E / math.sqrt(D), *(v for g in gemms for v in (g.n_per, g.k_per)),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), idx.stride(0),
            idx.stride(1) if idx.shape[1] > 1 else 0, cos.stride(0), cos.stride(1))
    meta = dict(DIM=dim, N_QKV=n_qkv, INTER=inter, QKV_BIAS=w.qkv_bias is not None, O_BIAS=w.o_bias is not None,
                BLOCK_M=block_m, T=T, G=G, D=D, ATT_BM=att_bm, ATT_BN=64, ATT_BT=max(16, triton.next_power_of_2(T)),
                ATT_S=att_splits, PRECISION=dot_precision(x.dtype), num_warps=num_warps, num_stages=num_stages)
    for name, g in zip(("QKV", "O", "GU", "D"), gemms):
        meta.update({f"{name}_BN": g.block_n, f"{name}_BK": g.block_k, f"{name}_S": g.splits, f"{name}_EVEN": g.even_k})
    for first, last in [(0, PHASES - 1)] if one_launch else [(p, p) for p in range(PHASES)]:
        _block_kernel[(programs,)](*args, FIRST=first, LAST=last, **meta)
    return out
