"""Triton: full-context attention probabilities of a few chosen heads, summed to one score per position.

Two launches. The first reads each needed key once: a program owns one (sequence, KV head) and a split
of the positions, its tile rows are the chosen heads of that KV group times the queries; it writes the
scaled logits and per-split softmax statistics. The second merges the statistics and writes
`sum_heads softmax(logits)` per query and position. Reference: `reference.position_scores`.

The logits make a round trip through memory, so they travel as float16 relative to their tile's row
maximum (plus one float32 maximum per tile and row): half the bytes of float32, and exact to 2^-11
relative where it matters, near each maximum.

    >>> s = score_positions(q, k_cache, seq_lens, kv_heads)   # == reference.position_scores
"""
from __future__ import annotations

import contextlib
import math
import os
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..errors import DustinError
from ..scratch import zeros as scratch_zeros
from .decode import LOG2E, _sm_count, default_tile, dot_precision, plan_splits, split_range


@triton.jit
def _logits_split(Q, K, SeqLens, GroupHeads, GroupKv, Logits, TileMax, PartM, PartL, pid, split,
                  s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_lb, s_lh, s_lt, n_groups, n_heads, n_tiles, scale,
                  T: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    """Program (pid = sequence x KV group, split): its keys' logits, tile maxima and split statistics."""
    b = (pid // n_groups).to(tl.int64)  # b * batch stride can pass 2^31 elements
    grp = pid % n_groups
    L = tl.load(SeqLens + b)
    kvh = tl.load(GroupKv + grp)
    rows = tl.arange(0, BLOCK_M)
    t = rows % T
    head = tl.load(GroupHeads + grp * HG + rows // T, mask=rows < HG * T, other=-1)
    row_ok = head >= 0
    d = tl.arange(0, D)
    q = tl.load(Q + b * s_qb + head[:, None] * s_qh + t[:, None] * s_qt + d[None, :], mask=row_ok[:, None], other=0.0)
    lo, hi = split_range(L + T, split, N_SPLITS, BLOCK_N)
    k_base = K + b * s_kb + kvh * s_kh
    l_base = Logits + b * s_lb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        col_ok = offs < hi
        k = tl.load(k_base + offs[:, None] * s_ks + d[None, :], mask=col_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = col_ok[None, :] & (offs[None, :] <= L + t[:, None]) & row_ok[:, None]
        qk = tl.where(visible, qk, float("-inf"))
        m_tile = tl.max(qk, 1)
        m_tile = tl.where(m_tile == float("-inf"), 0.0, m_tile)
        tl.store(l_base + head[:, None] * s_lh + t[:, None] * s_lt + offs[None, :],
                 (qk - m_tile[:, None]).to(tl.float16), mask=row_ok[:, None] & col_ok[None, :])
        tl.store(TileMax + ((b * n_heads + head) * T + t) * n_tiles + start // BLOCK_N, m_tile, mask=row_ok)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(qk - m_safe[:, None]), 1)
        m_i = m_new
    part = ((b * n_heads + head) * T + t) * N_SPLITS + split
    tl.store(PartM + part, m_i, mask=row_ok)
    tl.store(PartL + part, l_i, mask=row_ok)


@triton.jit
def _normalize_block(Logits, TileMax, PartM, PartL, SeqLens, Out, b, pos, s_lb, s_lh, s_lt, s_ob, s_ot, S, n_tiles,
                     H: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, N_SPLITS: tl.constexpr,
                     SPLITS_P2: tl.constexpr, BLOCK_N: tl.constexpr, ACCUMULATE: tl.constexpr, SUM_T: tl.constexpr):
    """Sequence b's scores at positions `pos`: every (head, query) row of the block at once, so each row's
    statistics, logits and tile maxima load together, not in a chain of H x T dependent rounds (the
    draft's 16 rows made one such chain)."""
    L = tl.load(SeqLens + b)
    r = tl.arange(0, ROWS)  # row r: head r // T, query r % T
    t = r % T
    row_ok = r < H * T
    splits = tl.arange(0, SPLITS_P2)
    part = (b * H * T + r)[:, None] * N_SPLITS + splits[None, :]
    stats_ok = row_ok[:, None] & (splits < N_SPLITS)[None, :]
    pm = tl.load(PartM + part, mask=stats_ok, other=float("-inf"))
    m = tl.max(pm, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.load(PartL + part, mask=stats_ok, other=0.0) * tl.exp2(pm - m_safe[:, None]), 1)
    visible = row_ok[:, None] & (pos[None, :] < S) & (pos[None, :] <= L + t[:, None])
    x = tl.load(Logits + b * s_lb + (r // T)[:, None] * s_lh + t[:, None] * s_lt + pos[None, :], mask=visible,
                other=float("-inf"))
    m_tile = tl.load(TileMax + (b * H * T + r)[:, None] * n_tiles + pos[None, :] // BLOCK_N, mask=visible,
                     other=0.0)
    p = tl.where(visible, tl.exp2(x.to(tl.float32) + m_tile - m_safe[:, None]) / denom[:, None], 0.0)
    in_cache = pos < S
    if SUM_T:
        _write(Out + b * s_ob + pos, tl.sum(p, 0), in_cache, ACCUMULATE)
    else:
        for q in tl.static_range(T):
            _write(Out + b * s_ob + q * s_ot + pos, tl.sum(tl.where((t == q)[:, None], p, 0.0), 0), in_cache,
                   ACCUMULATE)


@triton.jit
def _write(ptr, x, mask, ACCUMULATE: tl.constexpr):
    if ACCUMULATE:
        x += tl.load(ptr, mask=mask, other=0.0)
    tl.store(ptr, x, mask=mask)


@triton.jit
def _logits_kernel(Q, K, SeqLens, GroupHeads, GroupKv, Logits, TileMax, PartM, PartL,
                   s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_lb, s_lh, s_lt, n_groups, n_heads, n_tiles, scale,
                   T: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    _logits_split(Q, K, SeqLens, GroupHeads, GroupKv, Logits, TileMax, PartM, PartL, tl.program_id(0),
                  tl.program_id(1), s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_lb, s_lh, s_lt, n_groups, n_heads, n_tiles,
                  scale, T, HG, D, BLOCK_M, BLOCK_N, N_SPLITS, PRECISION)


@triton.jit
def _normalize_kernel(Logits, TileMax, PartM, PartL, SeqLens, Out, s_lb, s_lh, s_lt, s_ob, s_ot, S, n_tiles,
                      H: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, N_SPLITS: tl.constexpr,
                      SPLITS_P2: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
                      ACCUMULATE: tl.constexpr, SUM_T: tl.constexpr):
    b = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    _normalize_block(Logits, TileMax, PartM, PartL, SeqLens, Out, b, pos, s_lb, s_lh, s_lt, s_ob, s_ot, S, n_tiles,
                     H, T, ROWS, N_SPLITS, SPLITS_P2, BLOCK_N, ACCUMULATE, SUM_T)


@triton.jit
def _scores_kernel(Q, K, SeqLens, GroupHeads, GroupKv, Logits, TileMax, PartM, PartL, Out, Arrived, Left,
                   s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_lb, s_lh, s_lt, s_ob, s_ot, S, n_groups, n_tiles,
                   scale, H: tl.constexpr, T: tl.constexpr, HG: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                   PRECISION: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, ACCUMULATE: tl.constexpr,
                   SUM_T: tl.constexpr):
    """Both launches in one: the logits, a wait for the sequence's other programs, then this program's
    share of the sequence's positions normalised. Every program must be resident at once (a cooperative
    launch of at most one wave), or the wait never ends."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    _logits_split(Q, K, SeqLens, GroupHeads, GroupKv, Logits, TileMax, PartM, PartL, pid, split,
                  s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_lb, s_lh, s_lt, n_groups, H, n_tiles, scale,
                  T, HG, D, BLOCK_M, BLOCK_N, N_SPLITS, PRECISION)
    b = pid // n_groups
    n = n_groups * N_SPLITS
    _sequence_barrier(Arrived + b, Left + b, n)
    me = (pid % n_groups) * N_SPLITS + split
    per = tl.cdiv(tl.cdiv(S, BLOCK_S), n)
    for blk in range(me * per, tl.minimum(me * per + per, tl.cdiv(S, BLOCK_S))):
        _normalize_block(Logits, TileMax, PartM, PartL, SeqLens, Out, b, blk * BLOCK_S + tl.arange(0, BLOCK_S),
                         s_lb, s_lh, s_lt, s_ob, s_ot, S, n_tiles, H, T, ROWS, N_SPLITS, SPLITS_P2, BLOCK_N,
                         ACCUMULATE, SUM_T)


@triton.jit
def _sequence_barrier(Arrived, Left, n):
    """Wait until all `n` programs of a sequence have arrived. Both counters are zero again once the last
    program has left, so the buffers need no clearing between launches (or CUDA-graph replays)."""
    tl.debug_barrier()  # every thread's stores are issued before this program announces itself
    tl.atomic_add(Arrived, 1, sem="release")
    seen = tl.atomic_add(Arrived, 0, sem="acquire")
    while seen < n:
        seen = tl.atomic_add(Arrived, 0, sem="acquire")
    tl.debug_barrier()
    if tl.atomic_add(Left, 1, sem="relaxed") == n - 1:  # all have passed the wait: reset for the next launch
        tl.atomic_xchg(Left, 0, sem="relaxed")
        tl.atomic_xchg(Arrived, 0, sem="release")


@lru_cache(maxsize=64)
def _groups(kv_heads: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen heads grouped by the KV head they read, as device tables made once (no copies inside a
    captured graph): `[n_groups, max heads per group]` head numbers (-1 padded) and `[n_groups]` KV heads."""
    by_kv: dict[int, list[int]] = {}
    for i, kv in enumerate(kv_heads):
        by_kv.setdefault(kv, []).append(i)
    hg = max(len(g) for g in by_kv.values())
    table = torch.tensor([g + [-1] * (hg - len(g)) for g in by_kv.values()], dtype=torch.int32, device=device)
    return table, torch.tensor(list(by_kv), dtype=torch.int32, device=device)


_one_launch = True  # what `one_launch=None` asks for (`use_one_launch`)


@contextlib.contextmanager
def use_one_launch(flag: bool):
    """Within the block, scoring called with `one_launch=None` runs in one launch where it can (True, the
    default) or in two: a benchmark compares the two side by side in whole steps."""
    global _one_launch
    saved, _one_launch = _one_launch, bool(flag)
    try:
        yield
    finally:
        _one_launch = saved


def score_positions(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, kv_heads, *,
                    out: torch.Tensor | None = None, n_splits: int | None = None, block_n: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None, sum_queries: bool = False,
                    one_launch: bool | None = None, check: bool = True) -> torch.Tensor:
    """Per query and position, the chosen heads' full-context attention probabilities summed over heads.

    q: `[B, h, T, D]` the chosen heads' queries; k_cache: `[B, Hkv, S, D]`; seq_lens: `[B]` (query `t`
    sees positions `<= seq_lens[b] + t`); kv_heads: the KV head of each chosen head (list or tensor).
    Returns `[B, T, S]` float32, zero where a query cannot see. `out` (float32 `[B, T, S]`, contiguous
    last dimension): add the scores into it instead, so that a policy sums layers without a pass of its
    own per layer. `num_warps` defaults to 8 for more than 8 rows per KV group (heads x queries: a
    draft's lookahead), else 4: so the logits launch measured faster on the H200 in isolation, 4 warps
    for one query and 8 for four. `block_n` defaults to the whole cache's tile (`decode.default_tile`),
    `num_stages` to four for 64 keys and three for more. `sum_queries`: the scores summed over the
    queries as well, `[B, 1, S]` (a draft's lookahead queries count together): the T rows are never
    written. `one_launch`: both halves in one cooperative launch (`_scores_kernel`), its splits planned
    for up to two programs per multiprocessor and never more than fit at once; None takes it where
    `use_one_launch` says (by default) and it can run (a GPU, and a Triton that has cooperative launches).
    """
    kv_heads = tuple(int(x) for x in (kv_heads.tolist() if torch.is_tensor(kv_heads) else kv_heads))
    B, H, T, D = q.shape
    S = k_cache.shape[2]
    if check:
        if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D or len(kv_heads) != H:
            raise DustinError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)} and {len(kv_heads)} KV heads "
                              "do not fit together")
        if not all(0 <= kv < k_cache.shape[1] for kv in kv_heads):
            raise DustinError(f"kv_heads {kv_heads} out of range for {k_cache.shape[1]} KV heads")
        if q.dtype != k_cache.dtype or q.device != k_cache.device or q.stride(-1) != 1 or k_cache.stride(-1) != 1:
            raise DustinError("q and k_cache need one dtype, one device and contiguous last dimensions")
        if D & (D - 1) or D < 16 or not 1 <= T <= 16 or seq_lens.shape != (B,):
            raise DustinError(f"need D a power of two >= 16, 1..16 queries and seq_lens [B]; got D={D}, T={T}")
        if int(seq_lens.max()) + T > S or int(seq_lens.min()) < 0:
            raise DustinError(f"seq_lens + {T} queries exceed the cache of {S} positions")
        shape = (B, 1 if sum_queries else T, S)
        if out is not None and (out.shape != shape or out.dtype != torch.float32 or out.device != q.device
                                or out.stride(-1) != 1):
            raise DustinError(f"out must be float32 {shape} on {q.device} with a contiguous last dimension, got "
                              f"{out.dtype} {tuple(out.shape)}")
    table, kv = _groups(kv_heads, q.device)
    n_groups, hg = table.shape
    block_m = max(16, triton.next_power_of_2(hg * T))
    num_warps = num_warps or (8 if hg * T > 8 else 4)
    # the full cache's tiles, about 16 KB of keys: measured on the H200 with one query at 32k, batch 16,
    # 64 keys four stages deep at head dim 128 (Qwen2.5-72B shape, 43.1 us, benchmarks/gpu/kernels.json);
    # 128 keys three deep at head dim 64 (Qwen2.5-0.5B shape, 28.8 us against 33.7 for 64 keys four deep
    # at the same split count, benchmarks/gpu/draft-kernels; 32 splits of 64 keys took 27.9)
    block_n = block_n or default_tile(D, False)
    num_stages = num_stages or (4 if block_n <= 64 else 3)
    if one_launch is None:
        one_launch = _one_launch and cooperative_launch_available(q.device)
    elif one_launch and not cooperative_launch_available(q.device):
        raise DustinError("one_launch needs a GPU and a Triton with cooperative launches (not the interpreter); "
                          "pass one_launch=False for two launches")
    logits = torch.empty(B, H, T, S, device=q.device, dtype=torch.float16)
    n_tiles = triton.cdiv(S, block_n)
    tile_max = torch.empty(B * H * T * n_tiles, device=q.device, dtype=torch.float32)
    accumulate = out is not None
    if out is None:
        out = torch.empty(B, 1 if sum_queries else T, S, device=q.device, dtype=torch.float32)
    rows = triton.next_power_of_2(H * T)
    block_s = max(16, min(1024, 4096 // rows))  # about 4096 probabilities per program, 32 per thread
    q_args = (q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
              logits.stride(0), logits.stride(1), logits.stride(2))
    logit_meta = dict(HG=hg, D=D, BLOCK_M=block_m, PRECISION=dot_precision(q.dtype))
    norm_meta = dict(H=H, ROWS=rows, BLOCK_S=block_s, ACCUMULATE=accumulate, SUM_T=sum_queries)
    if one_launch:
        counters = scratch_zeros("scoring barrier", q.device, 2 * B, torch.int32,
                                 hint=", or pass one_launch=False")
        meta = dict(T=T, BLOCK_N=block_n, **logit_meta, **norm_meta, num_warps=num_warps, num_stages=num_stages)
        args = lambda part_m, part_l: (  # noqa: E731
            q, k_cache, seq_lens, table, kv, logits, tile_max, part_m, part_l, out, counters, counters[B:], *q_args,
            out.stride(0), out.stride(1), S, n_groups, n_tiles, LOG2E / math.sqrt(D))
        # every program of a sequence waits for the others: the whole grid must be resident at once
        resident = _resident_programs(args(tile_max, tile_max), meta, q.device)
        if n_splits is None:
            n_splits = plan_splits(B, n_groups, S, q.device, per_sm=min(2, resident // _sm_count(q.device)))
        elif B * n_groups * n_splits > resident:
            raise DustinError(f"one_launch holds at most {resident} programs resident here, but {B} sequences x "
                              f"{n_groups} KV groups x {n_splits} splits need more; pass fewer n_splits")
        part_m, part_l = torch.empty(2, B * H * T * n_splits, device=q.device, dtype=torch.float32)
        _scores_kernel[(B * n_groups, n_splits)](*args(part_m, part_l), N_SPLITS=n_splits,
                                                 SPLITS_P2=triton.next_power_of_2(n_splits), **meta,
                                                 launch_cooperative_grid=True)
        return out
    # a power of two: the merge kernel loads the splits' statistics as one vector
    n_splits = triton.next_power_of_2(n_splits or plan_splits(B, n_groups, S, q.device, per_sm=1, round_up=True))
    part_m, part_l = torch.empty(2, B * H * T * n_splits, device=q.device, dtype=torch.float32)
    _logits_kernel[(B * n_groups, n_splits)](
        q, k_cache, seq_lens, table, kv, logits, tile_max, part_m, part_l, *q_args, n_groups, H, n_tiles,
        LOG2E / math.sqrt(D), T=T, BLOCK_N=block_n, N_SPLITS=n_splits, **logit_meta, num_warps=num_warps,
        num_stages=num_stages)
    _normalize_kernel[(B, triton.cdiv(S, block_s))](
        logits, tile_max, part_m, part_l, seq_lens, out, logits.stride(0), logits.stride(1), logits.stride(2),
        out.stride(0), out.stride(1), S, n_tiles, T=T, BLOCK_N=block_n, N_SPLITS=n_splits, SPLITS_P2=n_splits,
        **norm_meta, num_warps=4)
    return out


_RESIDENT: dict[tuple, int] = {}


def _resident_programs(args: tuple, meta: dict, device: torch.device) -> int:
    """How many programs of `_scores_kernel` with these constants the GPU holds at once: the tightest of
    its threads, registers and shared memory per multiprocessor, times the multiprocessors."""
    key = (device, args[0].dtype, tuple(sorted(meta.items())))
    if key not in _RESIDENT:
        # the split count only sizes a vector of statistics: compile with the most a plan takes
        kernel = _scores_kernel.warmup(*args, grid=(1,), N_SPLITS=32, SPLITS_P2=32, **meta,
                                       launch_cooperative_grid=True)
        kernel._init_handles()
        props = torch.cuda.get_device_properties(device)
        warps = meta["num_warps"]
        regs_per_warp = -(-kernel.n_regs * 32 // 256) * 256  # allocated per warp, 256 at a time
        per_sm = min(props.max_threads_per_multi_processor // (32 * warps), 32,
                     props.regs_per_multiprocessor // (regs_per_warp * warps),
                     props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024))
        _RESIDENT[key] = per_sm * props.multi_processor_count
    return _RESIDENT[key]


@lru_cache(maxsize=None)
def cooperative_launch_available(device: torch.device | str) -> bool:
    """A GPU, compiled kernels (the interpreter runs programs one after another: a wait for the others
    would never end), and a Triton that knows the launch option."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    from triton.backends.nvidia.compiler import CUDAOptions

    return "launch_cooperative_grid" in getattr(CUDAOptions, "__dataclass_fields__", {})
