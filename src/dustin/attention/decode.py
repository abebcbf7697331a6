"""Triton: attention of `T = gamma + 1` new queries per sequence over its whole cache or over an index set.

One kernel serves both cases. A program owns one (sequence, KV head) and one split of the keys it
reads; the rows of its tile are all query heads of the KV group times all new tokens, so every key and
value is read once for the whole group (`head_splits` can share a group among programs instead).
Splits (flash-decoding) fill the GPU at small batch; the last split to finish merges them, or a second
small kernel does. An index set is read in whole tiles and the new tokens as one small tile of their
own. References: `reference.dense_attention`, `reference.sparse_attention`.

    >>> out = decode_attention(q, k_cache, v_cache, seq_lens)            # == reference.dense_attention
    >>> out = sparse_attention(q, k_cache, v_cache, seq_lens, indices)   # == reference.sparse_attention
"""
from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .. import pdl, scratch
from ..errors import DustinError
from ..pdl import wait_for_inputs

LOG2E = 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get float32 products (Triton's default on the GPU would be TF32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def split_range(n_keys, split, N_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys `[lo, hi)` of split `split` of `N_SPLITS`, in whole tiles of `BLOCK_N`."""
    per = tl.cdiv(tl.cdiv(n_keys, N_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * per
    return lo, tl.minimum(lo + per, n_keys)


@triton.jit
def _unit(pid, n_kv_heads, T: tl.constexpr, G: tl.constexpr, GP: tl.constexpr):
    """Program `pid`'s sequence, KV head, first query head and rows (its `GP` of the group's `G` heads x `T`)."""
    per_b = n_kv_heads * tl.cdiv(G, GP)
    b = (pid // per_b).to(tl.int64)  # b * batch stride passes 2^31 elements at 128k x 16 x 8 x 128
    h = (pid % per_b) // tl.cdiv(G, GP)
    first = (pid % tl.cdiv(G, GP)) * GP
    return b, h, h * G + first, tl.minimum(GP, G - first) * T


@triton.jit
def _softmax_tile(q, k, visible, m_i, l_i, scale, PRECISION: tl.constexpr):
    """Online softmax over keys `k` (`[N, D]`): the tile's probabilities under the new running max, the
    factor that rescales what came before, and the new running max and sum."""
    qk = tl.where(visible, tl.dot(q, tl.trans(k), input_precision=PRECISION), float("-inf"))
    # the scale rides in the exponent's multiply-add (scale > 0, so it commutes with the max): one
    # instruction less per score in a kernel that is bound by its instruction chain at small budgets
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(qk * scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _online_tile(q, k, v, visible, m_i, l_i, acc, scale, PRECISION: tl.constexpr):
    """One tile of online softmax: fold keys `k` / values `v` (`[N, D]`) into the running max, sum and output."""
    p, alpha, m_i, l_i = _softmax_tile(q, k, visible, m_i, l_i, scale, PRECISION)
    return m_i, l_i, acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)


@triton.jit
def _attn_kernel(Q, K, V, SeqLens, Idx, Out, PartO, PartLse, Counter, Cos, Sin, Pos,
                 s_qb, s_qh, s_qt, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_ib, s_ih, s_ob, s_oh, s_ot, s_cb, s_ct,
                 n_kv_heads, n_budget, n_cache, scale,
                 T: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, N_SPLITS: tl.constexpr, SPARSE: tl.constexpr,
                 FUSE_COMBINE: tl.constexpr, PREFETCH: tl.constexpr, EARLY: tl.constexpr, ROPE: tl.constexpr,
                 PRECISION: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)  # one (sequence, KV head, group of GP query heads of it)
    split = tl.program_id(1)
    b, h, head0, n_rows = _unit(pid, n_kv_heads, T, G, GP)
    d = tl.arange(0, D)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    if SPARSE:
        # the index set in whole tiles split evenly; the T new tokens are one small tile of the last split,
        # so a 512-entry set with 5 new tokens is 8 tiles of 64, not 9
        lo, hi = split_range(n_budget, split, N_SPLITS, BLOCK_N)
        idx_ptr = Idx + b * s_ib + h * s_ih
    if EARLY:
        # the lengths, the index set and the cache below the lengths are older than the kernel before
        # this one (`dustin.pdl`): gather the first tile while that kernel finishes, and wait only for q
        L = tl.load(SeqLens + b)
        first = lo + tl.arange(0, BLOCK_N)
        idx0 = tl.load(idx_ptr + first, mask=first < hi, other=-1)
        ok0 = (idx0 >= 0) & (idx0 < L)
        k0 = tl.load(k_base + idx0[:, None] * s_ks + d[None, :], mask=ok0[:, None], other=0.0)
        v0 = tl.load(v_base + idx0[:, None] * s_vs + d[None, :], mask=ok0[:, None], other=0.0)
    wait_for_inputs(PDL)
    if not EARLY:
        L = tl.load(SeqLens + b)
    rows = tl.arange(0, BLOCK_M)
    t = rows % T
    row_ok = rows < n_rows
    q_rows = Q + b * s_qb + (head0 + rows // T)[:, None] * s_qh + t[:, None] * s_qt
    if ROPE:  # Q is the fused q/k/v projection `[B, T, (Hq + 2 Hkv) D]`: rotate q as it loads
        q = _rotate(q_rows, Cos + b * s_cb + t[:, None] * s_ct, Sin + b * s_cb + t[:, None] * s_ct, d,
                    row_ok[:, None], D).to(K.dtype.element_ty)
    else:
        q = tl.load(q_rows + d[None, :], mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if SPARSE:
        if EARLY:
            lo += BLOCK_N  # the loop below starts after the gathered first tile
        if PREFETCH:  # gathered reads are latency-bound: fetch each tile's positions one tile ahead
            first = lo + tl.arange(0, BLOCK_N)
            idx_next = tl.load(idx_ptr + first, mask=first < hi, other=-1)
        # the new tokens are loaded here and folded in after the index set: their loads overlap the
        # first tiles' gathers and nothing waits on them; other splits load nothing
        n_new = tl.where(split == N_SPLITS - 1, T, 0)
        j = tl.arange(0, BLOCK_T)
        # padding rows of a ragged prefill chunk may reach past the cache: never read there
        new_ok = (j < n_new) & (L + j < n_cache)
        if ROPE:
            # this program rotates its KV head's new keys, writes them and the values into the cache
            # and attends to them from registers (the index set never holds positions >= L); with
            # head_splits > 1 each program of the group writes the same values
            real = (j < n_new)[:, None]
            new_rows = Q + b * s_qb + j[:, None] * s_qt
            cs = b * s_cb + j[:, None] * s_ct
            k_new = _rotate(new_rows + (n_kv_heads * G + h) * s_qh, Cos + cs, Sin + cs, d, real,
                            D).to(K.dtype.element_ty)
            v_new = tl.load(new_rows + (n_kv_heads * (G + 1) + h) * s_qh + d[None, :], mask=real, other=0.0)
            pos = tl.load(Pos + b * T + j, mask=j < n_new, other=0)
            tl.store(k_base + pos[:, None] * s_ks + d[None, :], k_new, mask=real)
            tl.store(v_base + pos[:, None] * s_vs + d[None, :], v_new, mask=real)
        else:
            k_new = tl.load(k_base + (L + j)[:, None] * s_ks + d[None, :], mask=new_ok[:, None], other=0.0)
            v_new = tl.load(v_base + (L + j)[:, None] * s_vs + d[None, :], mask=new_ok[:, None], other=0.0)
        if EARLY:
            m_i, l_i, acc = _online_tile(q, k0, v0, ok0[None, :], m_i, l_i, acc, scale, PRECISION)
        for start in range(lo, hi, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            if PREFETCH:
                idx = idx_next
                ahead = offs + BLOCK_N
                idx_next = tl.load(idx_ptr + ahead, mask=ahead < hi, other=-1)
            else:
                idx = tl.load(idx_ptr + offs, mask=offs < hi, other=-1)
            col_ok = (idx >= 0) & (idx < L)
            k = tl.load(k_base + idx[:, None] * s_ks + d[None, :], mask=col_ok[:, None], other=0.0)
            v = tl.load(v_base + idx[:, None] * s_vs + d[None, :], mask=col_ok[:, None], other=0.0)
            m_i, l_i, acc = _online_tile(q, k, v, col_ok[None, :], m_i, l_i, acc, scale, PRECISION)
        if split == N_SPLITS - 1:
            visible = new_ok[None, :] & (j[None, :] <= t[:, None])
            m_i, l_i, acc = _online_tile(q, k_new, v_new, visible, m_i, l_i, acc, scale, PRECISION)
    else:
        lo, hi = split_range(tl.minimum(L + T, n_cache), split, N_SPLITS, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            col_ok = pos < hi
            k = tl.load(k_base + pos[:, None] * s_ks + d[None, :], mask=col_ok[:, None], other=0.0)
            visible = col_ok[None, :] & (pos[None, :] <= L + t[:, None])
            p, alpha, m_i, l_i = _softmax_tile(q, k, visible, m_i, l_i, scale, PRECISION)
            # V after the scores, the order the full cache reached the copy bandwidth with (loading it
            # with K measured 1-3% slower across the H200 sweep)
            v = tl.load(v_base + pos[:, None] * s_vs + d[None, :], mask=col_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)

    if N_SPLITS == 1:
        out = acc / l_i[:, None]
        o_ptr = Out + b * s_ob + (head0 + rows // T)[:, None] * s_oh + t[:, None] * s_ot + d[None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (pid * N_SPLITS + split) * BLOCK_M
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        # only the real rows: a small index set makes these partials a large share of the traffic
        tl.store(PartO + (part + rows)[:, None] * D + d[None, :], acc / l_safe[:, None], mask=row_ok[:, None])
        tl.store(PartLse + part + rows, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)))
        if FUSE_COMBINE:
            # the last split of this program unit to finish merges them all: one launch per layer
            tl.debug_barrier()
            done = tl.atomic_add(Counter + pid, 1, sem="acq_rel", scope="gpu")
            if done == N_SPLITS - 1:
                _merge(PartO, PartLse, Out, pid * N_SPLITS * BLOCK_M, b, head0, n_rows, s_ob, s_oh, s_ot,
                       T, D, BLOCK_M, N_SPLITS)
                tl.atomic_xchg(Counter + pid, 0)  # ready for the next launch


@triton.jit
def _rotate(rows, cos, sin, d, mask, D: tl.constexpr):
    """RoPE (half-split rotation, as `fused.rope_write` computes it: float32, one rounding by the caller)
    of the rows whose first elements `rows` points at (`[R, 1]`); cos, sin: `[R, 1]` pointers likewise."""
    x = tl.load(rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(rows + ((d + D // 2) % D)[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos + d[None, :], mask=mask, other=0.0)
    s = tl.load(sin + d[None, :], mask=mask, other=0.0)
    return x * c + tl.where(d[None, :] < D // 2, -partner, partner) * s


@triton.jit
def _merge(PartO, PartLse, Out, base, b, head0, n_rows, s_ob, s_oh, s_ot, T: tl.constexpr, D: tl.constexpr,
           BLOCK_M: tl.constexpr, N_SPLITS: tl.constexpr):
    """Merge the splits' normalised partial outputs by their log-sum-exp weights."""
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # ".cg" reads the other programs' partials from L2, ordered after the acquire that let this program
    # in; unlike volatile loads they may vectorise
    for s in tl.static_range(N_SPLITS):
        m = tl.maximum(m, tl.load(PartLse + base + s * BLOCK_M + rows, cache_modifier=".cg"))
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    row_ok = rows < n_rows
    for s in tl.static_range(N_SPLITS):
        w = tl.exp2(tl.load(PartLse + base + s * BLOCK_M + rows, cache_modifier=".cg") - m)
        total += w
        acc += w[:, None] * tl.load(PartO + (base + s * BLOCK_M + rows)[:, None] * D + d[None, :],
                                    mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
    o_ptr = Out + b * s_ob + (head0 + rows // T)[:, None] * s_oh + (rows % T)[:, None] * s_ot + d[None, :]
    tl.store(o_ptr, (acc / total[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _combine_kernel(PartO, PartLse, Out, s_ob, s_oh, s_ot, n_kv_heads,
                    T: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                    N_SPLITS: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    b, h, head0, n_rows = _unit(pid, n_kv_heads, T, G, GP)
    wait_for_inputs(PDL)
    _merge(PartO, PartLse, Out, pid * N_SPLITS * BLOCK_M, b, head0, n_rows, s_ob, s_oh, s_ot,
           T, D, BLOCK_M, N_SPLITS)


def semaphores(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed semaphores, one per program unit (or output tile, for `dustin.linear`), kept across launches
    (each launch leaves them zero)."""
    return scratch.zeros("semaphore", device, n, torch.int32)


_sparse_tile: int | None = None  # `use_sparse_tiles`
_early_gather = True  # `use_early_gather`


@contextlib.contextmanager
def _overriding(name: str, value):
    """Sets this module's global `name` to `value` within the block."""
    saved = globals()[name]
    globals()[name] = value
    try:
        yield
    finally:
        globals()[name] = saved


def use_sparse_tiles(block_n: int | None):
    """Within the block, index-set attention launched without a tiling reads `block_n`-key tiles
    (None: the default plan): a benchmark compares tile sizes side by side in whole steps."""
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise DustinError(f"sparse tiles must be a power of two >= 16 keys, got {block_n}")
    return _overriding("_sparse_tile", block_n)


def use_early_gather(flag: bool):
    """Within the block, index-set attention asked to gather its first tile before the PDL wait does so
    (True, the default) or gathers it after the wait like every other tile: a benchmark compares the two
    side by side in whole steps."""
    return _overriding("_early_gather", bool(flag))


def gathers_early(head_dim: int, block_n: int, sparse: bool, wanted: bool) -> bool:
    """Whether index-set attention loads its first tile of keys and values before waiting for the
    kernel before it: where the caller wants it (`wanted`) and the tile is small (at most 4096 elements,
    such as a draft's 64 keys of 64 dims). It is held in registers across the wait; a 72B tile
    (128 x 128) would spill."""
    return wanted and _early_gather and sparse and block_n * head_dim <= 64 * 64


def default_tile(head_dim: int, sparse: bool) -> int:
    """Keys per tile when a launch gives none. The whole cache: the H200 sweep found no gain in larger
    tiles. An index set at head dim 128 in 128-key tiles: fewer gathered rounds (72B shape, batch 16:
    14.0 us against 15.3 for 64-key tiles, benchmarks/gpu/kernels.json); 256 would not fit three stages
    of them in shared memory. Whole steps at the 7B and 8B shapes do not tell the two apart
    (benchmarks/gpu/e2e.json: 8.77 against 8.73 ms for Qwen2.5-7B, 10.55 against 10.54 for Llama-3.1-8B)."""
    if sparse:
        return _sparse_tile or (128 if head_dim == 128 else 64)
    return 64 if head_dim >= 128 else 128


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def plan_splits(batch: int, n_kv_heads: int, n_keys: int, device: torch.device, *, min_keys: int = 512,
                per_sm: int = 2, round_up: bool = False) -> int:
    """Splits per (sequence, KV head): as many as keep the programs within `per_sm` per multiprocessor
    (one wave; `round_up`: the fewest that reach it), each split >= `min_keys` keys.

    Two programs of the full-cache kernel fit on an SM at once. Measured on an H200 at gamma 4
    (benchmarks/gpu/kernels.json), the split count rounded up spills a partial second wave: it is the
    slowest of the sweep in 17 of its 18 shapes, contexts and batches, 8-42% behind the best (Qwen2.5-7B
    shape, 32k, batch 16: 5 splits, 320 programs, 325 us against 254 us for 4). Index sets are planned by
    `plan_sparse_splits`.
    """
    programs = batch * n_kv_heads
    slots = per_sm * _sm_count(device)
    want = -(-slots // programs) if round_up else slots // programs
    return int(max(1, min(want, n_keys // min_keys, 32)))


def plan_sparse_splits(units: int, block_m: int, n_keys: int, block_n: int, device: torch.device) -> int:
    """Splits of an index set for `units` programs (sequence, KV head, query-head group) of `block_m` rows.

    Each split writes a partial output of `block_m` rows that the merge reads back. Measured on an H200
    (the sweeps in benchmarks/gpu/kernels.json and benchmarks/gpu/draft-kernels/kernels.json): with 32
    or more rows (a verification step's GQA group x gamma + 1 queries) those partials cost more than
    the keys they save reading, and one program per SM, rounded down, is best (72B shape, batch 16:
    one split of 64-key tiles, 15.3 us against 22.2 for two); a draft's one query per head has tiny
    partials and takes two programs per SM (Qwen2.5-0.5B shape, batch 16: eight splits, 6.9 us; four,
    one per SM, 6.8; two, 8.5).
    """
    per_sm = 1 if block_m >= 32 else 2
    return int(max(1, min(per_sm * _sm_count(device) // units, n_keys // block_n, 32)))


def _check(q, k_cache, v_cache, seq_lens, indices=None) -> None:
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise DustinError(f"expected q [B, Hq, T, D] and k/v caches [B, Hkv, S, D] of one shape, got "
                          f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, Hq, T, D = q.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or Hq % k_cache.shape[1]:
        raise DustinError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise DustinError(f"q, k and v need one floating dtype, got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (q.device == k_cache.device == v_cache.device == seq_lens.device):
        raise DustinError("q, the caches and seq_lens must be on one device")
    if D & (D - 1) or D < 16 or T > 16 or T < 1:
        raise DustinError(f"kernels take head dims that are powers of two >= 16 and 1..16 new tokens, got D={D}, T={T}")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise DustinError(f"{name} needs a contiguous last dimension")
    if seq_lens.shape != (B,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise DustinError(f"seq_lens must be an integer tensor of shape ({B},), got {tuple(seq_lens.shape)} {seq_lens.dtype}")
    if indices is not None:
        if indices.dim() not in (2, 3) or indices.shape[0] != B or (indices.dim() == 3 and indices.shape[1] not in (1, k_cache.shape[1])):
            raise DustinError(f"indices must be [B, budget] or [B, Hkv, budget], got {tuple(indices.shape)}")
        if indices.dtype not in (torch.int32, torch.int64) or indices.device != q.device or indices.stride(-1) != 1:
            raise DustinError("indices must be a contiguous integer tensor on the device of q")


def _check_rope(qkv, cos, sin, positions, n_heads, k_cache, v_cache, seq_lens, indices) -> None:
    if qkv.dim() != 3 or k_cache.dim() != 4:
        raise DustinError(f"expected qkv [B, T, (Hq + 2 Hkv) D] and caches [B, Hkv, S, D], got {tuple(qkv.shape)}, "
                          f"{tuple(k_cache.shape)}")
    B, T, width = qkv.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    if n_heads < 1 or n_heads % Hkv or width != (n_heads + 2 * Hkv) * D or qkv.stride(-1) != 1:
        raise DustinError(f"qkv {tuple(qkv.shape)} is not a contiguous fused projection of {n_heads} query heads "
                          f"for the cache {tuple(k_cache.shape)}")
    for name, x in (("cos", cos), ("sin", sin)):
        if x.shape != (B, T, D) or x.dtype != torch.float32 or x.stride(-1) != 1 or x.device != qkv.device:
            raise DustinError(f"{name} must be float32 [B, T, D] = {(B, T, D)} on {qkv.device} with a contiguous "
                              f"last dimension, got {tuple(x.shape)} {x.dtype}")
    if positions.shape != (B, T) or positions.dtype not in (torch.int32, torch.int64) or not positions.is_contiguous():
        raise DustinError(f"positions must be a contiguous integer [B, T] = {(B, T)}, got {tuple(positions.shape)}")
    if bool(((positions < 0) | (positions >= k_cache.shape[2])).any()):
        raise DustinError(f"positions must lie in the cache's [0, {k_cache.shape[2]})")
    if indices is None:
        raise DustinError("sparse_attention_rope needs an index set; the whole cache goes through rope_write "
                          "and decode_attention")
    q = qkv[..., : n_heads * D].unflatten(-1, (n_heads, D)).transpose(1, 2)  # a view: the checks read its shape
    _check(q, k_cache, v_cache, seq_lens, indices)


def _launch(q, k_cache, v_cache, seq_lens, indices, *, n_splits, block_n, num_warps, num_stages, fuse_combine,
            check, prefetch=True, head_splits=1, rope=None, early=False):
    """`rope`: None, or (cos, sin, positions, n_heads) when `q` is the fused q/k/v projection."""
    if head_splits < 1:
        raise DustinError(f"head_splits must be >= 1, got {head_splits}")
    if rope is None:
        B, Hq, T, D = q.shape
        s_q = q.stride(0), q.stride(1), q.stride(2)
    else:
        B, T, D, Hq = q.shape[0], q.shape[1], k_cache.shape[-1], rope[3]
        s_q = q.stride(0), D, q.stride(1)
    if check:
        if rope is None:
            _check(q, k_cache, v_cache, seq_lens, indices)
        else:
            _check_rope(q, *rope, k_cache, v_cache, seq_lens, indices)
        # a key position past the cache would be an out-of-bounds read: refuse it (one host sync)
        if int(seq_lens.max()) + T > k_cache.shape[2] or int(seq_lens.min()) < 0:
            raise DustinError(f"seq_lens + {T} new tokens exceed the cache of {k_cache.shape[2]} positions")
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    GP = -(-G // head_splits)  # query heads per program
    units = B * Hkv * -(-G // GP)
    block_m = max(16, triton.next_power_of_2(GP * T))
    sparse = indices is not None
    n_keys = indices.shape[-1] if sparse else k_cache.shape[2] + T
    block_n = block_n or default_tile(D, sparse)
    if n_splits is None:
        n_splits = (plan_sparse_splits(units, block_m, n_keys, block_n, q.device) if sparse
                    else plan_splits(B, Hkv, n_keys, q.device))
    # written as [B, T, Hq, D] so the model's following reshape to [B, T, Hq * D] is free
    out = torch.empty(B, T, Hq, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    if sparse:
        idx = indices if indices.dim() == 3 else indices[:, None]
        s_ib, s_ih, n_budget = idx.stride(0), (idx.stride(1) if idx.shape[1] > 1 else 0), idx.shape[-1]
    else:
        idx, s_ib, s_ih, n_budget = seq_lens, 0, 0, 0
    cos = sin = pos = out
    s_c = (0, 0)
    if rope is not None:
        cos, sin, pos = rope[0], rope[1], rope[2]
        s_c = cos.stride(0), cos.stride(1)
    part_o = part_lse = out
    if n_splits > 1:
        part_o = torch.empty(units * n_splits * block_m, D, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(units * n_splits * block_m, device=q.device, dtype=torch.float32)
    fuse = fuse_combine and n_splits > 1
    counter = semaphores(q.device, units) if fuse else seq_lens
    _attn_kernel[(units, n_splits)](
        q, k_cache, v_cache, seq_lens, idx, out, part_o, part_lse, counter, cos, sin, pos,
        *s_q, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), s_ib, s_ih,
        out.stride(0), out.stride(1), out.stride(2), *s_c, Hkv, n_budget, k_cache.shape[2], LOG2E / math.sqrt(D),
        T=T, G=G, GP=GP, D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_T=max(16, triton.next_power_of_2(T)),
        N_SPLITS=n_splits, SPARSE=sparse, FUSE_COMBINE=fuse, PREFETCH=prefetch,
        EARLY=gathers_early(D, block_n, sparse, early), ROPE=rope is not None,
        PRECISION=dot_precision(q.dtype), **pdl.options(q.device),
        num_warps=num_warps, num_stages=num_stages)
    if n_splits > 1 and not fuse:
        _combine_kernel[(units,)](part_o, part_lse, out, out.stride(0), out.stride(1), out.stride(2), Hkv,
                                  T=T, G=G, GP=GP, D=D, BLOCK_M=block_m, N_SPLITS=n_splits,
                                  **pdl.options(q.device), num_warps=4)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *,
                     n_splits: int | None = None, block_n: int | None = None, num_warps: int = 4,
                     num_stages: int = 3, fuse_combine: bool = False, check: bool = True) -> torch.Tensor:
    """Full-cache attention of `T` new queries per sequence (causal among them).

    q: `[B, Hq, T, D]`; k_cache, v_cache: `[B, Hkv, S, D]` with the new tokens written at
    `seq_lens[b] + t`; seq_lens: `[B]`. Returns `[B, Hq, T, D]`. `check=False` skips the input checks
    (and their host sync) on a hot path whose shapes are already known good.
    """
    return _launch(q, k_cache, v_cache, seq_lens, None, n_splits=n_splits, block_n=block_n,
                   num_warps=num_warps, num_stages=num_stages, fuse_combine=fuse_combine, check=check)


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     indices: torch.Tensor, *, n_splits: int | None = None, block_n: int | None = None,
                     num_warps: int = 4, num_stages: int = 3, fuse_combine: bool = True, prefetch: bool = True,
                     head_splits: int = 1, early_gather: bool = False, check: bool = True) -> torch.Tensor:
    """Attention over `indices` (`[B, budget]` or `[B, Hkv, budget]`; entries outside `[0, seq_lens[b])`
    are skipped) plus the `T` new tokens. Shapes as `decode_attention`. `fuse_combine` merges the splits
    in the kernel's last program instead of a second launch (launches dominate this small read);
    `prefetch` loads each tile's positions one tile ahead; `head_splits` shares a KV group's query heads
    among that many programs (each reads the group's keys; by default one program reads them for all);
    `early_gather` gathers the first tile before the PDL wait, where it fits in registers (`dustin.pdl`).
    It is only correct if the kernel launched just before writes neither `seq_lens`, nor `indices`, nor
    cache rows below the lengths; it pays when that kernel is one of ours under PDL (after cuBLAS
    nothing overlaps)."""
    return _launch(q, k_cache, v_cache, seq_lens, indices, n_splits=n_splits, block_n=block_n,
                   num_warps=num_warps, num_stages=num_stages, fuse_combine=fuse_combine, check=check,
                   prefetch=prefetch, head_splits=head_splits, early=early_gather)


def sparse_attention_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, indices: torch.Tensor,
                          n_heads: int, *, n_splits: int | None = None, block_n: int | None = None, num_warps: int = 4,
                          num_stages: int = 3, early_gather: bool = False, check: bool = True) -> torch.Tensor:
    """`fused.rope_write` then `sparse_attention`, in one launch: a few-row decode pass is bound by its
    launches. The program that attends to the new tokens rotates its KV head's keys, writes keys and
    values into the cache at `positions` and uses them from registers.

    qkv: `[B, T, (n_heads + 2 Hkv) D]` with a contiguous last dimension; cos, sin: `[B, T, D]` float32;
    positions: `[B, T]` cache slots of the new tokens (`seq_lens[b] + t`, or a scratch slot for padding);
    the rest as `sparse_attention` (`early_gather` with its precondition). Returns `[B, n_heads, T, D]`.
    """
    return _launch(qkv, k_cache, v_cache, seq_lens, indices, n_splits=n_splits, block_n=block_n,
                   num_warps=num_warps, num_stages=num_stages, fuse_combine=True, check=check,
                   rope=(cos, sin, positions, n_heads), early=early_gather)
