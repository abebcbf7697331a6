"""Plain-torch references for the attention operations. They define what the kernels must compute.

Shared conventions: the `T` new tokens of sequence `b` are already written to the cache at positions
`seq_lens[b] .. seq_lens[b] + T - 1`; query `t` sees every committed entry it is given plus new
tokens `0..t` (causal among the new ones).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def new_token_mask(seq_lens: torch.Tensor, n_new: int, length: int) -> torch.Tensor:
    """`[B, T, length]` bool: cache position `j` is visible to new token `t` of sequence `b`."""
    j = torch.arange(length, device=seq_lens.device)
    last = seq_lens[:, None].long() + torch.arange(n_new, device=seq_lens.device)  # [B, T]
    return j[None, None, :] <= last[:, :, None]


def dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    seq_lens: torch.Tensor) -> torch.Tensor:
    """Attention of new queries over each sequence's whole cache.

    q: `[B, Hq, T, D]`; k_cache, v_cache: `[B, Hkv, S, D]`; seq_lens: `[B]` committed lengths.
    Returns `[B, Hq, T, D]`.
    """
    T = q.shape[2]
    length = min(int(seq_lens.max()) + T, k_cache.shape[2])
    mask = new_token_mask(seq_lens, T, length)[:, None]
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     indices: torch.Tensor) -> torch.Tensor:
    """Attention of new queries over selected cache entries plus the new tokens.

    q: `[B, Hq, T, D]`; k_cache, v_cache: `[B, Hkv, S, D]`; seq_lens: `[B]`;
    indices: `[B, budget]` (shared by all KV heads) or `[B, Hkv, budget]` cache positions. Entries
    outside `[0, seq_lens[b])` are ignored, so `-1` pads a short row. Returns `[B, Hq, T, D]`.
    """
    B, Hkv, _, D = k_cache.shape
    T = q.shape[2]
    if indices.dim() == 2:
        indices = indices[:, None, :].expand(B, Hkv, -1)
    valid = (indices >= 0) & (indices < seq_lens[:, None, None])  # [B, Hkv, budget]
    new_pos = seq_lens[:, None, None].long() + torch.arange(T, device=q.device)  # [B, 1, T]
    pos = torch.cat([indices.long().clamp(min=0) * valid, new_pos.expand(B, Hkv, T)], dim=2)
    gather = pos[..., None].expand(-1, -1, -1, D)
    k = torch.gather(k_cache, 2, gather)
    v = torch.gather(v_cache, 2, gather)
    tri = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat([valid[:, :, None, :].expand(-1, -1, T, -1), tri.expand(B, Hkv, T, T)], dim=3)
    group = q.shape[1] // Hkv
    mask = mask.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=group != 1)


def attention_probs(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor,
                    kv_heads: torch.Tensor | None = None) -> torch.Tensor:
    """Full attention probabilities of new queries over each whole cache, in float32.

    q: `[B, h, T, D]`; k_cache: `[B, Hkv, S, D]`; kv_heads: `[h]` the KV head each query head reads
    (default: grouped-query order). Returns `[B, h, T, L]` with `L = max(seq_lens) + T`; masked
    positions are 0.
    """
    B, h, T, D = q.shape
    length = min(int(seq_lens.max()) + T, k_cache.shape[2])
    if kv_heads is None:
        kv_heads = torch.arange(h, device=q.device) // (h // k_cache.shape[1])
    k = k_cache[:, kv_heads, :length].float()
    logits = torch.einsum("bhtd,bhld->bhtl", q.float(), k) / math.sqrt(D)
    mask = new_token_mask(seq_lens, T, length)[:, None]
    return logits.masked_fill(~mask, float("-inf")).softmax(-1)


def position_scores(q: torch.Tensor, k_cache: torch.Tensor, seq_lens: torch.Tensor,
                    kv_heads: torch.Tensor) -> torch.Tensor:
    """Per-query, per-position importance: full-context attention probabilities summed over chosen heads.

    q: `[B, h, T, D]` queries of the chosen heads; k_cache: `[B, Hkv, S, D]`; kv_heads: `[h]`.
    Returns `[B, T, S]` float32, zero where a query cannot see.
    """
    scores = attention_probs(q, k_cache, seq_lens, kv_heads).sum(1)  # [B, T, L]
    return F.pad(scores, (0, k_cache.shape[2] - scores.shape[2]))
