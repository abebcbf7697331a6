"""Index-set building blocks shared by the policies. All run on the device without host syncs."""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class Candidates:
    """The best `rest` free positions by each signal, best first: everything a budget split needs.

    One top-k ranks both signals at once; any split `m` is then a cheap merge, without another top-k.
    """

    lookahead: torch.Tensor  # [B, rest] positions ranked by the draft's lookahead score
    history: torch.Tensor  # [B, rest] positions ranked by the target's history score
    lens: torch.Tensor  # [B]
    size: int  # S, the length of the score rows

    @classmethod
    def rank(cls, history: torch.Tensor, lookahead: torch.Tensor, seq_lens: torch.Tensor, *, rest: int,
             n_sink: int, n_recent: int) -> "Candidates":
        B, S = history.shape
        lens = seq_lens.long()
        j = torch.arange(S, device=history.device)[None]
        blocked = protected_mask(lens, S, n_sink=n_sink, n_recent=n_recent) | (j >= lens[:, None])
        scores = torch.stack([lookahead, history]).float().masked_fill(blocked, torch.finfo(torch.float32).min)
        top = scores.view(2 * B, S).topk(rest, dim=1).indices.view(2, B, rest)
        return cls(top[0], top[1], lens, S)

    def split(self, m: torch.Tensor | int) -> torch.Tensor:
        """`[B, rest]`: the top-`m` lookahead positions, then the best history positions not among them."""
        B, rest = self.history.shape
        dev = self.history.device
        if isinstance(m, int):  # a fill, not a host-to-device copy, so a captured graph may hold it
            m = torch.full((B, 1), min(max(m, 0), rest), device=dev, dtype=torch.long)
        else:
            m = m.long().clamp(0, rest).expand(B)[:, None]
        slot = torch.arange(rest, device=dev).expand(B, -1)
        rank = torch.full((B, self.size), rest, device=dev, dtype=torch.long).scatter(1, self.lookahead, slot)
        keep = rank.gather(1, self.history) >= m  # not already taken as one of the top-m lookahead picks
        order = keep.long().cumsum(1) - 1
        dest = torch.where(keep & (order < rest - m), order + m, rest)  # column `rest` collects the unused
        chosen = torch.cat([torch.where(slot < m, self.lookahead, 0), slot[:, :1]], 1)
        return chosen.scatter(1, dest, self.history)[:, :rest]

    def assemble(self, chosen: torch.Tensor, *, budget: int, n_sink: int, n_recent: int) -> torch.Tensor:
        """Sinks + chosen + recent window, or `0..budget-1` for sequences shorter than the budget."""
        B = chosen.shape[0]
        dev = chosen.device
        recent = self.lens[:, None] - n_recent + torch.arange(n_recent, device=dev)[None]
        sinks = torch.arange(n_sink, device=dev)[None].expand(B, -1)
        idx = torch.cat([sinks, chosen, recent], dim=1)
        return torch.where(self.lens[:, None] < budget, torch.arange(budget, device=dev)[None], idx)


def budget_split(history: torch.Tensor, lookahead: torch.Tensor, seq_lens: torch.Tensor, m: torch.Tensor | int, *,
                 budget: int, n_sink: int, n_recent: int) -> torch.Tensor:
    """Dustin's selection: P (sinks + recent) + top-`m` of `lookahead` + top of `history` for the rest.

    history, lookahead: `[B, S]` scores; seq_lens: `[B]`; m: `[B]` or int, the draft share per
    sequence. Returns `[B, budget]` unique positions below each `seq_lens[b]`, in increasing order; a
    sequence shorter than `budget` gets `0..budget-1` (read in full: attention ignores entries past its
    length).
    """
    B, S = history.shape
    if S <= budget:  # no sequence can outgrow the budget
        return torch.arange(budget, device=history.device)[None].expand(B, -1)
    rest = budget - n_sink - n_recent
    cands = Candidates.rank(history, lookahead, seq_lens, rest=rest, n_sink=n_sink, n_recent=n_recent)
    # in position order: the sparse kernels' gathered reads of a sorted set spread less
    return cands.assemble(cands.split(m), budget=budget, n_sink=n_sink, n_recent=n_recent).sort(dim=1).values
