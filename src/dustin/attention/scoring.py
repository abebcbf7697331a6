"""Triton: full-context attention probabilities of a few chosen heads, summed to one score per position.

One launch, two kinds of program. Logits programs read each needed key once: one owns a (sequence, KV
head) and a split of the positions, its tile rows are the chosen heads of that KV group times the
queries; it writes the scaled logits and the split's softmax statistics, and the last of a sequence to
finish merges the statistics. Normalisers, later in the grid, each wait for their sequence and write
`sum_heads softmax(logits)` per query over a range of positions, while other sequences' logits are still
being read (a second launch would wait for all of them, and cost a launch). Reference:
`reference.position_scores`.

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
from .decode import LOG2E, dot_precision, plan_splits, semaphores, split_range


@triton.jit
def _score_kernel(Q, K, SeqLens, GroupHeads, GroupKv, Logits, TileMax, PartM, PartL, Final, Counter, Out,
                  s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_lb, s_lh, s_lt, s_ob, s_ot,
                  B, n_groups, n_tiles, S, per_norm, pid0, scale,
                  H: tl.constexpr, T: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, N_NORM: tl.constexpr, BLOCK_S: tl.constexpr,
                  HT: tl.constexpr, WAIT: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0) + pid0
    n_logit = B * n_groups * N_SPLITS
    if pid < n_logit:
        # a logits program: one (sequence, KV group, split of the positions)
        b = pid // (n_groups * N_SPLITS)
        grp = (pid // N_SPLITS) % n_groups
        _logits(Q, K, SeqLens, GroupHeads, GroupKv, Logits, TileMax, PartM, PartL, b.to(tl.int64), grp,
                pid % N_SPLITS, s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_lb, s_lh, s_lt, n_tiles, scale,
                H, T, HG, D, BLOCK_M, BLOCK_N, N_SPLITS, PRECISION)
        tl.debug_barrier()
        done = tl.atomic_add(Counter + b, 1, sem="acq_rel", scope="gpu")
        if done == n_groups * N_SPLITS - 1:
            # the last logits program of its sequence merges the splits' statistics once for all normalisers
            _final_stats(PartM, PartL, Final, b, H, T, N_SPLITS, HT)
            tl.debug_barrier()
            tl.atomic_add(Counter + b, 1, sem="release", scope="gpu")
    else:
        # a normaliser: one (sequence, range of positions), after all of that sequence's logits
        b = (pid - n_logit) // N_NORM
        if WAIT:
            # launched in the same grid: it is dispatched after every logits program (programs start in
            # grid order), so waiting here for its sequence cannot block them
            while tl.load(Counter + b, volatile=True) < n_groups * N_SPLITS + 1:
                pass
            tl.atomic_add(Counter + b, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()
        lo = ((pid - n_logit) % N_NORM) * per_norm
        _normalize(Logits, TileMax, Final, SeqLens, Out, b.to(tl.int64), lo, tl.minimum(lo + per_norm, S),
                   s_lb, s_lh, s_lt, s_ob, s_ot, n_tiles, H, T, BLOCK_S, BLOCK_N)
        tl.debug_barrier()
        if tl.atomic_add(Counter + B + b, 1, sem="acq_rel", scope="gpu") == N_NORM - 1:
            tl.atomic_xchg(Counter + b, 0)  # ready for the next launch
            tl.atomic_xchg(Counter + B + b, 0)


@triton.jit
def _logits(Q, K, SeqLens, GroupHeads, GroupKv, Logits, TileMax, PartM, PartL, b, grp, split,
            s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_lb, s_lh, s_lt, n_tiles, scale,
            H: tl.constexpr, T: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, N_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    """Scaled logits of the group's chosen heads over one split of the positions, as float16 relative to
    each tile's row maximum, and the split's softmax statistics."""
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
        tl.store(TileMax + ((b * H + head) * T + t) * n_tiles + start // BLOCK_N, m_tile, mask=row_ok)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(qk - m_safe[:, None]), 1)
        m_i = m_new
    part = ((b * H + head) * T + t) * N_SPLITS + split
    tl.store(PartM + part, m_i, mask=row_ok)
    tl.store(PartL + part, l_i, mask=row_ok)


@triton.jit
def _final_stats(PartM, PartL, Final, b, H: tl.constexpr, T: tl.constexpr, N_SPLITS: tl.constexpr,
                 HT: tl.constexpr):
    """Each (head, query)'s maximum and softmax denominator over all splits: `Final[b, h, t] = (m, l)`."""
    ht = tl.arange(0, HT)
    ok = ht < H * T
    part = (b * H * T + ht)[:, None] * N_SPLITS + tl.arange(0, N_SPLITS)[None, :]
    pm = tl.load(PartM + part, mask=ok[:, None], other=float("-inf"), volatile=True)
    m = tl.max(pm, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.load(PartL + part, mask=ok[:, None], other=0.0, volatile=True) * tl.exp2(pm - m_safe[:, None]), 1)
    tl.store(Final + (b * H * T + ht) * 2, m_safe, mask=ok)
    tl.store(Final + (b * H * T + ht) * 2 + 1, denom, mask=ok)


