"""Token choice and the two acceptance rules of speculative decoding, batched over sequences."""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use torch.argmax
    triton = None


if triton is not None:

    @triton.jit
    def _argmax_kernel(X, Out, PartV, PartI, Counter, V, s_x, chunk, n_splits, SPLITS: tl.constexpr,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0)
        split = tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        best_v = tl.full([BLOCK], float("-inf"), tl.float32)
        best_i = tl.full([BLOCK], 2147483647, tl.int32)
        lo = split * chunk
        base = X + row.to(tl.int64) * s_x
        for start in range(lo, tl.minimum(lo + chunk, V), BLOCK):
            c = start + cols
            x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
            # NaN wins, as in torch.argmax; a strict > keeps each lane's first maximum; a lane's first
            # element is always taken (a row of -inf still has an argmax)
            take = (x > best_v) | ((x != x) & (best_v == best_v)) | ((best_i == 2147483647) & (c < V))
            best_v = tl.where(take, x, best_v)
            best_i = tl.where(take, c, best_i)
        v = tl.max(best_v, 0)
        nan = tl.max((best_v != best_v).to(tl.int32), 0) > 0
        hit = tl.where(nan, best_v != best_v, best_v == v)
        i = tl.min(tl.where(hit, best_i, 2147483647), 0)
        v = tl.where(nan, float("nan"), v)
        if SPLITS == 1:
            tl.store(Out + row, i.to(tl.int64))
        else:
            # each of the row's n_splits programs parks its (max, first index); the last to finish picks
            # among them (SPLITS: n_splits rounded up to a power of two, the merge's width)
            tl.store(PartV + row * SPLITS + split, v)
            tl.store(PartI + row * SPLITS + split, i)
            tl.debug_barrier()
            if tl.atomic_add(Counter + row, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
                s = tl.arange(0, SPLITS)
                parked = s < n_splits  # from L2, after the acquire
                pv = tl.load(PartV + row * SPLITS + s, mask=parked, other=float("-inf"), cache_modifier=".cg")
                pi = tl.load(PartI + row * SPLITS + s, mask=parked, other=2147483647, cache_modifier=".cg")
                pnan = pv != pv
                phit = tl.where(tl.max(pnan.to(tl.int32), 0) > 0, pnan, pv == tl.max(pv, 0))
                tl.store(Out + row, tl.min(tl.where(phit, pi, 2147483647), 0).to(tl.int64))
                tl.atomic_xchg(Counter + row, 0)  # ready for the next launch


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """`torch.argmax(logits, -1)` (the first maximum; NaN counts as the maximum) for `[..., V]` logits of any
    float dtype, without the float32 copy of a vocabulary-wide row: on CUDA a split Triton kernel reads
    the logits once, in their own dtype. Returns `[...]` int64."""
    if triton is None or logits.device.type != "cuda" or logits.shape[-1] >= 2**31:
        return logits.argmax(-1)
    return _argmax_triton(logits)


def _argmax_triton(logits: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    from .attention.decode import semaphores

    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out.view(logits.shape[:-1])
    block = 2048
    if splits is None:  # one block per program: a chain of loads in a program costs a latency each
        splits = min(256, triton.cdiv(V, block))
    chunk = triton.cdiv(triton.cdiv(V, splits), block) * block
    used = triton.cdiv(V, chunk)  # every launched program has columns to read
    width = triton.next_power_of_2(used)
    part_v = torch.empty(rows * width, dtype=torch.float32, device=x.device)
    part_i = torch.empty(rows * width, dtype=torch.int32, device=x.device)
    counter = semaphores(x.device, rows)
    _argmax_kernel[(rows, used)](x, out, part_v, part_i, counter, V, x.stride(0), chunk, used, SPLITS=width,
                                 BLOCK=block, num_warps=8)
    return out.view(logits.shape[:-1])


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


def greedy_accept(draft: torch.Tensor, target_logits: torch.Tensor, *,
                  forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Longest prefix of drafts that match the target's argmax, then the target's own next token.

    draft: `[B, gamma]`; target_logits: `[B, gamma + 1, V]`; forced: `[B]` benchmarks only: accept
    exactly this many instead. Returns `n_accepted [B]` in `0..gamma` and `next_token [B]`: the
    correction at the first mismatch, or the bonus token when all matched.
    """
    choice = argmax(target_logits)  # [B, gamma + 1]
    n = (draft == choice[:, :-1]).long().cumprod(1).sum(1) if forced is None else forced
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
