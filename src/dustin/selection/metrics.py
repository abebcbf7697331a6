"""How good a selection is: attention recovery rate, KL divergence and top-1 agreement against full attention."""
from __future__ import annotations

import torch

from ..attention import reference
from ..model import QueryCapture, Transformer


def capture_all(model: Transformer) -> QueryCapture:
    """Capture every head of every layer."""
    heads = list(range(model.args.n_heads))
    return QueryCapture({layer: heads for layer in range(model.args.n_layers)})


def full_attention_mass(target: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """`[n_layers, B, Hkv, S]`: the true attention of a full verification pass of `tokens [B, T]`, per
    layer and KV head, summed over the group's query heads and the queries, per position (new tokens
    included). Writes the new tokens' K/V but commits nothing."""
    args = target.args
    capture = capture_all(target)
    target.decode(tokens, capture=capture, check=False)
    S = target.cache.k.shape[3]
    out = []
    for layer in range(args.n_layers):
        probs = reference.attention_probs(capture.q[layer], target.cache.k[layer], target.seq_lens)
        B, H, T, L = probs.shape
        mass = probs.sum(2).view(B, args.n_kv_heads, args.group_size, L).sum(2)
        out.append(torch.nn.functional.pad(mass, (0, S - L)))
    return torch.stack(out)


def selected_mask(indices, seq_lens: torch.Tensor, size: int, n_new: int, n_layers: int, n_kv_heads: int) -> torch.Tensor:
    """`[n_layers, B, Hkv, size]` bool: what a pass with `indices` reads (selected entries + new tokens).

    indices: None (everything), a `[B, budget]` / `[B, Hkv, budget]` tensor, or a per-layer callable's
    results stacked as `[n_layers, B, Hkv, budget]`.
    """
    B = seq_lens.shape[0]
    lens = seq_lens.long()[:, None]
    j = torch.arange(size, device=seq_lens.device)[None]
    new = (j >= lens) & (j < lens + n_new)  # [B, size]
    if indices is None:
        return ((j < lens + n_new)[None, :, None]).expand(n_layers, B, n_kv_heads, size)
    idx = indices
    if idx.dim() == 2:
        idx = idx[:, None]
    if idx.dim() == 3:
        idx = idx[None].expand(n_layers, -1, -1, -1)
    idx = idx.expand(n_layers, B, n_kv_heads, idx.shape[-1]).long()
    valid = (idx >= 0) & (idx < seq_lens.long()[None, :, None, None])
    mask = torch.zeros(n_layers, B, n_kv_heads, size, dtype=torch.bool, device=seq_lens.device)
    mask.scatter_(3, idx.clamp(0, size - 1), valid)
    return mask | new[None, :, None]


def layer_probs(target: Transformer, capture: QueryCapture) -> list[torch.Tensor]:
    """Per layer `[B, H, T, L]`: the full attention of a captured pass (all heads) over the cache."""
    return [reference.attention_probs(capture.q[layer], target.cache.k[layer], target.seq_lens)
            for layer in range(target.args.n_layers)]


def recovery_from_probs(probs: list[torch.Tensor], indices, seq_lens: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """`[n_layers, B]`: per layer, the share of the attention mass (mean over heads and queries) that a
    pass reading `indices` plus the new tokens would have seen. indices: None, one tensor for every
    layer, or a list with one per layer."""
    out = []
    for layer, p in enumerate(probs):
        B, H, T, L = p.shape
        idx = indices[layer] if isinstance(indices, (list, tuple)) else indices
        mask = selected_mask(idx, seq_lens, L, T, 1, n_kv_heads)[0]  # [B, Hkv, L]
        m = mask.repeat_interleave(H // n_kv_heads, dim=1)
        out.append((p * m[:, :, None]).sum(-1).mean((1, 2)))
    return torch.stack(out)


def recovery(target: Transformer, tokens: torch.Tensor, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention recovery rate of `indices` for verifying `tokens [B, T]`.

    The share of the full target attention mass of the verification queries, over all heads and
    layers, that falls inside the selected set (new tokens always count as read). Returns the overall
    rate `[B]` and the per-layer rate `[n_layers, B]`. Commits nothing.
    """
    args = target.args
    capture = capture_all(target)
    target.decode(tokens, capture=capture, check=False)
    if callable(indices):
        indices = [_as_3d(indices(layer, capture.q[layer]), args.n_kv_heads) for layer in range(args.n_layers)]
    per_layer = recovery_from_probs(layer_probs(target, capture), indices, target.seq_lens, args.n_kv_heads)
    return per_layer.mean(0), per_layer


def _as_3d(idx: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    return idx[:, None].expand(-1, n_kv_heads, -1) if idx.dim() == 2 else idx


def kl_divergence(full_logits: torch.Tensor, sparse_logits: torch.Tensor) -> torch.Tensor:
    """KL(full || sparse) per position, `[..., V] -> [...]`, in nats."""
    logp = full_logits.float().log_softmax(-1)
    logq = sparse_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def top1_agreement(full_logits: torch.Tensor, sparse_logits: torch.Tensor) -> torch.Tensor:
    """`[...]` bool: the sparse pass picks the same top token as the full one."""
    return full_logits.argmax(-1) == sparse_logits.argmax(-1)
