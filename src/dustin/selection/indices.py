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
