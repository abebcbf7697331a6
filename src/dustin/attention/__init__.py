"""Attention dispatch: the model calls `attend`, which picks the torch reference or a Triton kernel.

The model's attention knows two cases only: the whole cache (`indices is None`) or these indices.
"""
from __future__ import annotations

import torch

from ..errors import DustinError
from . import reference

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device, head_dim: int | None = None) -> str:
    """"auto" -> "triton" on CUDA when Triton imports and the kernels take `head_dim` (a power of two
    >= 16: their products need 16-deep tiles on the GPU; the interpreter has no such limit), else "torch"."""
    if backend not in BACKENDS:
        raise DustinError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    kernels_fit = device.type != "cuda" or head_dim is None or (head_dim >= 16 and not head_dim & (head_dim - 1))
    if backend == "auto":
        return "triton" if device.type == "cuda" and kernels_fit and _triton_ready() else "torch"
    if backend == "triton" and not kernels_fit:
        raise DustinError(f"the Triton kernels take head dims that are powers of two >= 16, and this model's is "
                          f"{head_dim}; use attn_backend='torch' (or 'auto')")
    return backend


def _triton_ready() -> bool:
    try:
        from . import decode  # noqa: F401
    except ImportError:
        return False
    return True


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *,
           indices: torch.Tensor | None = None, backend: str = "torch") -> torch.Tensor:
    """Attention of `T` new queries per sequence over its cache.

    q: `[B, Hq, T, D]`; k_cache, v_cache: `[B, Hkv, S, D]` with the new tokens already written at
    `seq_lens[b] + t`; seq_lens: `[B]` committed lengths; indices: None for the whole cache, or
    `[B, budget]` / `[B, Hkv, budget]` positions to read besides the new tokens. Returns `[B, Hq, T, D]`.
    """
    if backend == "triton" and q.shape[2] <= 16:  # prefill chunks take the reference (SDPA) path
        from . import decode

        if indices is None:
            return decode.decode_attention(q, k_cache, v_cache, seq_lens, check=False)
        return decode.sparse_attention(q, k_cache, v_cache, seq_lens, indices, check=False)
    if indices is None:
        return reference.dense_attention(q, k_cache, v_cache, seq_lens)
    return reference.sparse_attention(q, k_cache, v_cache, seq_lens, indices)


def attend_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, indices: torch.Tensor,
                n_heads: int, *, early_gather: bool = False) -> torch.Tensor:
    """RoPE of the fused projection's q and k, k and v written into the cache at `positions`, and attention
    over `indices` plus the new tokens, in one Triton launch (`decode.sparse_attention_rope`).

    qkv: `[B, T, (Hq + 2 Hkv) D]`; cos, sin: `[B, T, D]` float32; positions: `[B, T]`. Returns `[B, Hq, T, D]`.
    `early_gather`: the projection just before was our PDL kernel (`decode.sparse_attention`).
    """
    from . import decode

    return decode.sparse_attention_rope(qkv, cos, sin, positions, k_cache, v_cache, seq_lens, indices, n_heads,
                                        early_gather=early_gather, check=False)


def score(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor, kv_heads: torch.Tensor, *,
          backend: str = "torch", out: torch.Tensor | None = None, sum_queries: bool = False) -> torch.Tensor:
    """Full-context attention probabilities of chosen heads, summed over the heads: one score per
    query and position.

    q: `[B, h, T, D]`; k_cache: `[B, Hkv, S, D]`; seq_lens: `[B]` committed lengths (query `t` sees
    positions `<= seq_lens[b] + t`); kv_heads: `[h]` KV head of each query head. Returns `[B, T, S]` float32,
    or `[B, 1, S]` summed over the queries with `sum_queries`; with `out`, adds into it and returns it.
    """
    if backend == "triton":
        from . import scoring

        return scoring.score_positions(q, k_cache, seq_lens, kv_heads, out=out, sum_queries=sum_queries,
                                       check=False)
    s = reference.position_scores(q, k_cache, seq_lens, kv_heads)
    if sum_queries:
        s = s.sum(1, keepdim=True)
    if out is not None and out.shape != s.shape:  # add_ would broadcast a [B, 1, S] row silently
        raise DustinError(f"out must be {tuple(s.shape)}, got {tuple(out.shape)}")
    return s if out is None else out.add_(s)
