"""Triton: the budget split around its top-k, in two launches instead of about twenty small torch ops.

`indices.budget_split` is the reference: mask the protected positions (sinks, recent window, past the
length) out of both score rows, rank each row's best `rest` free positions with one `torch.topk`, then
take the top-`m` lookahead picks and fill the rest with the best history picks not already taken. Here
the masking is one elementwise Triton launch, the top-k stays torch's, and the merge is one program per
sequence: the `m` lookahead picks are flagged in a scratch row and the history picks read their flags,
the survivors are compacted by a prefix sum and scattered after them, sinks and the recent window are
written around them, and the row is sorted. Same inputs, same top-k, so the result is identical to the
reference, ties included.

    >>> idx = budget_split(s_T, s_D, seq_lens, m, budget=512, n_sink=4, n_recent=16)  # == indices.budget_split
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..errors import DustinError
from ..scratch import zeros as scratch_zeros

FLOAT_MIN = torch.finfo(torch.float32).min


@triton.jit
def _mask_kernel(History, Lookahead, Lens, Out, B, S, s_hb, s_lb,
                 N_SINK: tl.constexpr, N_RECENT: tl.constexpr, BLOCK: tl.constexpr, FILL: tl.constexpr):
    """History, Lookahead: `[B, S]` rows `s_hb` / `s_lb` apart; Lens: `[B]`; Out: `[2 B, S]` float32."""
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = j < S
    L = tl.load(Lens + b).to(tl.int64)
    blocked = (j < N_SINK) | (j >= L - N_RECENT)  # sinks, the recent window, and past the length
    look = tl.load(Lookahead + b * s_lb + j, mask=in_row, other=0.0).to(tl.float32)
    hist = tl.load(History + b * s_hb + j, mask=in_row, other=0.0).to(tl.float32)
    tl.store(Out + b * S + j, tl.where(blocked, FILL, look), mask=in_row)
    tl.store(Out + (B + b) * S + j, tl.where(blocked, FILL, hist), mask=in_row)


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
                 check: bool = True) -> torch.Tensor:
    """`indices.budget_split` on the GPU. history, lookahead: `[B, S]` float scores with a contiguous last
    dimension; seq_lens: `[B]`; m: `[B]` or int; scratch: a zeroed int8 tensor of at least `B * S`
    elements that the call leaves zeroed (a caller that owns one, such as a policy, keeps its launches
    apart from other callers'; default: one per device). Returns `[B, budget]` int64."""
    from .indices import budget_split as reference

    B, S = history.shape
    dev = history.device
    rest = budget - n_sink - n_recent
    if check:
        if lookahead.shape != (B, S) or seq_lens.shape != (B,) or rest < 1 or min(n_sink, n_recent) < 0:
            raise DustinError(f"history and lookahead must be one [B, S] shape and seq_lens [B], with budget > "
                              f"n_sink + n_recent; got {tuple(history.shape)}, {tuple(lookahead.shape)}, "
                              f"{tuple(seq_lens.shape)}, budget {budget}, n_sink {n_sink}, n_recent {n_recent}")
        if not (history.is_floating_point() and lookahead.is_floating_point()) or seq_lens.is_floating_point():
            raise DustinError("scores must be floating point and seq_lens integer")
        if not (history.device == lookahead.device == seq_lens.device) or history.stride(-1) != 1 or \
                lookahead.stride(-1) != 1:
            raise DustinError("scores and seq_lens must be on one device, the scores with contiguous rows")
        if history.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise DustinError("the Triton budget split runs on CUDA tensors; on the CPU use indices.budget_split")
        if not isinstance(m, int) and (not torch.is_tensor(m) or m.is_floating_point() or m.device != history.device
                                       or m.numel() not in (1, B)):
            raise DustinError(f"m must be an int or an integer tensor of 1 or {B} elements on {history.device}")
        if scratch is not None and (scratch.dtype != torch.int8 or scratch.numel() < B * S
                                    or scratch.device != history.device or not scratch.is_contiguous()):
            raise DustinError(f"scratch must be a contiguous int8 tensor of >= {B * S} elements on {history.device}")
    if S <= budget:
        return reference(history, lookahead, seq_lens, m, budget=budget, n_sink=n_sink, n_recent=n_recent)
    m = torch.full((B,), m, device=dev, dtype=torch.long) if isinstance(m, int) else m.reshape(-1).expand(B)
    scores = torch.empty(2 * B, S, device=dev, dtype=torch.float32)
    block = 1024
    seq_lens = seq_lens.contiguous()
    _mask_kernel[(B, triton.cdiv(S, block))](history, lookahead, seq_lens, scores, B, S, history.stride(0),
                                             lookahead.stride(0), N_SINK=n_sink, N_RECENT=n_recent, BLOCK=block,
                                             FILL=FLOAT_MIN)
    # row b ranks the lookahead of sequence b, row B + b its history, as `Candidates.rank` stacks them
    top = scores.topk(rest, dim=1).indices
    out = torch.empty(B, budget, device=dev, dtype=torch.long)
    flags = (scratch_zeros("budget split flag", dev, B * S, torch.int8, hint=", or pass scratch=")
             if scratch is None else scratch)
    _merge_kernel[(B,)](top, m.contiguous(), seq_lens, flags, out, B, S, rest, out.stride(0), budget,
                        N_SINK=n_sink, N_RECENT=n_recent, RP=triton.next_power_of_2(rest),
                        SP=triton.next_power_of_2(max(n_sink, 1)), RECP=triton.next_power_of_2(max(n_recent, 1)),
                        BP=triton.next_power_of_2(budget), num_warps=8)
    return out
