"""Selection policies: which target KV entries each verification pass reads.

The engine drives a policy through five calls per step:
    reset(target, draft, ids, lengths)        once, after prefill
    observe_draft(draft, capture, at)         after each draft pass (before it commits); `at` [B, K] marks the
                                              first pass of a step and which of its queries propose tokens
                                              (consecutive ones; later passes propose from every query)
    select(target, tokens) -> indices | None  before verification; None reads the whole cache
    needs_full(target, capture) -> bool       after the sparse pass: the optional guard
    observe_target(target, capture, n_acc, live)  after acceptance (before the target commits)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import attention
from ..config import SelectionConfig
from ..model import QueryCapture, Transformer
from .indices import Candidates, budget_split, streaming_indices


def kv_heads_of(model: Transformer, heads: list[int]) -> list[int]:
    return [h // model.args.group_size for h in heads]


def score_heads(model: Transformer, capture: QueryCapture, seq_lens: torch.Tensor | None = None, *,
                sum_queries: bool = False) -> torch.Tensor:
    """`[B, T, S]`: the captured heads' full-context attention per query, summed over heads and layers
    (`[B, 1, S]` summed over the queries too, with `sum_queries`).

    Query `t` sees positions `<= seq_lens[b] + t` (default: the model's committed lengths)."""
    total = None
    backend = model.attention_backend
    lens = model.seq_lens if seq_lens is None else seq_lens
    for layer, q in capture.q.items():  # the later layers add into the first one's scores
        total = attention.score(q, model.cache.k[layer], lens, kv_heads_of(model, capture.heads[layer]),
                                backend=backend, out=total, sum_queries=sum_queries)
    return total


class Policy:
    """Reads the whole cache. Subclasses narrow it."""

    name = "full"
    graph_safe = True  # its calls never sync with the host, so a step can be captured in a CUDA graph

    def __init__(self, config: SelectionConfig):
        config.validate()
        self.config = config

    def reset(self, target: Transformer, draft: Transformer | None, ids: torch.Tensor, lengths: torch.Tensor) -> None:
        pass

    def draft_capture(self) -> QueryCapture | None:
        return None

    def observe_draft(self, draft: Transformer, capture: QueryCapture, at: torch.Tensor | None) -> None:
        pass

    def select(self, target: Transformer, tokens: torch.Tensor):
        return None

    def draft_indices(self, draft: Transformer) -> torch.Tensor | None:
        """What a draft that shares the verification set reads (None: everything)."""
        return None

    def target_capture(self) -> QueryCapture | None:
        return None

    def needs_full(self, target: Transformer, capture: QueryCapture | None) -> bool:
        return False

    def observe_target(self, target: Transformer, capture: QueryCapture | None, n_acc: torch.Tensor,
                       live: torch.Tensor) -> None:
        pass


class Streaming(Policy):
    """StreamingLLM: the first `n_sink` positions and the most recent rest of the budget."""

    name = "streaming"

    def select(self, target, tokens):
        return streaming_indices(target.seq_lens, budget=self.config.budget, n_sink=self.config.n_sink)


class Dustin(Policy):
    """Draft lookahead + target history on retrieval heads, split by `m` (fixed or adaptive per sequence).

    The `history` and `lookahead` policies are this one with `m = 0` and `m = budget - |P|`.
    """

    name = "dustin"

    def __init__(self, config: SelectionConfig):
        super().__init__(config)
        rest = config.budget - config.fixed
        self.m0 = {"history": 0, "lookahead": rest}.get(config.policy, config.m)
        self.s_T = self.s_D = self.m = self.indices = self.step_probs = None
        self.graph_safe = config.guard is None
        self.m_trace: list[float] = []
        # reused every pass, so a captured step and its replays fill the same objects
        self._draft_capture = QueryCapture(dict(config.draft_heads)) if config.draft_heads else None
        self._target_capture = QueryCapture(dict(config.target_heads)) if config.target_heads else None

    def reset(self, target, draft, ids, lengths):
        # state lives in buffers updated in place, so a captured step reads and writes the same memory
        B, S = target.cache.batch, target.cache.k.shape[3]
        dev = target.device
        self.s_T = torch.zeros(B, S, device=dev)
        self.s_D = torch.zeros(B, S, device=dev)
        self._scratch = torch.zeros(B * S, dtype=torch.int8, device=dev)  # the Triton budget split's flags
        self._draft, self._look_q, self._look_start = draft, {}, torch.zeros(B, dtype=torch.long, device=dev)
        self.m = torch.full((B,), float(self.m0), device=dev)
        self.indices = torch.zeros(B, self.config.budget, dtype=torch.long, device=dev)
        self.has_history = self.has_indices = False
        self.m_trace = []
        if ids is not None and self._target_capture is not None and int(lengths.min()) >= 1:
            self._warm_history(target, ids, lengths)

    def _warm_history(self, target, ids, lengths) -> None:
        """The first history signal, from the last prompt token's query: re-run that token so the very
        first verification can already be sparse."""
        last = ids.gather(1, (lengths.long() - 1)[:, None])
        snap = target.cache.snapshot(lengths - 1, 1)
        target.rollback(1)
        target.decode(last, capture=self._target_capture)
        self.s_T.copy_(score_heads(target, self._target_capture)[:, 0])
        target.commit(1)
        target.cache.restore(snap)
        self.has_history = True

    def draft_capture(self):
        return self._draft_capture

    def observe_draft(self, draft, capture, at):
        """Keep the proposing queries; `score_lookahead` scores a step's queries together, so the draft's
        scoring layers are read once per step rather than once per pass (`reset` keeps the draft)."""
        if at is not None:  # the first pass of a step: the queries `at` [B, K], at positions seq_lens + at
            self._look_start.copy_(draft.seq_lens.long() + at[:, 0])
            self._look_q = {layer: [q] for layer, q in capture.at(at).q.items()}
        else:
            for layer, q in capture.q.items():
                self._look_q[layer].append(q)

    def score_lookahead(self) -> None:
        """s_D = this step's draft queries' attention on the scoring heads, summed. The queries sit at
        consecutive positions from `_look_start`, so one causal scoring call equals one call per pass."""
        if not self._look_q:
            return
        q = {layer: torch.cat(qs, 2) if len(qs) > 1 else qs[0] for layer, qs in self._look_q.items()}
        scores = score_heads(self._draft, QueryCapture(self._draft_capture.heads, q), self._look_start,
                             sum_queries=True)[:, 0]
        n = min(scores.shape[1], self.s_D.shape[1])
        self.s_D[:, :n] = scores[:, :n]
        self.s_D[:, n:].zero_()

    def target_capture(self):
        return self._target_capture

    def select(self, target, tokens):
        if not self.has_history and self.config.target_heads and self.m0 < self.config.budget - self.config.fixed:
            self.has_indices = False  # no target query yet: the first step verifies in full
            return None
        c = self.config
        self.score_lookahead()
        args = (self.s_T, self.s_D, target.seq_lens, self.m.round().long())
        kw = dict(budget=c.budget, n_sink=c.n_sink, n_recent=c.n_recent)
        if target.attention_backend == "triton":
            from . import split_kernels  # the same sets, in two launches around the top-k

            self.indices.copy_(split_kernels.budget_split(*args, **kw, scratch=self._scratch))
        else:
            self.indices.copy_(budget_split(*args, **kw))
        self.has_indices = True
        return self.indices

    def draft_indices(self, draft):
        """The last verification set plus the draft's own most recent `n_recent` tokens."""
        if not self.has_indices:
            return None
        lens = draft.seq_lens.long()[:, None]
        R = self.config.n_recent
        older = self.indices.masked_fill(self.indices >= lens - R, -1)  # the recent window has those
        return torch.cat([older, lens - R + torch.arange(R, device=lens.device)], 1)

    def estimated_recovery(self, probs: torch.Tensor, target) -> torch.Tensor:
        """`[B]`: share of the chosen heads' attention that fell inside the selected set or the new tokens."""
        B, T, S = probs.shape
        inside = torch.zeros(B, S, dtype=torch.bool, device=probs.device)
        inside.scatter_(1, self.indices.clamp(0, S - 1), True)
        lens = target.seq_lens.long()[:, None]
        inside |= torch.arange(S, device=probs.device)[None] >= lens  # new tokens are always read
        per_query = (probs * inside[:, None]).sum(-1) / probs.sum(-1).clamp(min=1e-30)
        return per_query.mean(1)

    def needs_full(self, target, capture):
        self.step_probs = None
        if capture is None or not capture.q or (self.config.guard is None and self.config.history_query == "last"):
            return False  # observe_target scores the one query it needs
        self.step_probs = score_heads(target, capture)
        if self.config.guard is None or not self.has_indices:
            return False
        low = self.estimated_recovery(self.step_probs, target) < self.config.guard
        return bool(low.any())

    def observe_target(self, target, capture, n_acc, live):
        if capture is None or not capture.q:
            return
        if self.step_probs is None:  # "last" without a guard: score only the last committed token's query
            fresh = score_heads(target, capture.at(n_acc[:, None]), target.seq_lens.long() + n_acc.long())[:, 0]
        else:
            probs = self.step_probs  # [B, T, S]
            T = probs.shape[1]
            if self.config.history_query == "last":
                weights = (torch.arange(T, device=probs.device)[None] == n_acc[:, None]).float()  # no sync
            else:
                weights = (torch.arange(T, device=probs.device)[None] <= n_acc[:, None]).float()
            fresh = torch.einsum("bts,bt->bs", probs, weights)
        if self.config.adaptive and self.has_indices:
            self._adapt(fresh, target, live)
        self.s_T.copy_(torch.where(live.bool()[:, None], fresh, self.s_T))
        self.has_history = True

    def _adapt(self, truth: torch.Tensor, target, live) -> None:
        """Move each sequence's m toward the split that would have caught most of this step's attention."""
        c = self.config
        rest = c.budget - c.fixed
        cands = Candidates.rank(self.s_T, self.s_D, target.seq_lens, rest=rest, n_sink=c.n_sink, n_recent=c.n_recent)
        grid = torch.linspace(0, rest, c.adapt_grid, device=truth.device).round().long()
        caught = torch.stack([truth.gather(1, cands.split(m)).sum(1) for m in grid], 1)
        best = grid[caught.argmax(1)].float()
        upd = (1 - c.adapt_rate) * self.m + c.adapt_rate * best
        self.m.copy_(torch.where(live.bool(), upd, self.m))
        if not (self.m.is_cuda and torch.cuda.is_current_stream_capturing()):
            self.m_trace.append(float(self.m.mean()))


class Oracle(Policy):
    """Top-`budget` positions by the current step's true attention (an upper bound; evaluation only).

    It runs a full verification pass first to see that attention. By default each layer and KV head
    gets its own best set, which bounds every policy that reads `budget` entries per KV head; with
    `oracle_shared` one set, ranked by the attention summed over all heads and layers, bounds the
    policies that share one set across layers (dustin, history, lookahead, streaming).
    """

    name = "oracle"
    graph_safe = False

    def select(self, target, tokens):
        from .metrics import full_attention_mass

        c, lens = self.config, target.seq_lens.long()
        if int(lens.max()) <= c.budget:
            return None
        mass = full_attention_mass(target, tokens)  # [n_layers, B, Hkv, S]
        if c.oracle_shared:
            mass = mass.sum((0, 2))[None, :, None]
        j = torch.arange(mass.shape[-1], device=mass.device)
        ranked = mass.masked_fill(j >= lens[None, :, None, None], -1.0).topk(c.budget, dim=-1).indices
        full = torch.arange(c.budget, device=mass.device)
        best = torch.where((lens < c.budget)[None, :, None, None], full, ranked)
        if c.oracle_shared:
            return best[0, :, 0]
        return lambda layer, q: best[layer]


class Quest(Policy):
    """Quest: per layer and KV head, pages ranked by the query-aware bound sum_d max(q_d min_d, q_d max_d)."""

    name = "quest"
    graph_safe = False

    def select(self, target, tokens):
        if int(target.seq_lens.max()) <= self.config.budget:
            return None
        return lambda layer, q: self._pages(target, layer, q)

    def _pages(self, target, layer, q):
        c, cache = self.config, target.cache
        lens = cache.seq_lens.long()
        P = c.page_size
        n_pages = (int(lens.max()) + P - 1) // P
        B, Hkv, _, D = cache.k.shape[1:]
        k = cache.k[layer][:, :, : n_pages * P].float()
        if k.shape[2] < n_pages * P:
            k = F.pad(k, (0, 0, 0, n_pages * P - k.shape[2]))
        pos = torch.arange(n_pages * P, device=k.device)
        valid = (pos[None] < lens[:, None])[:, None, :, None]  # [B, 1, n*P, 1]
        kmax = k.masked_fill(~valid, float("-inf")).view(B, Hkv, n_pages, P, D).amax(3)
        kmin = k.masked_fill(~valid, float("inf")).view(B, Hkv, n_pages, P, D).amin(3)
        qg = q.float().reshape(B, Hkv, -1, q.shape[-1])  # the group's heads x the new tokens
        bound = torch.maximum(qg[:, :, :, None] * kmin[:, :, None], qg[:, :, :, None] * kmax[:, :, None])
        score = bound.nan_to_num(0.0).sum(-1).amax(2)  # [B, Hkv, n_pages]; empty pages are masked below
        page = torch.arange(n_pages, device=k.device)
        last = (lens - 1).clamp(min=0) // P
        score = score.masked_fill((page[None] * P >= lens[:, None])[:, None], float("-inf"))
        score = score.masked_fill((page[None] == last[:, None])[:, None], float("inf"))  # the partial page
        keep = score.topk(min(c.budget // P, n_pages), dim=-1).indices  # [B, Hkv, pages]
        return (keep[..., None] * P + torch.arange(P, device=k.device)).flatten(2)


class SnapKV(Policy):
    """SnapKV: chosen once per layer and KV head from the prompt's last window, plus the newest tokens."""

    name = "snapkv"
    graph_safe = False

    def reset(self, target, draft, ids, lengths):
        from .metrics import capture_all

        c = self.config
        w = min(c.snapkv_window, int(lengths.min()), c.budget - c.n_recent - 1)
        self.prompt_lens = lengths.long().clone()
        self.static = None
        if w < 1 or int(lengths.max()) <= c.budget:
            return
        # re-run the window through the cache to see its queries, then put its K/V back as they were
        snap = target.cache.snapshot(lengths - w, w)
        target.rollback(w)
        window = torch.stack([ids[b, lengths[b] - w: lengths[b]] for b in range(ids.shape[0])])
        capture = capture_all(target)
        target.decode(window, capture=capture)
        lens = target.seq_lens.long()
        keep = c.budget - c.n_recent - w
        static = []
        neg = float("-inf")
        for layer, q in capture.q.items():
            probs = attention.reference.attention_probs(q, target.cache.k[layer], target.seq_lens)  # [B,H,w,L]
            B, H, _, L = probs.shape
            votes = probs.sum(2).view(B, target.args.n_kv_heads, -1, L).sum(2)  # [B, Hkv, L]
            votes = F.avg_pool1d(votes, c.snapkv_kernel, stride=1, padding=c.snapkv_kernel // 2,
                                 count_include_pad=False)
            j = torch.arange(L, device=votes.device)
            votes = votes.masked_fill((j[None] >= lens[:, None])[:, None], neg)  # the prefix before the window
            best, top = votes.topk(keep, dim=-1)
            top = top.masked_fill(best == neg, -1)  # a short prompt: fewer candidates than slots
            win = (lens[:, None] + torch.arange(w, device=votes.device))[:, None].expand(-1, top.shape[1], -1)
            static.append(torch.cat([top, win], -1))
        target.commit(w)
        target.cache.restore(snap)
        self.static = torch.stack(static)  # [n_layers, B, Hkv, budget - n_recent]

    def select(self, target, tokens):
        if self.static is None:
            return None
        c = self.config
        lens = target.seq_lens.long()[:, None]
        recent = lens - c.n_recent + torch.arange(c.n_recent, device=lens.device)
        recent = torch.where(recent >= self.prompt_lens[:, None], recent, -1)  # prompt tokens are in the window
        recent = recent[:, None].expand(-1, self.static.shape[2], -1)
        return lambda layer, q: torch.cat([self.static[layer], recent], -1)


POLICY_CLASSES = {"full": Policy, "dustin": Dustin, "history": Dustin, "lookahead": Dustin, "oracle": Oracle,
                  "streaming": Streaming, "snapkv": SnapKV, "quest": Quest}


def make_policy(config: SelectionConfig) -> Policy:
    config.validate()
    return POLICY_CLASSES[config.policy](config)