@triton.jit
def _normalize(Logits, TileMax, Final, SeqLens, Out, b, lo, hi, s_lb, s_lh, s_lt, s_ob, s_ot, n_tiles,
               H: tl.constexpr, T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """`Out[b, t, lo:hi] = sum_h softmax_h`, zero where query `t` cannot see."""
    L = tl.load(SeqLens + b)
    for start in range(lo, hi, BLOCK_S):
        pos = start + tl.arange(0, BLOCK_S)
        in_range = pos < hi
        for t in tl.static_range(T):
            total = tl.zeros([BLOCK_S], tl.float32)
            visible = in_range & (pos <= L + t)
            for h in tl.static_range(H):
                m = tl.load(Final + ((b * H + h) * T + t) * 2, volatile=True)
                denom = tl.load(Final + ((b * H + h) * T + t) * 2 + 1, volatile=True)
                x = tl.load(Logits + b * s_lb + h * s_lh + t * s_lt + pos, mask=visible, other=float("-inf"),
                            volatile=True)
                m_tile = tl.load(TileMax + ((b * H + h) * T + t) * n_tiles + pos // BLOCK_N, mask=visible,
                                 other=0.0, volatile=True)
                total += tl.exp2(x.to(tl.float32) + m_tile - m) / denom
            tl.store(Out + b * s_ob + t * s_ot + pos, tl.where(visible, total, 0.0), mask=in_range)


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
                    n_splits: int | None = None, block_n: int | None = None, num_warps: int = 4,
                    num_stages: int = 4, one_launch: bool = True, norm_positions: int = 4096,
                    check: bool = True) -> torch.Tensor:
    """Per query and position, the chosen heads' full-context attention probabilities summed over heads.

    q: `[B, h, T, D]` the chosen heads' queries; k_cache: `[B, Hkv, S, D]`; seq_lens: `[B]` (query `t`
    sees positions `<= seq_lens[b] + t`); kv_heads: the KV head of each chosen head (list or tensor).
    Returns `[B, T, S]` float32, zero where a query cannot see. `one_launch` puts the normalisers in
    the logits kernel's grid (each waits for its sequence's logits) instead of a second launch;
    `norm_positions`: about how many positions each normaliser writes.
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
    table, kv = _groups(kv_heads, q.device)
    n_groups, hg = table.shape
    block_m = max(16, triton.next_power_of_2(hg * T))
    # a power of two: the statistics of a (head, query) load as one vector
    # one program per SM and 64-key tiles four deep measured best on the H200 (benchmarks/gpu/kernels.json)
    n_splits = triton.next_power_of_2(n_splits or plan_splits(B, n_groups, S, q.device, per_sm=1))
    block_n = block_n or 64
    logits = torch.empty(B, H, T, S, device=q.device, dtype=torch.float16)
    n_tiles = triton.cdiv(S, block_n)
    tile_max = torch.empty(B * H * T * n_tiles, device=q.device, dtype=torch.float32)
    part_m = torch.empty(B * H * T * n_splits, device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    final = torch.empty(B * H * T * 2, device=q.device, dtype=torch.float32)
    out = torch.empty(B, T, S, device=q.device, dtype=torch.float32)
    block_s = min(1024, triton.next_power_of_2(max(norm_positions, 16)))
    per_norm = triton.cdiv(min(S, norm_positions), block_s) * block_s  # positions per normaliser
    n_norm = triton.cdiv(S, per_norm)
    n_logit = B * n_groups * n_splits
    counter = semaphores(q.device, 2 * B)

    def launch(n_programs: int, pid0: int, wait: bool) -> None:
        _score_kernel[(n_programs,)](
            q, k_cache, seq_lens, table, kv, logits, tile_max, part_m, part_l, final, counter, out,
            q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            logits.stride(0), logits.stride(1), logits.stride(2), out.stride(0), out.stride(1),
            B, n_groups, n_tiles, S, per_norm, pid0, LOG2E / math.sqrt(D),
            H=H, T=T, HG=hg, D=D, BLOCK_M=block_m, BLOCK_N=block_n, N_SPLITS=n_splits, N_NORM=n_norm,
            BLOCK_S=block_s, HT=triton.next_power_of_2(H * T), WAIT=wait, PRECISION=dot_precision(q.dtype),
            num_warps=num_warps, num_stages=num_stages)

    if one_launch:
        launch(n_logit + B * n_norm, 0, True)
    else:
        launch(n_logit, 0, False)
        launch(B * n_norm, n_logit, False)
    return out
