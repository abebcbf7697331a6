"""Triton: the budget split, in three launches instead of about twenty small torch ops.

`indices.budget_split` is the reference: mask the protected positions (sinks, recent window, past the
length) out of both score rows, rank each row's best `rest` free positions (score first, then position),
then take the top-`m` lookahead picks and fill the rest with the best history picks not already taken.

Here the ranking is two launches of bitonic top-k in registers. The first masks a chunk of a row as it
loads it and keeps the chunk's best `rest` (rounded up to a power of two) as int64 keys that order by
score, then by position; the second keeps the row's best `rest` of those. Every candidate of a row's top
is in its chunk's top, so the result is exact: the reference's ranking, ties included. torch's top-k
took 77 us of the 86 us split at batch 16 and 32k (benchmarks/gpu/kernels-72b at ef43153).

The merge is one program per sequence: the `m` lookahead picks are flagged in a scratch row and the
history picks read their flags, the survivors are compacted by a prefix sum and scattered after them,
sinks and the recent window are written around them, and the row is sorted.

    >>> idx = budget_split(s_T, s_D, seq_lens, m, budget=512, n_sink=4, n_recent=16)  # == indices.budget_split
    >>> top = rank(s_T, s_D, seq_lens, rest=492, n_sink=4, n_recent=16)               # == indices.Candidates.rank
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..errors import DustinError
from ..scratch import zeros as scratch_zeros

FLOAT_MIN = torch.finfo(torch.float32).min


POS_BITS = 31  # a key's low bits: the position, reversed so that larger keys rank first


def _topk_mode() -> int:
    """How this Triton keeps a block's largest entries: 2 `tl.topk(x, k, descending=True)`, 1 `tl.topk(x, k)`
    (older releases, largest first), 0 a whole `tl.sort` (no `tl.topk` at all)."""
    fn = getattr(tl, "topk", None)
    if fn is None:
        return 0
    return 2 if "descending" in getattr(fn, "arg_names", ()) else 1


TOPK_MODE = _topk_mode()


@triton.jit
def _largest(key, K: tl.constexpr, MODE: tl.constexpr):
    """`key` `[N]` int64 -> its largest entries, largest first: `K` of them, or all `N` where MODE is 0."""
    if MODE == 2:
        out = tl.topk(key, K, descending=True)
    elif MODE == 1:
        out = tl.topk(key, K)
    else:
        out = tl.sort(key, descending=True)
    return out


@triton.jit
def _chunk_kernel(History, Lookahead, Lens, Cand, B, S, s_hb, s_lb, FILL,
                  N_SINK: tl.constexpr, N_RECENT: tl.constexpr, CHUNK: tl.constexpr, KP: tl.constexpr,
                  KEEP: tl.constexpr, MODE: tl.constexpr):
    """History, Lookahead: `[B, S]` rows `s_hb` / `s_lb` apart; Lens: `[B]`; Cand: `[2 B, n_chunks * KP]`
    int64, each chunk's best KP keys, best first (row b: the lookahead of sequence b; row B + b: its history)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    b = row % B
    j = chunk * CHUNK + tl.arange(0, CHUNK)
    in_row = j < S
    if row < B:
        x = tl.load(Lookahead + b * s_lb + j, mask=in_row, other=0.0).to(tl.float32)
    else:
        x = tl.load(History + b * s_hb + j, mask=in_row, other=0.0).to(tl.float32)
    L = tl.load(Lens + b).to(tl.int64)
    x = tl.where((j < N_SINK) | (j >= L - N_RECENT), FILL, x)  # sinks, the recent window, past the length
    # a key orders as (score, -position): the float's bits made monotone as an unsigned 32-bit number,
    # above the position. -0.0 ties with 0.0 and every NaN ranks first, as torch's sort has them
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x != x, 0x7FFFFFFF, bits).to(tl.int64)
    mono = tl.where(bits >= 0, bits + (1 << 31), -1 - bits)
    key = tl.where(in_row, (mono << POS_BITS) | ((1 << POS_BITS) - 1 - j), -1)
    top = _largest(key, KP, MODE)
    r = tl.arange(0, KEEP)
    tl.store(Cand + (row * tl.num_programs(1) + chunk) * KP + r, top, mask=r < KP)


