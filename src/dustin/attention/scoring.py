"""Triton: full-context attention probabilities of a few chosen heads, summed to one score per position.

Two launches, for the chosen heads of one layer (`score_positions`) or of several (`score_layers`, the
heads of every scoring layer in the same two launches). The first reads each needed key once: a
program owns one (sequence, layer and KV head) and a split of the positions, its tile rows are the
chosen heads of that KV group times the queries; it writes the scaled logits and per-split softmax
statistics. The second merges the statistics and writes `sum_heads softmax(logits)` per query and
position, or summed over the queries too. Reference: `reference.position_scores`, summed over layers.

The logits make a round trip through memory, so they travel as float16 relative to their tile's row
maximum (plus one float32 maximum per tile and row): half the bytes of float32, and exact to 2^-11
relative where it matters, near each maximum.

    >>> s = score_positions(q, k_cache, seq_lens, kv_heads)   # == reference.position_scores
    >>> s = score_layers([q0, q1], cache.k, [3, 4], seq_lens, [kv0, kv1])  # == the sum over both layers
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

from .. import pdl
from ..errors import DustinError
from ..pdl import wait_for_inputs
from .decode import LOG2E, dot_precision, plan_splits, split_range


@triton.jit
def _logits_kernel(Q, K, SeqLens, GroupHeads, GroupLayer, GroupKv, Logits, TileMax, PartM, PartL,
                   s_qb, s_qh, s_qt, s_kl, s_kb, s_kh, s_ks, s_lb, s_lh, s_lt, n_groups, n_heads, n_tiles, scale,
                   T: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // n_groups).to(tl.int64)  # b * batch stride can pass 2^31 elements
    grp = pid % n_groups
    # the group tables are made once and never written: they load before the wait
    layer = tl.load(GroupLayer + grp).to(tl.int64)
    kvh = tl.load(GroupKv + grp)
    rows = tl.arange(0, BLOCK_M)
    t = rows % T
    head = tl.load(GroupHeads + grp * HG + rows // T, mask=rows < HG * T, other=-1)
    row_ok = head >= 0
    wait_for_inputs(PDL)
    L = tl.load(SeqLens + b)
    d = tl.arange(0, D)
    q = tl.load(Q + b * s_qb + head[:, None] * s_qh + t[:, None] * s_qt + d[None, :], mask=row_ok[:, None], other=0.0)
    lo, hi = split_range(L + T, split, N_SPLITS, BLOCK_N)
    # offsets as multiples of the strides: the compiler keeps their alignment and vectorises the loads
    k_base = K + layer * s_kl + b * s_kb + kvh * s_kh
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
                      H: tl.constexpr, T: tl.constexpr, N_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_N: tl.constexpr, SUM_T: tl.constexpr, ACCUMULATE: tl.constexpr, PDL: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    wait_for_inputs(PDL)
    L = tl.load(SeqLens + b)
    pos = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    in_cache = pos < S
    splits = tl.arange(0, N_SPLITS)
    summed = tl.zeros([BLOCK_S], tl.float32)
    for t in tl.static_range(T):
        total = tl.zeros([BLOCK_S], tl.float32)
        visible = in_cache & (pos <= L + t)
        for h in tl.static_range(H):
            part = ((b * H + h) * T + t) * N_SPLITS + splits
            pm = tl.load(PartM + part)
            m = tl.max(pm, 0)
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            denom = tl.sum(tl.load(PartL + part) * tl.exp2(pm - m_safe), 0)
            x = tl.load(Logits + b * s_lb + h * s_lh + t * s_lt + pos, mask=visible, other=float("-inf"))
            m_tile = tl.load(TileMax + ((b * H + h) * T + t) * n_tiles + pos // BLOCK_N, mask=visible, other=0.0)
            total += tl.exp2(x.to(tl.float32) + m_tile - m_safe) / denom
        total = tl.where(visible, total, 0.0)
        if SUM_T:
            summed += total
        else:
            _write(Out + b * s_ob + t * s_ot + pos, total, in_cache, ACCUMULATE)
    if SUM_T:
        _write(Out + b * s_ob + pos, summed, in_cache, ACCUMULATE)


@triton.jit
def _write(ptr, x, mask, ACCUMULATE: tl.constexpr):
    if ACCUMULATE:
        x += tl.load(ptr, mask=mask, other=0.0)
    tl.store(ptr, x, mask=mask)


@lru_cache(maxsize=64)
def _groups(keys: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Chosen heads grouped by the keys they read (`keys[i]`: head i's layer and KV head), as device
    tables made once (no copies inside a captured graph): `[n_groups, max heads per group]` head numbers
    (-1 padded), and `[n_groups]` layers and KV heads."""
    by_kv: dict[tuple[int, int], list[int]] = {}
    for i, key in enumerate(keys):
        by_kv.setdefault(key, []).append(i)
    hg = max(len(g) for g in by_kv.values())
    table = torch.tensor([g + [-1] * (hg - len(g)) for g in by_kv.values()], dtype=torch.int32, device=device)
    layers, kvs = zip(*by_kv)
    return (table, torch.tensor(layers, dtype=torch.int32, device=device),
            torch.tensor(kvs, dtype=torch.int32, device=device))


