"""Index-set building blocks shared by the policies. All run on the device without host syncs."""
from __future__ import annotations

import torch


def streaming_indices(seq_lens: torch.Tensor, *, budget: int, n_sink: int) -> torch.Tensor:
    """`[B, budget]` positions: the first `n_sink` and the last `budget - n_sink` of each sequence.

    A sequence shorter than `budget` gets `0..budget-1`; the entries past its length are ignored by
    attention, so it is read in full.
    """
    lens = seq_lens.long()[:, None]
    ar = torch.arange(budget, device=seq_lens.device)
    recent = lens - budget + ar  # the last budget - n_sink positions sit at ar >= n_sink
    idx = torch.where(ar < n_sink, ar, recent)
    return torch.where(lens < budget, ar, idx)


def protected_mask(seq_lens: torch.Tensor, size: int, *, n_sink: int, n_recent: int) -> torch.Tensor:
    """`[B, size]` bool: sinks and the recent window of each sequence (the set P)."""
    j = torch.arange(size, device=seq_lens.device)[None]
    lens = seq_lens.long()[:, None]
    return (j < n_sink) | ((j >= lens - n_recent) & (j < lens))


def budget_split(history: torch.Tensor, lookahead: torch.Tensor, seq_lens: torch.Tensor, m: torch.Tensor | int, *,
                 budget: int, n_sink: int, n_recent: int) -> torch.Tensor:
    """Dustin's selection: P (sinks + recent) + top-`m` of `lookahead` + top of `history` for the rest.

    history, lookahead: `[B, S]` scores; seq_lens: `[B]`; m: `[B]` or int, the draft share per
    sequence. Returns `[B, budget]` unique positions below each `seq_lens[b]`; a sequence shorter than
    `budget` gets `0..budget-1` (read in full: attention ignores entries past its length).
    """
    B, S = history.shape
    dev = history.device
    if S <= budget:  # no sequence can outgrow the budget
        return torch.arange(budget, device=dev)[None].expand(B, -1)
    rest = budget - n_sink - n_recent
    lens = seq_lens.long()
    if isinstance(m, int):  # a fill, not a host-to-device copy, so a captured graph may hold it
        m = torch.full((B, 1), m, device=dev, dtype=torch.long)
    else:
        m = m.long().expand(B)[:, None]
    j = torch.arange(S, device=dev)[None]
    blocked = protected_mask(lens, S, n_sink=n_sink, n_recent=n_recent) | (j >= lens[:, None])
    neg = torch.finfo(torch.float32).min
    slot = torch.arange(rest, device=dev)[None]
    from_draft = lookahead.float().masked_fill(blocked, neg).topk(rest, dim=1).indices  # [B, rest] best first
    taken = torch.zeros(B, S, dtype=torch.bool, device=dev).scatter_(1, from_draft, slot < m)
    from_target = history.float().masked_fill(blocked | taken, neg).topk(rest, dim=1).indices
    chosen = torch.where(slot < m, from_draft, from_target.gather(1, (slot - m).clamp(min=0)))
    recent = lens[:, None] - n_recent + torch.arange(n_recent, device=dev)[None]
    sinks = torch.arange(n_sink, device=dev)[None].expand(B, -1)
    idx = torch.cat([sinks, chosen, recent], dim=1)
    return torch.where(lens[:, None] < budget, torch.arange(budget, device=dev)[None], idx)