@triton.jit
def _top_kernel(Cand, Top, n_cand, rest, NP: tl.constexpr, KP: tl.constexpr, KEEP: tl.constexpr,
                MODE: tl.constexpr):
    """Cand: `[2 B, n_cand]` int64 keys; Top: `[2 B, rest]` int64, each row's best positions, best first."""
    row = tl.program_id(0)
    i = tl.arange(0, NP)
    top = _largest(tl.load(Cand + row * n_cand + i, mask=i < n_cand, other=-1), KP, MODE)
    r = tl.arange(0, KEEP)
    tl.store(Top + row * rest + r, (1 << POS_BITS) - 1 - (top & ((1 << POS_BITS) - 1)), mask=r < rest)


def _check_scores(history, lookahead, seq_lens, rest, n_sink, n_recent, chunk) -> None:
    B, S = history.shape
    if lookahead.shape != (B, S) or seq_lens.shape != (B,) or rest < 1 or min(n_sink, n_recent) < 0:
        raise DustinError(f"history and lookahead must be one [B, S] shape and seq_lens [B], with budget > "
                          f"n_sink + n_recent; got {tuple(history.shape)}, "
                          f"{tuple(lookahead.shape)}, {tuple(seq_lens.shape)}, rest {rest}, n_sink {n_sink}, "
                          f"n_recent {n_recent}")
    if not (history.is_floating_point() and lookahead.is_floating_point()) or seq_lens.is_floating_point():
        raise DustinError("scores must be floating point and seq_lens integer")
    if not (history.device == lookahead.device == seq_lens.device) or history.stride(-1) != 1 or \
            lookahead.stride(-1) != 1:
        raise DustinError("scores and seq_lens must be on one device, the scores with contiguous rows")
    if history.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise DustinError("the Triton budget split runs on CUDA tensors; on the CPU use indices.budget_split")
    if chunk is not None and (chunk < 1 or chunk & (chunk - 1)):
        raise DustinError(f"chunk must be a power of two, got {chunk}")


def rank(history: torch.Tensor, lookahead: torch.Tensor, seq_lens: torch.Tensor, *, rest: int, n_sink: int,
         n_recent: int, chunk: int | None = None, check: bool = True) -> torch.Tensor:
    """`[2 B, rest]` int64: each row's best `rest` free positions, best first; rows `0..B-1` rank
    `lookahead`, rows `B..2B-1` `history` (`indices.Candidates.rank`, stacked). history, lookahead:
    `[B, S]` with contiguous rows, S >= rest; seq_lens: `[B]`. `chunk`: positions per first-stage program
    (a power of two; default 4096, at least `rest` rounded up)."""
    if check:
        _check_scores(history, lookahead, seq_lens, rest, n_sink, n_recent, chunk)
        if rest > history.shape[1]:
            raise DustinError(f"cannot rank {rest} positions of rows of {history.shape[1]}")
    B, S = history.shape
    kp = triton.next_power_of_2(rest)
    chunk = max(kp, min(chunk or 4096, triton.next_power_of_2(S)))
    n_chunks = triton.cdiv(S, chunk)
    cand = torch.empty(2 * B, n_chunks * kp, device=history.device, dtype=torch.int64)
    mode = TOPK_MODE
    _chunk_kernel[(2 * B, n_chunks)](history, lookahead, seq_lens, cand, B, S, history.stride(0),
                                     lookahead.stride(0), FLOAT_MIN, N_SINK=n_sink, N_RECENT=n_recent,
                                     CHUNK=chunk, KP=kp, KEEP=kp if mode else chunk, MODE=mode,
                                     num_warps=8 if chunk >= 4096 else 4)
    top = torch.empty(2 * B, rest, device=history.device, dtype=torch.int64)
    n_cand = n_chunks * kp
    np_ = triton.next_power_of_2(n_cand)
    _top_kernel[(2 * B,)](cand, top, n_cand, rest, NP=np_, KP=kp, KEEP=kp if mode else np_, MODE=mode,
                          num_warps=8 if np_ >= 4096 else 4)
    return top


