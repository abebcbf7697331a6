"""Triton: Dustin's budget split in one launch, one program per sequence, with no host synchronisation.

The torch path (`indices.budget_split_reference`) ranks both score rows with `topk` and merges them with
a dozen small kernels: 169 us per step at 32k x batch 16 on an H200. Only the chosen *set* matters to
attention, not its order, so this kernel finds each threshold instead of sorting: a radix select over
the float scores' bits (eight passes of 4 bits over the positions still in the running) gives
the `m`-th best lookahead score, then the `rest - m`-th best history score among the positions the
lookahead did not take, and a last pass writes the chosen positions in position order. Ties at a
threshold go to the lower positions.

    >>> idx = budget_split_triton(history, lookahead, seq_lens, m, budget=512, n_sink=4, n_recent=16)
    >>> # the same set per row as indices.budget_split_reference (up to ties), in position order
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import DustinError


@triton.jit
def _key(x):
    """float32 -> int32 with the same order (negative floats have their magnitude bits flipped)."""
    u = x.to(tl.int32, bitcast=True)
    return tl.where(u < 0, u ^ 0x7FFFFFFF, u)


@triton.jit
def _digit(key, p: tl.constexpr):
    """Digit `p` (4 bits, most significant first) of an order-preserving int32 key, as 0..15."""
    if p == 0:
        return (key >> 28) + 8  # the sign nibble, shifted so its order is unsigned
    return (key >> (28 - 4 * p)) & 0xF


@triton.jit
def _taken(key, j, free, thr, cut):
    """What a threshold select took: keys above `thr`, and keys at it at positions below `cut`."""
    return free & ((key > thr) | ((key == thr) & (j < cut)))


@triton.jit
def _select(Scores, Other, row, lo, hi, k, other_thr, other_cut, EXCLUDE: tl.constexpr, BLOCK: tl.constexpr):
    """The `k` largest `Scores[row + j]` over `lo <= j < hi` (with `EXCLUDE`, among the positions that
    `Other`'s select did not take), as a threshold key and a position cut for the ties at it.

    Eight passes of 4-bit digits narrow the threshold; each counts, for the keys still in the running,
    how many have each digit or more (compares, not atomics: the keys crowd into a few digits, and a
    histogram's atomics on one bin serialise). A last pass finds where the ties the select needs end.
    `k == 0` selects nothing.
    """
    digits = tl.arange(0, 16)
    prefix = tl.zeros([], tl.int32)
    need = tl.maximum(k, 1)
    for p in tl.static_range(8):
        at_least = tl.zeros([BLOCK, 16], tl.int32)
        for start in range(lo, hi, BLOCK):
            j = start + tl.arange(0, BLOCK)
            free = j < hi
            key = _key(tl.load(Scores + row + j, mask=free, other=0.0))
            live = free
            if EXCLUDE:
                live = live & ~_taken(_key(tl.load(Other + row + j, mask=free, other=0.0)), j, free, other_thr,
                                      other_cut)
            if p > 0:
                live = live & ((key >> (32 - 4 * p)) == (prefix >> (32 - 4 * p)))
            at_least += (live[:, None] & (_digit(key, p)[:, None] >= digits[None, :])).to(tl.int32)
        count = tl.sum(at_least, 0)  # [16]: keys in the running with this digit or a larger one
        d = tl.max(tl.where(count >= need, digits, 0), 0)
        need -= tl.sum(tl.where(digits == d + 1, count, 0), 0)  # those above d are taken
        if p == 0:
            prefix = (d - 8) << 28
        else:
            prefix = prefix | (d << (28 - 4 * p))
    # the `need` ties at `prefix` are the lowest positions among them: find where the need-th one sits
    cut = hi
    seen = tl.zeros([], tl.int32)
    for start in range(lo, hi, BLOCK):
        j = start + tl.arange(0, BLOCK)
        free = j < hi
        tie = free & (_key(tl.load(Scores + row + j, mask=free, other=0.0)) == prefix)
        if EXCLUDE:
            tie = tie & ~_taken(_key(tl.load(Other + row + j, mask=free, other=0.0)), j, free, other_thr, other_cut)
        n = tl.sum(tie.to(tl.int32), 0)
        if (seen < need) & (seen + n >= need):  # one tile holds the last tie taken: rank its ties
            rank = seen + tl.cumsum(tie.to(tl.int32), 0)
            cut = tl.min(tl.where(tie & (rank == need), j, hi), 0) + 1
        seen += n
    return tl.where(k > 0, prefix, 2147483647), tl.where(k > 0, cut, lo)  # k == 0: nothing is above int32 max


@triton.jit
def _budget_split_kernel(History, Lookahead, SeqLens, M, Out, s_row, budget, n_sink, n_recent,
                         BLOCK: tl.constexpr):
    b = tl.program_id(0)
    L = tl.load(SeqLens + b).to(tl.int32)
    out = Out + b.to(tl.int64) * budget
    if L < budget:  # shorter than the budget: read in full (attention ignores entries past L)
        for start in range(0, budget, BLOCK):
            j = start + tl.arange(0, BLOCK)
            tl.store(out + j, j.to(tl.int64), mask=j < budget)
    else:
        rest = budget - n_sink - n_recent
        m = tl.minimum(tl.maximum(tl.load(M + b).to(tl.int32), 0), rest)
        row = b.to(tl.int64) * s_row
        lo, hi = n_sink, L - n_recent  # the free positions: everything but the sinks and the recent window
        thr_a, cut_a = _select(Lookahead, Lookahead, row, lo, hi, m, 0, 0, EXCLUDE=False, BLOCK=BLOCK)
        thr_h, cut_h = _select(History, Lookahead, row, lo, hi, rest - m, thr_a, cut_a, EXCLUDE=True, BLOCK=BLOCK)
        written = tl.zeros([], tl.int32)
        for start in range(lo, hi, BLOCK):
            j = start + tl.arange(0, BLOCK)
            free = j < hi
            took_a = _taken(_key(tl.load(Lookahead + row + j, mask=free, other=0.0)), j, free, thr_a, cut_a)
            took_h = _taken(_key(tl.load(History + row + j, mask=free, other=0.0)), j, free & ~took_a, thr_h, cut_h)
            chosen = took_a | took_h
            slot = n_sink + written + tl.cumsum(chosen.to(tl.int32), 0) - 1
            tl.store(out + slot, j.to(tl.int64), mask=chosen)
            written += tl.sum(chosen.to(tl.int32), 0)
        for start in range(0, n_sink + n_recent, BLOCK):
            i = start + tl.arange(0, BLOCK)
            pos = tl.where(i < n_sink, i, L - n_recent + i - n_sink)
            slot = tl.where(i < n_sink, i, budget - n_recent + i - n_sink)
            tl.store(out + slot, pos.to(tl.int64), mask=i < n_sink + n_recent)


def budget_split_triton(history: torch.Tensor, lookahead: torch.Tensor, seq_lens: torch.Tensor,
                        m: torch.Tensor | int, *, budget: int, n_sink: int, n_recent: int, block: int = 1024,
                        num_warps: int = 8) -> torch.Tensor:
    """`indices.budget_split_reference` in one launch; the chosen positions come in position order.

    history, lookahead: `[B, S]` float32 scores with a contiguous last dimension; seq_lens: `[B]`;
    m: int or `[B]` integer tensor, the lookahead share (clamped to `[0, budget - n_sink - n_recent]`).
    Returns `[B, budget]` int64 positions.
    """
    B, S = history.shape
    if lookahead.shape != (B, S) or seq_lens.shape != (B,):
        raise DustinError(f"history {tuple(history.shape)}, lookahead {tuple(lookahead.shape)} and seq_lens "
                          f"{tuple(seq_lens.shape)} must be [B, S], [B, S] and [B]")
    if history.dtype != torch.float32 or lookahead.dtype != torch.float32:
        raise DustinError(f"scores must be float32, got {history.dtype} and {lookahead.dtype}")
    if history.stride() != lookahead.stride() or history.stride(1) != 1:
        raise DustinError("history and lookahead need the same strides and a contiguous last dimension")
    if not (history.device == lookahead.device == seq_lens.device):
        raise DustinError("history, lookahead and seq_lens must be on one device")
    rest = budget - n_sink - n_recent
    if n_sink < 0 or n_recent < 0 or rest < 0:
        raise DustinError(f"budget {budget} must hold n_sink {n_sink} + n_recent {n_recent}")
    out = torch.empty(B, budget, device=history.device, dtype=torch.long)
    if S <= budget:  # no sequence can outgrow the budget
        return out.copy_(torch.arange(budget, device=history.device)[None].expand(B, -1))
    if isinstance(m, int):  # a fill, not a host-to-device copy, so a captured graph may hold it
        m = torch.full((B,), m, device=history.device, dtype=torch.int32)
    elif m.shape not in ((B,), ()) or m.dtype.is_floating_point:
        raise DustinError(f"m must be an int or an integer tensor [B] = [{B}], got {m.dtype} {tuple(m.shape)}")
    m = m.expand(B).contiguous()
    _budget_split_kernel[(B,)](history, lookahead, seq_lens, m, out, history.stride(0), budget, n_sink, n_recent,
                               BLOCK=block, num_warps=num_warps)
    return out
