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

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from ..errors import DustinError
from .decode import LOG2E, default_tile, dot_precision, plan_splits, split_range


@triton.jit
def _logits_kernel(Q, K, SeqLens, GroupHeads, GroupKv, Logits, TileMax, PartM, PartL,
                   s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_lb, s_lh, s_lt, n_groups, n_heads, n_tiles, scale,
                   T: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
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
def _normalize_kernel(Logits, TileMax, PartM, PartL, SeqLens, Out, s_lb, s_lh, s_lt, s_ob, s_ot, S, n_tiles,
                      H: tl.constexpr, T: tl.constexpr, ROWS: tl.constexpr, N_SPLITS: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, ACCUMULATE: tl.constexpr, SUM_T: tl.constexpr):
    # every (head, query) row of the block at once: each row's statistics, logits and tile maxima are
    # loaded together, not in a chain of H x T dependent rounds (the draft's 16 rows made one such chain)
    b = tl.program_id(0)
    blk = tl.program_id(1)
    L = tl.load(SeqLens + b)
    pos = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    r = tl.arange(0, ROWS)  # row r: head r // T, query r % T
    t = r % T
    row_ok = r < H * T
    splits = tl.arange(0, N_SPLITS)
    part = (b * H * T + r)[:, None] * N_SPLITS + splits[None, :]
    pm = tl.load(PartM + part, mask=row_ok[:, None], other=0.0)
    m = tl.max(pm, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.load(PartL + part, mask=row_ok[:, None], other=1.0) * tl.exp2(pm - m_safe[:, None]), 1)
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


def score_positions(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, kv_heads, *,
                    out: torch.Tensor | None = None, n_splits: int | None = None, block_n: int | None = None,
                    num_warps: int | None = None, num_stages: int | None = None, sum_queries: bool = False,
                    check: bool = True) -> torch.Tensor:
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
    written.
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
    # a power of two: the merge kernel loads the splits' statistics as one vector
    splits = n_splits or plan_splits(B, n_groups, S, q.device, per_sm=1, round_up=True)
    n_splits = triton.next_power_of_2(splits)
    # the full cache's tiles, about 16 KB of keys: measured on the H200 with one query at 32k, batch 16,
    # 64 keys four stages deep at head dim 128 (Qwen2.5-72B shape, 44.1 us, benchmarks/gpu/kernels.json);
    # 128 keys three deep at head dim 64 (Qwen2.5-0.5B shape, 28.9 us against 32.7 for 64 keys four deep
    # at the same split count, benchmarks/gpu/draft-kernels; 32 splits of 64 keys took 28.3)
    block_n = block_n or default_tile(D, False)
    num_stages = num_stages or (4 if block_n <= 64 else 3)
    logits = torch.empty(B, H, T, S, device=q.device, dtype=torch.float16)
    n_tiles = triton.cdiv(S, block_n)
    tile_max = torch.empty(B * H * T * n_tiles, device=q.device, dtype=torch.float32)
    part_m = torch.empty(B * H * T * n_splits, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    _logits_kernel[(B * n_groups, n_splits)](
        q, k_cache, seq_lens, table, kv, logits, tile_max, part_m, part_l,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        logits.stride(0), logits.stride(1), logits.stride(2), n_groups, H, n_tiles, LOG2E / math.sqrt(D),
        T=T, HG=hg, D=D, BLOCK_M=block_m, BLOCK_N=block_n, N_SPLITS=n_splits, PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages)
    accumulate = out is not None
    if out is None:
        out = torch.empty(B, 1 if sum_queries else T, S, device=q.device, dtype=torch.float32)
    rows = triton.next_power_of_2(H * T)
    block_s = max(16, min(1024, 4096 // rows))  # about 4096 probabilities per program, 32 per thread
    _normalize_kernel[(B, triton.cdiv(S, block_s))](
        logits, tile_max, part_m, part_l, seq_lens, out, logits.stride(0), logits.stride(1), logits.stride(2),
        out.stride(0), out.stride(1), S, n_tiles, H=H, T=T, ROWS=rows, N_SPLITS=n_splits, BLOCK_S=block_s,
        BLOCK_N=block_n, ACCUMULATE=accumulate, SUM_T=sum_queries, num_warps=4)
    return out