def _as_ints(heads) -> list[int]:
    return [int(x) for x in (heads.tolist() if torch.is_tensor(heads) else heads)]


def _check_out(out, shape, device) -> None:
    if out is not None and (out.shape != shape or out.dtype != torch.float32 or out.device != device
                            or out.stride(-1) != 1):
        raise DustinError(f"out must be float32 {shape} on {device} with a contiguous last dimension, got "
                          f"{out.dtype} {tuple(out.shape)}")


def _check_queries(q, k_cache, seq_lens, kv_heads, n_kv) -> None:
    B, H, T, D = q.shape
    if k_cache.shape[-4] != B or k_cache.shape[-1] != D or len(kv_heads) != H:
        raise DustinError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)} and {len(kv_heads)} KV heads "
                          "do not fit together")
    if not all(0 <= kv < n_kv for kv in kv_heads):
        raise DustinError(f"kv_heads {kv_heads} out of range for {n_kv} KV heads")
    if q.dtype != k_cache.dtype or q.device != k_cache.device or q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise DustinError("q and k_cache need one dtype, one device and contiguous last dimensions")
    if D & (D - 1) or D < 16 or not 1 <= T <= 16 or seq_lens.shape != (B,):
        raise DustinError(f"need D a power of two >= 16, 1..16 queries and seq_lens [B]; got D={D}, T={T}")
    if int(seq_lens.max()) + T > k_cache.shape[-2] or int(seq_lens.min()) < 0:
        raise DustinError(f"seq_lens + {T} queries exceed the cache of {k_cache.shape[-2]} positions")


def score_positions(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, kv_heads, *,
                    out: torch.Tensor | None = None, sum_queries: bool = False, n_splits: int | None = None,
                    block_n: int | None = None, num_warps: int | None = None, num_stages: int = 4,
                    check: bool = True) -> torch.Tensor:
    """Per query and position, the chosen heads' full-context attention probabilities summed over heads.

    q: `[B, h, T, D]` the chosen heads' queries; k_cache: `[B, Hkv, S, D]`; seq_lens: `[B]` (query `t`
    sees positions `<= seq_lens[b] + t`); kv_heads: the KV head of each chosen head (list or tensor).
    Returns `[B, T, S]` float32, zero where a query cannot see, or `[B, S]` summed over the queries
    with `sum_queries`. `out` (float32, that shape, contiguous last dimension): add the scores into it
    instead. `num_warps` defaults to 8 for more than 8 rows per KV group (heads x queries: a draft's
    lookahead), else 4: so the logits launch measured faster on the H200 in isolation, 4 warps for one
    query and 8 for four.
    """
    kv_heads = _as_ints(kv_heads)
    if check:
        if k_cache.dim() != 4:
            raise DustinError(f"k_cache must be [B, Hkv, S, D], got {tuple(k_cache.shape)}")
        _check_queries(q, k_cache, seq_lens, kv_heads, k_cache.shape[1])
    return _launch(q, k_cache, (0, *k_cache.stride()[:3]), k_cache.shape[2], tuple((0, kv) for kv in kv_heads),
                   seq_lens, out=out,
                   sum_queries=sum_queries, n_splits=n_splits, block_n=block_n, num_warps=num_warps,
                   num_stages=num_stages, check=check)