@triton.jit
def _merge_kernel(Top, M, Lens, Flags, Out, B, S, rest, s_ob, budget,
                  N_SINK: tl.constexpr, N_RECENT: tl.constexpr, RP: tl.constexpr, SP: tl.constexpr,
                  RECP: tl.constexpr, BP: tl.constexpr):
    """Top: `[2 B, rest]` int64 ranked picks (lookahead rows, then history rows); M, Lens: `[B]`; Flags:
    `[B, S]` int8, zero; Out: `[B, budget]` int64, rows `s_ob` apart."""
    b = tl.program_id(0)
    L = tl.load(Lens + b).to(tl.int64)
    m = tl.minimum(tl.maximum(tl.load(M + b).to(tl.int64), 0), rest)
    full = L < budget  # shorter than the budget: read 0..budget-1, whatever the scores say
    r = tl.arange(0, RP)
    ok = r < rest
    look = tl.load(Top + b * rest + r, mask=ok, other=0)
    hist = tl.load(Top + (B + b) * rest + r, mask=ok, other=0)
    # a history pick is taken if it is one of the top-m lookahead picks: flag those positions in a zeroed
    # row, read the flags at the history picks, and clear them again for the next launch
    flags = Flags + b * S
    tl.store(flags + look, 1, mask=r < m)
    tl.debug_barrier()
    taken = tl.load(flags + hist, mask=ok, other=1, volatile=True)
    tl.debug_barrier()
    tl.store(flags + look, 0, mask=r < m)
    keep = (taken == 0).to(tl.int32)
    dest = tl.cumsum(keep, 0) - 1 + m  # the kept picks in rank order, after the lookahead ones
    out = Out + b * s_ob
    s = tl.arange(0, SP)
    tl.store(out + s, s, mask=s < N_SINK)
    tl.store(out + N_SINK + r, tl.where(full, N_SINK + r, look), mask=r < m)
    tl.store(out + N_SINK + dest, tl.where(full, N_SINK + dest, hist), mask=(keep == 1) & (dest < rest))
    i = tl.arange(0, RECP)
    tl.store(out + N_SINK + rest + i, tl.where(full, N_SINK + rest + i, L - N_RECENT + i), mask=i < N_RECENT)
    # in position order, as the reference returns it: neighbouring entries of a tile's gathered reads lie closer
    tl.debug_barrier()
    j = tl.arange(0, BP)
    row = tl.load(out + j, mask=j < budget, other=S + budget, volatile=True)
    tl.debug_barrier()
    tl.store(out + j, tl.sort(row, 0), mask=j < budget)


def budget_split(history: torch.Tensor, lookahead: torch.Tensor, seq_lens: torch.Tensor, m: torch.Tensor | int, *,
                 budget: int, n_sink: int, n_recent: int, scratch: torch.Tensor | None = None,
                 chunk: int | None = None, check: bool = True) -> torch.Tensor:
    """`indices.budget_split` on the GPU. history, lookahead: `[B, S]` float scores with a contiguous last
    dimension; seq_lens: `[B]`; m: `[B]` or int; scratch: a zeroed int8 tensor of at least `B * S`
    elements that the call leaves zeroed (a caller that owns one, such as a policy, keeps its launches
    apart from other callers'; default: one per device); chunk: as `rank`. Returns `[B, budget]` int64."""
    from .indices import budget_split as reference

    B, S = history.shape
    dev = history.device
    rest = budget - n_sink - n_recent
    if check:
        _check_scores(history, lookahead, seq_lens, rest, n_sink, n_recent, chunk)
        if not isinstance(m, int) and (not torch.is_tensor(m) or m.is_floating_point() or m.device != history.device
                                       or m.numel() not in (1, B)):
            raise DustinError(f"m must be an int or an integer tensor of 1 or {B} elements on {history.device}")
        if scratch is not None and (scratch.dtype != torch.int8 or scratch.numel() < B * S
                                    or scratch.device != history.device or not scratch.is_contiguous()):
            raise DustinError(f"scratch must be a contiguous int8 tensor of >= {B * S} elements on {history.device}")
    if S <= budget:
        return reference(history, lookahead, seq_lens, m, budget=budget, n_sink=n_sink, n_recent=n_recent)
    m = torch.full((B,), m, device=dev, dtype=torch.long) if isinstance(m, int) else m.reshape(-1).expand(B)
    # row b ranks the lookahead of sequence b, row B + b its history, as `Candidates.rank` stacks them
    seq_lens = seq_lens.contiguous()
    top = rank(history, lookahead, seq_lens, rest=rest, n_sink=n_sink, n_recent=n_recent, chunk=chunk, check=False)
    out = torch.empty(B, budget, device=dev, dtype=torch.long)
    flags = (scratch_zeros("budget split flag", dev, B * S, torch.int8, hint=", or pass scratch=")
             if scratch is None else scratch)
    _merge_kernel[(B,)](top, m.contiguous(), seq_lens, flags, out, B, S, rest, out.stride(0), budget,
                        N_SINK=n_sink, N_RECENT=n_recent, RP=triton.next_power_of_2(rest),
                        SP=triton.next_power_of_2(max(n_sink, 1)), RECP=triton.next_power_of_2(max(n_recent, 1)),
                        BP=triton.next_power_of_2(budget), num_warps=8)
    return out
