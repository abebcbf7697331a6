"""Batched speculative decoding where every sequence moves on its own.

One step, for every live sequence `b` at once:
1. the draft proposes `gamma` tokens, reading its whole cache (`sd`) or sinks + recent tokens (`magicdec`);
2. the target verifies `[last, d_1..d_gamma]` in one pass, over its whole cache or a selected subset;
3. greedy or speculative-sampling acceptance keeps `n_b` drafts plus one target token;
4. each cache commits what was kept; the draft rolls back its rejected tokens.

Invariant between steps: both caches hold every token of the sequence except `last`, with one
exception: after a fully accepted step the draft also lacks `d_gamma`, which it feeds first next time.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .config import SpecConfig
from .errors import DustinError
from .model import Transformer
from .sampling import argmax, greedy_accept, probs_from_logits, sample, speculative_accept
from .selection import streaming_indices

PHASES = ("prefill", "draft", "verify", "accept", "step")  # "step": whole steps replayed from a CUDA graph


@dataclass
class SpecStats:
    """What a `generate` call did: acceptance, tokens per step and where the time went."""

    method: str
    gamma: int
    batch: int
    steps: int = 0  # verification steps (target passes after prefill)
    proposed: int = 0  # draft tokens proposed to live sequences
    accepted: int = 0  # of those, accepted
    new_tokens: int = 0  # tokens emitted over all sequences
    guarded: int = 0  # steps that the policy's guard re-verified with the whole cache
    # accepted drafts + 1 of a live sequence in one step -> count: the method's acceptance, counted before
    # a stop token or the length limit cuts what is emitted (new_tokens counts what was)
    per_step: Counter = field(default_factory=Counter)
    time: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @property
    def mean_tokens_per_step(self) -> float:
        n = sum(self.per_step.values())
        return sum(k * v for k, v in self.per_step.items()) / n if n else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def decode_seconds(self) -> float:
        return sum(v for k, v in self.time.items() if k != "prefill")

    @property
    def tokens_per_second(self) -> float:
        """Emitted tokens over decoding time (prefill excluded), all sequences together."""
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.method, "gamma": self.gamma, "batch": self.batch, "steps": self.steps,
            "proposed": self.proposed, "accepted": self.accepted, "new_tokens": self.new_tokens,
            "guarded": self.guarded,
            "acceptance_rate": self.acceptance_rate, "mean_tokens_per_step": self.mean_tokens_per_step,
            "tokens_per_step_histogram": {str(k): self.per_step[k] for k in sorted(self.per_step)},
            "time_s": dict(self.time), "tokens_per_second": self.tokens_per_second,
        }


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens of each sequence
    texts: list[str] | None  # decoded, when a tokenizer is known
    finish_reasons: list[str]  # "stop" or "length"
    stats: SpecStats


class _Clock:
    """Accumulates wall time per phase; synchronises CUDA so a phase owns the work it launched."""

    def __init__(self, stats: SpecStats, device: torch.device):
        self.stats, self.cuda = stats, device.type == "cuda"
        self.phase, self.t0 = None, 0.0

    def __call__(self, phase: str) -> "_Clock":
        self.phase = phase
        return self

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.stats.time[self.phase] += time.perf_counter() - self.t0


class Generator:
    """Speculative generation with a target and a draft model that share a tokenizer.

    >>> gen = Generator(target, draft, SpecConfig(method="sd", gamma=4), tokenizer=tok)
    >>> out = gen.generate(["def quicksort(xs):"])
    >>> out.texts[0], out.stats.mean_tokens_per_step
    """

    def __init__(self, target: Transformer, draft: Transformer | None = None, config: SpecConfig | None = None,
                 *, tokenizer=None, draft_tokenizer=None, vocab_size: int | None = None, policy=None):
        self.config = config or SpecConfig()
        self.config.validate()
        if self.config.method != "ar" and draft is None:
            raise DustinError(f"method {self.config.method!r} needs a draft model; pass one or use method='ar'")
        if self.config.method == "dustin" and policy is None:
            raise DustinError("method 'dustin' needs a selection policy; build one with dustin.selection")
        self.target, self.draft, self.tokenizer, self.policy = target, draft, tokenizer, policy
        if draft is not None:
            draft.linear_backend = self.config.draft_linear
            draft.few_row_weights = self.config.draft_weights
            if self.config.draft_weights == "fp8" and draft.device.type == "cuda" and draft.linear_backend != "triton":
                raise DustinError(f"an fp8 draft on CUDA runs every projection in the fused few-row kernels; set "
                                  f"draft_linear='triton' (--draft-linear triton), not {self.config.draft_linear!r}")
        self.vocab_size = self._shared_vocab(tokenizer, draft_tokenizer, vocab_size)

    def _shared_vocab(self, tokenizer, draft_tokenizer, vocab_size) -> int:
        vt = self.target.args.vocab_size
        if self.draft is None or self.config.method == "ar":
            return vt
        vd = self.draft.args.vocab_size
        if tokenizer is not None and draft_tokenizer is not None and tokenizer.get_vocab() != draft_tokenizer.get_vocab():
            raise DustinError("draft and target tokenizers differ; speculative decoding needs one shared vocabulary")
        if vt == vd:
            return vt
        # Families pad their embeddings to different sizes (Qwen2.5: 151936 vs 152064); that is fine
        # when the real vocabulary fits both.
        real = vocab_size or (len(tokenizer) if tokenizer is not None else None)
        if real is None or real > min(vt, vd):
            raise DustinError(
                f"draft and target have different vocabularies ({vd} vs {vt} entries); if they share a "
                "tokenizer whose vocabulary fits both, give it (Generator's tokenizer= or vocab_size=; the CLI "
                "passes the target's tokenizer), else pick a draft of the target's family"
            )
        return min(vt, vd)

    # --- input handling ---------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if len(prompts) == 0:
            raise DustinError("no prompts given")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise DustinError("prompts are text but no tokenizer was given; pass tokenizer= or token ids")
                p = self.tokenizer.encode(p)
            p = [int(t) for t in p]
            if not p:
                raise DustinError(f"prompt {i} is empty; every sequence needs at least one token")
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise DustinError(f"prompt {i} has token ids outside the vocabulary [0, {self.vocab_size})")
            out.append(p)
        return out

    def _stop_tokens(self) -> set[int]:
        if self.config.stop_tokens is not None:
            return set(self.config.stop_tokens)
        stops = set(self.target.args.eos_token_id)
        if self.tokenizer is not None:
            # chat models end turns with their EOS and documents with the pad/end-of-text token
            stops |= {t for t in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id) if t is not None}
        return stops

    def _setup(self, model: Transformer, batch: int, max_len: int) -> None:
        c = model.cache
        if c is not None and c.batch == batch and c.max_len == max_len:
            c.reset()
        else:
            model.setup_cache(batch, max_len)

    # --- the loop ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens: int | None = None,
                 on_tokens: Callable[[int, list[int]], None] | None = None, reuse_prefill: bool = False) -> GenerationResult:
        """Generate for a batch of prompts (strings or token lists); `on_tokens(row, tokens)` streams.

        `reuse_prefill=True` starts from caches that already hold every prompt but its last token (as a
        previous `generate` or `prefill` left them after rolling back), so evaluations can compare
        methods on one prefill.
        """
        cfg = self.config
        max_new = max_new_tokens or cfg.max_new_tokens
        if max_new < 1:
            raise DustinError(f"max_new_tokens must be >= 1, got {max_new}")
        prompts = self._encode(prompts)
        B, dev, gamma = len(prompts), self.target.device, cfg.gamma
        longest = max(len(p) for p in prompts)
        need = longest + max_new + gamma + 2
        max_len = cfg.max_len or need
        if need > max_len:
            raise DustinError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new}) needs a "
                              f"cache of {need} positions, more than max_len={max_len}; raise max_len or shorten it")
        use_draft = cfg.method != "ar"
        for model in (self.target, self.draft) if use_draft else (self.target,):
            if need > model.args.max_position_embeddings:
                raise DustinError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new}) and "
                                  f"gamma + 2 ({gamma + 2}) needs {need} positions but the model has "
                                  f"{model.args.max_position_embeddings}; shorten the prompt, generate fewer tokens "
                                  "or lower gamma")
            if reuse_prefill:
                self._check_prefilled(model, prompts, need)
            else:
                self._setup(model, B, max_len)

        stats = self.stats = SpecStats(cfg.method, gamma if use_draft else 0, B)
        clock = _Clock(stats, dev)
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        ids = torch.zeros(B, longest, dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, device=dev)
        with clock("prefill"):
            if not reuse_prefill:
                self.target.prefill(ids[:, :-1], lens - 1)
                if use_draft:
                    self.draft.prefill(ids[:, :-1], lens - 1)
            if self.policy is not None:
                self.policy.reset(self.target, self.draft, ids, lens - 1)

        st = _State.start(ids.gather(1, (lens - 1)[:, None]).squeeze(1), gamma)
        out: list[list[int]] = [[] for _ in range(B)]
        reasons = ["length"] * B
        stops = self._stop_tokens()
        graph, replays = None, 0
        while bool(st.live.any()):
            if graph is None and replays >= 2 and self._graphs_ok():
                graph = self._capture_step(st, gen)
            if graph is not None:
                with clock("step"):
                    graph.replay()
            else:
                self._step(st, gen, clock)
            replays += 1
            with clock("accept"):
                self._emit(st, out, reasons, stops, max_new, stats, on_tokens, lens - 1)

        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in out] if self.tokenizer else None
        return GenerationResult(out, texts, reasons, stats)

    @staticmethod
    def _check_prefilled(model: Transformer, prompts: list[list[int]], need: int) -> None:
        c = model.cache
        want = [len(p) - 1 for p in prompts]
        if c is None or c.batch != len(prompts) or c.seq_lens.tolist() != want or c.max_len < need:
            raise DustinError(f"reuse_prefill needs caches holding each prompt but its last token ({want}) with room "
                              f"for {need} positions; found {None if c is None else c.seq_lens.tolist()}")

    def _graphs_ok(self) -> bool:
        """Capture the step in a CUDA graph: on CUDA, greedy, through the Triton kernels (the torch
        references sync with the host), with a policy that never syncs."""
        cfg = self.config
        models = (self.target,) if cfg.method == "ar" else (self.target, self.draft)
        return (cfg.cuda_graphs and self.target.device.type == "cuda" and cfg.temperature == 0
                and cfg.gamma + 1 <= 16 and all(m.attention_backend == "triton" for m in models)
                and (self.policy is None or self.policy.graph_safe))

    def _capture_step(self, st: "_State", gen) -> "torch.cuda.CUDAGraph":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(st, gen, _NO_CLOCK)
        return graph

    def _step(self, st: "_State", gen, clock) -> None:
        """One decoding step for every sequence, on the device only (no host syncs when greedy without a
        guard): draft, verify, accept, commit and roll back. Results land in `st` in place."""
        gamma, live = self.config.gamma, st.live
        if self.config.method == "ar":
            with clock("verify"):
                logits = self.target.decode(st.last[:, None], float_logits=False, check=False)
            with clock("accept"):
                nxt = self._choose(logits[:, 0, : self.vocab_size], gen)
                n_acc = torch.zeros_like(nxt)
                self.target.commit(live, check=False)
        else:
            with clock("draft"):
                drafted, q = self._draft(st, gen)
            with clock("verify"):
                logits = self._verify(torch.cat([st.last[:, None], drafted], 1))
            with clock("accept"):
                # benchmarks force a given acceptance (st.forced) through the same path
                n_acc, nxt = self._accept(drafted, q, logits[..., : self.vocab_size], gen, st.forced)
                if self.policy is not None:
                    self.policy.observe_target(self.target, self._capture, n_acc, live)
                self.target.commit((n_acc + 1) * live, check=False)
                self.draft.rollback((gamma - 1 - n_acc).clamp(min=0) * live, check=False)
                st.behind.copy_(n_acc == gamma)
                st.prev.copy_(drafted[:, -1])
                st.drafted.copy_(drafted)
        st.n_acc.copy_(n_acc)
        st.last.copy_(nxt)

    def _verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """The target's pass over `[last, drafts]`: sparse when the policy selects, full otherwise or when
        its guard asks. Returns `[B, gamma + 1, V]` logits."""
        if self.policy is None:
            self._capture = None
            return self.target.decode(tokens, float_logits=False, check=False)
        indices = self.policy.select(self.target, tokens)
        self._capture = self.policy.target_capture()
        logits = self.target.decode(tokens, indices=indices, capture=self._capture, float_logits=False, check=False)
        if self.policy.needs_full(self.target, self._capture) and indices is not None:
            self.stats.guarded += 1
            logits = self.target.decode(tokens, float_logits=False, check=False)
        return logits

    def _choose(self, logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """`[B, V]` logits -> `[B]` tokens: argmax when greedy, else a sample."""
        if self.config.temperature == 0:
            return argmax(logits)
        return sample(probs_from_logits(logits, self.config.temperature, self.config.top_p), gen)

    def _draft_indices(self):
        cfg, draft = self.config, self.draft
        kv = cfg.draft_kv if cfg.draft_kv != "auto" else ("streaming" if cfg.method == "magicdec" else "full")
        if kv == "streaming":
            return streaming_indices(draft.seq_lens, budget=cfg.draft_budget, n_sink=cfg.draft_n_sink)
        if kv == "selected":
            return self.policy.draft_indices(draft)
        return None

    def _draft(self, st: "_State", gen) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Propose `gamma` tokens per sequence: `[B, gamma]` and their draft probabilities (None if greedy)."""
        cfg, draft = self.config, self.draft
        greedy = cfg.temperature == 0
        # one pass of two tokens catches up on d_gamma where needed; elsewhere the second is padding
        x = torch.where(st.behind[:, None], torch.stack([st.prev, st.last], 1), torch.stack([st.last, st.last], 1))
        n_fed = st.behind.long() + 1
        at = (n_fed - 1)[:, None]
        tokens, probs = [], []
        for i in range(cfg.gamma):
            capture = self.policy.draft_capture() if self.policy is not None else None
            logits = draft.decode(x, indices=self._draft_indices(), logits_at=at, capture=capture,
                                  float_logits=False, check=False)
            logits = logits[:, 0, : self.vocab_size]
            if capture is not None:
                self.policy.observe_draft(draft, capture, at)
            draft.commit((n_fed if i == 0 else 1) * st.live, check=False)
            if greedy:
                tok = argmax(logits)
            else:
                q = probs_from_logits(logits, cfg.temperature, cfg.top_p)
                tok = sample(q, gen)
                probs.append(q)
            tokens.append(tok)
            x, at = tok[:, None], None
        return torch.stack(tokens, 1), (torch.stack(probs, 1) if probs else None)

    def _accept(self, drafted, q, logits, gen, forced=None) -> tuple[torch.Tensor, torch.Tensor]:
        if q is None:
            return greedy_accept(drafted, logits, forced=forced)
        p = probs_from_logits(logits, self.config.temperature, self.config.top_p)
        n_acc, nxt = speculative_accept(drafted, q, p, gen)
        if forced is not None:
            return forced, argmax(logits).gather(1, forced[:, None]).squeeze(1)
        return n_acc, nxt

    def _emit(self, st: "_State", out, reasons, stops, max_new, stats, on_tokens, base: torch.Tensor) -> None:
        """Hand each live sequence its accepted drafts and the target token, cut at a stop or the limit.

        A sequence that finishes is set back to the tokens it kept (`base[b]` prompt tokens in the cache
        plus its output but the last), so the steps it still rides along in stay inside the cache.
        """
        n_host, d_host, x_host, live = st.n_acc.tolist(), st.drafted.tolist(), st.last.tolist(), st.live.tolist()
        gamma = stats.gamma
        stats.steps += 1
        for b in [b for b, alive in enumerate(live) if alive]:
            n = n_host[b]
            stats.proposed += gamma
            stats.accepted += n
            stats.per_step[n + 1] += 1
            new = (d_host[b][:n] + [x_host[b]])[: max_new - len(out[b])]
            stop_at = next((i for i, t in enumerate(new) if t in stops), None)
            if stop_at is not None:
                new, reasons[b] = new[: stop_at + 1], "stop"
            out[b].extend(new)
            stats.new_tokens += len(new)
            if stop_at is not None or len(out[b]) >= max_new:
                st.live[b] = 0
                kept = int(base[b]) + len(out[b])
                for model in (self.target, self.draft) if gamma else (self.target,):
                    model.seq_lens[b] = min(int(model.seq_lens[b]), kept)
            if on_tokens is not None:
                on_tokens(b, new)


@dataclass
class _State:
    """Per-sequence decoding state in static device buffers, updated in place by `_step`."""

    last: torch.Tensor  # [B] the newest token, not yet in either cache
    prev: torch.Tensor  # [B] d_gamma of a fully accepted step, which the draft has not seen yet
    behind: torch.Tensor  # [B] bool: the draft must catch up on `prev`
    live: torch.Tensor  # [B] 1 while the sequence generates
    drafted: torch.Tensor  # [B, gamma] this step's drafts
    n_acc: torch.Tensor  # [B] drafts accepted this step
    forced: torch.Tensor | None = None  # [B] benchmarks: accept exactly this many drafts

    @classmethod
    def start(cls, last: torch.Tensor, gamma: int) -> "_State":
        B = last.shape[0]
        zeros = torch.zeros(B, dtype=torch.long, device=last.device)
        return cls(last=last.clone(), prev=last.clone(), behind=zeros.bool(), live=torch.ones_like(zeros),
                   drafted=torch.zeros(B, gamma, dtype=torch.long, device=last.device), n_acc=zeros.clone())


class _NoClock:
    def __call__(self, phase):
        return self

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


_NO_CLOCK = _NoClock()