def score_layers(qs: list[torch.Tensor], k: torch.Tensor, layers: list[int], seq_lens: torch.Tensor, kv_heads, *,
                 out: torch.Tensor | None = None, sum_queries: bool = False, check: bool = True) -> torch.Tensor:
    """`score_positions` over the chosen heads of several layers at once, summed over the layers too.

    qs: per layer `[B, h_l, T, D]`; k: the whole cache `[n_layers, B, Hkv, S, D]`; layers: the layer of
    each entry of `qs`; kv_heads: per layer, the KV head of each of its chosen heads. Returns `[B, T, S]`
    (`[B, S]` with `sum_queries`); `out` as in `score_positions`. One launch pair reads every chosen
    layer's keys, where a call per layer would cost a pair each.
    """
    kv_heads = [_as_ints(h) for h in kv_heads]
    if check:
        if k.dim() != 5 or not len(qs) == len(layers) == len(kv_heads) or not qs:
            raise DustinError(f"need the cache [n_layers, B, Hkv, S, D] and one q and KV head list per layer; got "
                              f"{tuple(k.shape)}, {len(qs)} q, {len(layers)} layers, {len(kv_heads)} head lists")
        if not all(0 <= layer < k.shape[0] for layer in layers) or len(set(layers)) != len(layers):
            raise DustinError(f"layers {list(layers)} must be distinct and below {k.shape[0]}")
        if any(q.shape[0] != qs[0].shape[0] or q.shape[2:] != qs[0].shape[2:] for q in qs):
            raise DustinError(f"every layer's q needs one [B, *, T, D] shape, got {[tuple(q.shape) for q in qs]}")
        for q, heads in zip(qs, kv_heads):
            _check_queries(q, k, seq_lens, heads, k.shape[2])
    keys = tuple((layer, kv) for layer, heads in zip(layers, kv_heads) for kv in heads)
    q = qs[0] if len(qs) == 1 else torch.cat(qs, 1)
    return _launch(q, k, k.stride()[:4], k.shape[3], keys, seq_lens, out=out, sum_queries=sum_queries, check=check)


def _launch(q, K, strides, S, keys, seq_lens, *, out, sum_queries, check, n_splits=None, block_n=None,
            num_warps=None, num_stages=4) -> torch.Tensor:
    """The two launches over cache `K` (`strides`: of its layer, batch, KV head and position; `S`
    positions), each chosen head `i` of `q` reading the keys of layer and KV head `keys[i]`."""
    B, H, T, D = q.shape
    if check:
        _check_out(out, (B, S) if sum_queries else (B, T, S), q.device)
    table, layer_of, kv_of = _groups(keys, q.device)
    n_groups, hg = table.shape
    block_m = max(16, triton.next_power_of_2(hg * T))
    num_warps = num_warps or (8 if hg * T > 8 else 4)
    # a power of two: the merge kernel loads the splits' statistics as one vector
    # one program per SM and 64-key tiles four deep measured best on the H200 (benchmarks/gpu/kernels.json)
    n_splits = triton.next_power_of_2(n_splits or plan_splits(B, n_groups, S, q.device, per_sm=1))
    block_n = block_n or 64
    logits = torch.empty(B, H, T, S, device=q.device, dtype=torch.float16)
    n_tiles = triton.cdiv(S, block_n)
    tile_max = torch.empty(B * H * T * n_tiles, device=q.device, dtype=torch.float32)
    part_m = torch.empty(B * H * T * n_splits, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    _logits_kernel[(B * n_groups, n_splits)](
        q, K, seq_lens, table, layer_of, kv_of, logits, tile_max, part_m, part_l,
        q.stride(0), q.stride(1), q.stride(2), *strides,
        logits.stride(0), logits.stride(1), logits.stride(2), n_groups, H, n_tiles, LOG2E / math.sqrt(D),
        T=T, HG=hg, D=D, BLOCK_M=block_m, BLOCK_N=block_n, N_SPLITS=n_splits, PRECISION=dot_precision(q.dtype),
        **pdl.options(q.device), num_warps=num_warps, num_stages=num_stages)
    accumulate = out is not None
    if out is None:
        out = torch.empty((B, S) if sum_queries else (B, T, S), device=q.device, dtype=torch.float32)
    block_s = 1024
    _normalize_kernel[(B, triton.cdiv(S, block_s))](
        logits, tile_max, part_m, part_l, seq_lens, out, logits.stride(0), logits.stride(1), logits.stride(2),
        out.stride(0), 0 if sum_queries else out.stride(1), S, n_tiles, H=H, T=T, N_SPLITS=n_splits,
        BLOCK_S=block_s, BLOCK_N=block_n, SUM_T=sum_queries, ACCUMULATE=accumulate, **pdl.options(q.device),
        num_warps=4)
    return out
