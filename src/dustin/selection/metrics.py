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


def recovery(target: Transformer, tokens: torch.Tensor, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention recovery rate of `indices` for verifying `tokens [B, T]`.

    The share of the full target attention mass of the verification queries, over all heads and
    layers, that falls inside the selected set (new tokens always count as read). Returns the overall
    rate `[B]` and the per-layer rate `[n_layers, B]`. Commits nothing.
    """
    args = target.args
    capture = capture_all(target)
    target.decode(tokens, capture=capture, check=False)
    lens = target.seq_lens
    S, T = target.cache.k.shape[3], tokens.shape[1]
    if callable(indices):
        indices = torch.stack([_as_3d(indices(layer, capture.q[layer]), args.n_kv_heads)
                               for layer in range(args.n_layers)])
    mask = selected_mask(indices, lens, S, T, args.n_layers, args.n_kv_heads)
    per_layer = []
    for layer in range(args.n_layers):
        probs = reference.attention_probs(capture.q[layer], target.cache.k[layer], lens)  # [B, H, T, L]
        L = probs.shape[-1]
        m = mask[layer][:, :, :L].repeat_interleave(args.group_size, dim=1)  # [B, H, L]
        per_layer.append((probs * m[:, :, None]).sum(-1).mean((1, 2)))
    per_layer = torch.stack(per_layer)
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
