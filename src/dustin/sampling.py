"""Token choice and the two acceptance rules of speculative decoding, batched over sequences."""
from __future__ import annotations

import torch


def probs_from_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """`[..., V]` logits -> probabilities after temperature and nucleus (top-p) filtering, float32."""
    probs = (logits.float() / temperature).softmax(-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(-1, descending=True)
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return filtered / filtered.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """`[B, V]` probabilities -> `[B]` token ids."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def greedy_accept(draft: torch.Tensor, target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest prefix of drafts that match the target's argmax, then the target's own next token.

    draft: `[B, gamma]`; target_logits: `[B, gamma + 1, V]`. Returns `n_accepted [B]` in `0..gamma` and
    `next_token [B]`: the correction at the first mismatch, or the bonus token when all matched.
    """
    choice = target_logits.argmax(-1)  # [B, gamma + 1]
    match = (draft == choice[:, :-1]).long()
    n = match.cumprod(1).sum(1)
    return n, choice.gather(1, n[:, None]).squeeze(1)


def speculative_accept(draft: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard rule: keep draft `i` with probability `min(1, p_i / q_i)`; at the first rejection
    sample from the normalised residual `max(0, p - q)`; if all are kept, sample the bonus from `p`.

    draft: `[B, gamma]` tokens sampled from draft_probs `[B, gamma, V]`; target_probs: `[B, gamma + 1, V]`.
    The output tokens are distributed exactly as sampling from the target alone.
    """
    B, gamma, V = draft_probs.shape
    p = target_probs[:, :gamma].gather(-1, draft[..., None]).squeeze(-1)
    q = draft_probs.gather(-1, draft[..., None]).squeeze(-1)
    u = torch.rand(B, gamma, device=draft.device, generator=generator)
    n = (u * q < p).long().cumprod(1).sum(1)
    q_ext = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)  # no draft at the bonus slot
    at = n[:, None, None].expand(B, 1, V)
    p_n, q_n = target_probs.gather(1, at).squeeze(1), q_ext.gather(1, at).squeeze(1)
    residual = (p_n - q_n).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    dist = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_n)
    return n, sample(dist, generator)
