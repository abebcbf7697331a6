"""Static KV cache: preallocated, one length per sequence, explicit commit and rollback."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelArgs
from .errors import DustinError


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes
    kv_cache: int  # bytes
    total: int  # bytes

    def describe(self) -> str:
        gib = 2**30
        return (f"weights {self.weights / gib:.2f} GiB + KV cache {self.kv_cache / gib:.2f} GiB "
                f"= {self.total / gib:.2f} GiB")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def estimate_memory(args: ModelArgs, *, batch: int, context: int, dtype: torch.dtype = torch.bfloat16,
                    include_weights: bool = True) -> MemoryEstimate:
    """Bytes needed to hold the weights and a KV cache of `batch` sequences of `context` tokens."""
    nbytes = dtype_bytes(dtype)
    weights = args.n_params() * nbytes if include_weights else 0
    kv = args.kv_bytes_per_token(nbytes) * batch * (context + KVCache.SCRATCH)
    return MemoryEstimate(weights=weights, kv_cache=kv, total=weights + kv)


def available_memory(device: torch.device) -> int:
    """Free bytes on `device`: the CUDA allocator's view on a GPU, MemAvailable on the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown platform: let the allocator decide


class KVCache:
    """K and V for every layer, `[n_layers, B, n_kv_heads, max_len + SCRATCH, head_dim]`.

    `seq_lens[b]` counts the committed tokens of sequence `b`. A forward pass writes the K/V of its
    new tokens at positions `seq_lens[b] + t` without committing them; the engine then calls
    `commit(n)` for the tokens it keeps, so rejected tokens are never committed and are overwritten
    by the next pass. `rollback(n)` removes committed tokens. The extra slot at `max_len` is where
    padding tokens of a ragged chunk are written, so they can never land on a committed position.
    """

    SCRATCH = 1

    def __init__(self, args: ModelArgs, *, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (args.n_layers, batch, args.n_kv_heads, max_len + self.SCRATCH, args.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.max_len = max_len

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def positions(self, n_new: int) -> torch.Tensor:
        """`[B, n_new]` cache positions of the next `n_new` tokens of each sequence."""
        return self.seq_lens[:, None].long() + torch.arange(n_new, device=self.seq_lens.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Store new keys and values.

        k, v: `[B, n_kv_heads, T, head_dim]`; positions: `[B, T]`, padding tokens already pointed at
        the scratch slot `max_len`.
        """
        idx = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)

    def snapshot(self, start: torch.Tensor, length: int) -> tuple[torch.Tensor, ...]:
        """K/V of positions `start[b] .. start[b] + length - 1` in every layer, to `restore` later.

        Re-running committed tokens (to see their queries) recomputes their K/V in another order of
        float operations; restoring keeps the cache bit-for-bit what the prefill wrote.
        """
        L, B, H, _, D = self.k.shape
        pos = start.long()[:, None] + torch.arange(length, device=start.device)
        idx = pos[None, :, None, :, None].expand(L, B, H, length, D)
        return self.k.gather(3, idx), self.v.gather(3, idx), idx

    def restore(self, snap: tuple[torch.Tensor, ...]) -> None:
        k, v, idx = snap
        self.k.scatter_(3, idx, k)
        self.v.scatter_(3, idx, v)

    def commit(self, n: torch.Tensor | int, *, check: bool = True) -> None:
        """Advance each sequence by `n[b]` (or `n`) tokens whose K/V the last pass wrote."""
        n = self._as_lengths(n)
        if check:
            new = self.seq_lens.long() + n
            if bool((n < 0).any()) or bool((new > self.max_len).any()):
                raise DustinError(
                    f"cannot commit {n.tolist()} tokens onto lengths {self.seq_lens.tolist()} with "
                    f"max_len={self.max_len}; commit counts must be >= 0 and fit the cache (setup a larger cache)"
                )
        self.seq_lens += n.to(torch.int32)

    def rollback(self, n: torch.Tensor | int, *, check: bool = True) -> None:
        """Remove the last `n[b]` (or `n`) committed tokens of each sequence."""
        n = self._as_lengths(n)
        if check and (bool((n < 0).any()) or bool((n > self.seq_lens.long()).any())):
            raise DustinError(
                f"cannot roll back {n.tolist()} tokens from lengths {self.seq_lens.tolist()}; "
                "counts must be between 0 and each sequence's length"
            )
        self.seq_lens -= n.to(torch.int32)

    def reset(self) -> None:
        self.seq_lens.zero_()

    def _as_lengths(self, n: torch.Tensor | int) -> torch.Tensor:
        if isinstance(n, int):
            return torch.full_like(self.seq_lens, n, dtype=torch.long)
        n = torch.as_tensor(n, device=self.seq_lens.device).long()
        if n.shape != self.seq_lens.shape:
            raise DustinError(f"expected one count per sequence, shape {tuple(self.seq_lens.shape)}, got {tuple(n.shape)}")
        return n
