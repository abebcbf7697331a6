"""One Llama-family decoder (Llama 2/3, Qwen2/2.5 with qkv bias, Mistral) that owns its KV cache.

Target and draft are the same class. Three ways to run it:
- `model(input_ids)`: a plain causal forward with no cache, `[B, T] -> [B, T, V]` logits;
- `model.prefill(input_ids, lengths)`: chunked prefill of ragged prompts into the cache;
- `model.decode(input_ids)`: `T` new tokens per sequence at each sequence's own position, reading
  the whole cache or, with `indices`, only the selected entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import fused as fused_ops
from .attention import attend, attend_rope, resolve_backend
from .cache import KVCache, available_memory, estimate_memory
from .config import FEW_ROW_WEIGHTS, ModelArgs, resolve_linear_backend
from .errors import DustinError
from .linear import FP8, MAX_ROWS, dequantize_fp8, linear, quantize_fp8


def _project(lin: nn.Linear, x: torch.Tensor, step: "_Step | None") -> torch.Tensor:
    """`lin(x)`, or in a few-row pass of a model with fp8 few-row weights, the same with the weight its
    fp8 copy stands for (what the fused kernels compute, through F.linear)."""
    if step is None or not step.fp8:
        return lin(x)
    if x.is_cuda:  # a full-size dequantised copy per weight would cost memory and gain nothing
        raise DustinError("fp8 few-row weights on CUDA are read by the fused few-row kernels only; use "
                          "linear_backend 'triton' (--draft-linear triton) with the triton attention backend")
    if not hasattr(lin, "weight_dequant"):  # made on first use: the fused kernels never need it
        fp8 = _fused_weight(lin, True)
        lin.register_buffer("weight_dequant", dequantize_fp8(fp8["weight"], fp8["weight_scale"], lin.weight.dtype),
                            persistent=False)
    return F.linear(x, lin.weight_dequant, lin.bias)


def _fused_weight(lin: nn.Linear, fp8: bool) -> dict:
    """`linear`'s weight arguments for `lin`: in a pass that reads fp8 weights (`_Step.fp8`) its fp8 copy
    and scales (`Transformer.few_row_weights`), else its own weight."""
    w8 = getattr(lin, "weight_fp8", None)
    if not fp8 or w8 is None:
        return {"weight": lin.weight}
    if w8.dtype != FP8 or lin.weight_scale.dtype != torch.float32:
        raise DustinError("the fp8 weight copies were cast (a .to(dtype) after few_row_weights was set); set "
                          "model.few_row_weights = 'native' and then 'fp8' again")
    return {"weight": w8, "weight_scale": lin.weight_scale}


@dataclass
class QueryCapture:
    """Asks `decode` to keep the post-RoPE queries of some heads: `{layer: [head, ...]}`.

    After the pass, `q[layer]` is `[B, len(heads), T, head_dim]`.
    """

    heads: dict[int, list[int]]
    q: dict[int, torch.Tensor] = field(default_factory=dict)

    def at(self, index: torch.Tensor) -> "QueryCapture":
        """The captured queries at per-sequence token indices `index` `[B, K]`: each `q[layer]` becomes
        `[B, len(heads), K, head_dim]`."""
        idx = index.long()[:, None, :, None]
        return QueryCapture(self.heads, {layer: q.gather(2, idx.expand(-1, q.shape[1], -1, q.shape[3]))
                                         for layer, q in self.q.items()})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, residual: torch.Tensor, delta: torch.Tensor | None, fused: bool):
        """residual (+ delta), normalised: returns (normalised, new residual)."""
        if fused:
            return fused_ops.add_rmsnorm(residual, delta, self.weight, self.eps)
        return fused_ops.add_rmsnorm_reference(residual, delta, self.weight, self.eps)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """`[head_dim // 2]` inverse frequencies, with Llama-3 scaling when the config asks for it."""
    inv = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim)
    s = args.rope_scaling
    if s is None or s.factor == 1.0:
        return inv
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, args.n_heads, args.n_kv_heads, args.head_dim
        # q, k and v in one projection: one GEMM per layer instead of three
        self.qkv_proj = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: "_Step | None") -> torch.Tensor:
        B, T, _ = x.shape
        qkv = _project(self.qkv_proj, x, step)
        if step is None:
            q, k, v = fused_ops.split_heads(qkv, self.n_heads, self.n_kv_heads, self.head_dim)
            q, k = fused_ops.rope_reference(q, cos, sin), fused_ops.rope_reference(k, cos, sin)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        return _project(self.o_proj, self.cached(qkv, cos, sin, step), step)

    def cached(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: "_Step") -> torch.Tensor:
        """`[B, T, (Hq + 2 Hkv) D]` projections -> `[B, T, Hq D]` attention output over the cache, with
        this pass's K/V written into it."""
        B, T, _ = qkv.shape
        cache = step.cache
        capture = step.capture is not None and self.layer in step.capture.heads
        if step.fused and torch.is_tensor(step.indices) and not capture:
            # nobody needs q itself: RoPE, the cache write and the attention in one launch
            # after our own fused projection (launched with PDL) the first tile's gather overlaps its tail
            out = attend_rope(qkv, cos[:, 0], sin[:, 0], step.positions, cache.k[self.layer], cache.v[self.layer],
                              cache.seq_lens, step.indices, self.n_heads, early_gather=step.linear == "triton")
            return out.transpose(1, 2).reshape(B, T, -1)
        if step.fused:
            q = fused_ops.rope_write(qkv, cos, sin, step.positions, cache.k[self.layer], cache.v[self.layer],
                                     self.n_heads, self.n_kv_heads)
        else:
            q, k, v = fused_ops.split_heads(qkv, self.n_heads, self.n_kv_heads, self.head_dim)
            q, k = fused_ops.rope_reference(q, cos, sin), fused_ops.rope_reference(k, cos, sin)
            cache.write(self.layer, k, v, step.positions)
        if capture:
            step.capture.q[self.layer] = q.index_select(1, step.head_index(step.capture.heads[self.layer]))
        indices = step.indices(self.layer, q) if callable(step.indices) else step.indices
        out = attend(q, cache.k[self.layer], cache.v[self.layer], cache.seq_lens, indices=indices, backend=step.backend)
        return out.transpose(1, 2).reshape(B, T, -1)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)  # one GEMM, not two
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def hidden(self, x: torch.Tensor, fused: bool, step: "_Step | None" = None) -> torch.Tensor:
        """SiLU(gate) * up: the down projection's input."""
        gate_up = _project(self.gate_up_proj, x, step)
        return fused_ops.silu_mul(gate_up) if fused else fused_ops.silu_mul_reference(gate_up)

    def forward(self, x: torch.Tensor, fused: bool, step: "_Step | None" = None) -> torch.Tensor:
        return _project(self.down_proj, self.hidden(x, fused, step), step)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, residual: torch.Tensor, delta: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                step: "_Step | None") -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the residual stream and the previous block's pending output; returns the same pair, so
        each residual add rides in the next RMSNorm's kernel."""
        if step is not None and step.linear == "triton":
            return self._small(residual if delta is None else residual + delta, cos, sin, step), None
        fused = step is not None and step.fused
        h, residual = self.input_layernorm(residual, delta, fused)
        h, residual = self.post_attention_layernorm(residual, self.self_attn(h, cos, sin, step), fused)
        if step is not None and step.linear == "down":
            return linear(self.mlp.hidden(h, fused, step), **_fused_weight(self.mlp.down_proj, step.fp8),
                          residual=residual, check=False), None
        return residual, self.mlp(h, fused, step)

    def _small(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: "_Step") -> torch.Tensor:
        """The block in four fused linear kernels (the norms, SiLU and the residual adds folded in) plus
        RoPE and attention: a few-row pass is bound by launches, not bytes."""
        attn, mlp, eps = self.self_attn, self.mlp, self.input_layernorm.eps
        fp8 = step.fp8
        qkv = linear(h, **_fused_weight(attn.qkv_proj, fp8), bias=attn.qkv_proj.bias,
                     norm_weight=self.input_layernorm.weight, eps=eps, check=False)
        h = linear(attn.cached(qkv, cos, sin, step), **_fused_weight(attn.o_proj, fp8), bias=attn.o_proj.bias,
                   residual=h, check=False)
        act = linear(h, **_fused_weight(mlp.gate_up_proj, fp8), norm_weight=self.post_attention_layernorm.weight,
                     eps=self.post_attention_layernorm.eps, silu=True, check=False)
        return linear(act, **_fused_weight(mlp.down_proj, fp8), residual=h, check=False)


@dataclass
class _Step:
    """What one cached pass hands every layer."""

    cache: KVCache
    positions: torch.Tensor  # [B, T]; padding tokens of a ragged chunk point at the scratch slot
    indices: object  # None, a [B, budget] / [B, Hkv, budget] tensor, or a callable (layer, q) -> indices
    capture: QueryCapture | None
    backend: str
    fused: bool  # the fused Triton layer ops (CUDA with the triton backend)
    linear: str  # the linear backend this pass uses: "torch" unless a few-row fused pass (`LINEAR_BACKENDS`)
    head_index: object  # heads -> a cached device index tensor (no host-to-device copy inside a graph)
    fp8: bool = False  # a few-row pass of a model with fp8 few-row weights: its projections read those


class Transformer(nn.Module):
    """Llama-family causal LM. Parameter names follow the Hugging Face checkpoints (minus `model.`),
    except that q/k/v and gate/up are fused (`qkv_proj`, `gate_up_proj`); the loader concatenates them."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.cache: KVCache | None = None
        self.attn_backend = "auto"
        self.linear_backend = "torch"
        self._few_row_weights = "native"
        self._rope_len = 0
        self._head_indices: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def linear_backend(self) -> str:
        """How few-row passes (a draft's decode steps) run their linear layers: one of `LINEAR_BACKENDS`,
        "auto" resolved for this model's size when set."""
        return self._linear_backend

    @linear_backend.setter
    def linear_backend(self, value: str) -> None:
        self._linear_backend = resolve_linear_backend(value, self.args.dim)

    @property
    def few_row_weights(self) -> str:
        """What the projections of a few-row pass (`decode` of at most `MAX_ROWS` rows: a draft's steps)
        read: "native" weights, or "fp8" copies with a scale per output channel (`linear.quantize_fp8`),
        the LM head's included. On CUDA the fused few-row kernels read the fp8 bytes, half the native
        ones, so every projection must run in them (`linear_backend` "triton"); elsewhere F.linear reads
        what they stand for (equal up to rounding to the model's dtype). A prompt's prefill and larger
        passes read the native weights. A draft's proposals may change with it, never what speculative
        decoding accepts. Setting it (again) quantises the weights as they are then."""
        return self._few_row_weights

    @few_row_weights.setter
    def few_row_weights(self, value: str) -> None:
        if value not in FEW_ROW_WEIGHTS:
            raise DustinError(f"unknown few-row weights {value!r}; choose one of {', '.join(FEW_ROW_WEIGHTS)}")
        linears = [m for block in self.layers for m in (block.self_attn.qkv_proj, block.self_attn.o_proj,
                                                         block.mlp.gate_up_proj, block.mlp.down_proj)]
        for lin in linears + [self.lm_head]:
            for name in ("weight_fp8", "weight_scale", "weight_dequant"):  # made again from the weights now
                if hasattr(lin, name):
                    delattr(lin, name)
            if value == "fp8":
                w8, scale = quantize_fp8(lin.weight)
                lin.register_buffer("weight_fp8", w8, persistent=False)  # not part of the checkpoint
                lin.register_buffer("weight_scale", scale, persistent=False)
        self._few_row_weights = value

    @property
    def attention_backend(self) -> str:
        """`attn_backend` ("auto", "torch" or "triton") resolved for this model's device and head dim."""
        return resolve_backend(self.attn_backend, self.device, self.args.head_dim)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, T]` positions -> cos, sin `[B, 1, T, head_dim]` in float32, from the table."""
        return self._cos[positions][:, None], self._sin[positions][:, None]

    def _grow_rope(self, length: int) -> None:
        inv = rope_frequencies(self.args).to(self.device)
        freqs = torch.outer(torch.arange(length, device=self.device, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos, self._sin, self._rope_len = emb.cos(), emb.sin(), length

    def _head_index(self, heads: list[int]) -> torch.Tensor:
        key = tuple(heads)
        if key not in self._head_indices:
            self._head_indices[key] = torch.tensor(key, device=self.device)
        return self._head_indices[key]

    def _check_length(self, length: int) -> None:
        a = self.args
        if length > a.max_position_embeddings:
            raise DustinError(
                f"{length} positions requested but the model has {a.max_position_embeddings}; "
                "shorten the prompt or lower max_new_tokens"
            )
        if a.sliding_window is not None and length > a.sliding_window:
            raise DustinError(
                f"{length} positions exceed the model's sliding window of {a.sliding_window}, which dustin does "
                "not implement; keep sequences within the window"
            )

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor, step: _Step | None,
             logits_at: torch.Tensor | None, float_logits: bool = True) -> torch.Tensor:
        cos, sin = self._rope(positions)
        residual, delta = self.embed_tokens(input_ids), None
        for layer in self.layers:
            residual, delta = layer(residual, delta, cos, sin, step)
        if logits_at is not None:
            at = logits_at[:, :, None].expand(-1, -1, residual.shape[-1])
            residual, delta = residual.gather(1, at), (delta.gather(1, at) if delta is not None else None)
        h, _ = self.norm(residual, delta, step is not None and step.fused)
        if step is not None and step.fp8 and step.linear != "torch":
            logits = linear(h, **_fused_weight(self.lm_head, True), check=False)
        else:
            logits = _project(self.lm_head, h, step)
        return logits.float() if float_logits else logits

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Plain causal forward without cache: input_ids `[B, T]` -> logits `[B, T, V]` (float32)."""
        B, T = input_ids.shape
        self._check_length(T)
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if T > self._rope_len:
            self._grow_rope(T)
        return self._run(input_ids, positions, None, None)

    # --- the cache -------------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None) -> KVCache:
        """Allocate a static cache for `batch` sequences of up to `max_len` tokens each."""
        if batch < 1 or max_len < 1:
            raise DustinError(f"cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        self._check_length(max_len)
        dtype = dtype or self.dtype
        need = estimate_memory(self.args, batch=batch, context=max_len, dtype=dtype, include_weights=False)
        free = available_memory(self.device) + (self._cache_bytes() if self.cache is not None else 0)
        if need.kv_cache > free:
            raise DustinError(
                f"a KV cache for batch {batch} x {max_len} tokens needs {need.kv_cache / 2**30:.2f} GiB "
                f"but only {free / 2**30:.2f} GiB is free on {self.device}; lower the batch or the context"
            )
        self.cache = None  # free the old cache before allocating the new one
        self.cache = KVCache(self.args, batch=batch, max_len=max_len, dtype=dtype, device=self.device)
        self._grow_rope(max_len + KVCache.SCRATCH)
        return self.cache

    def _cache_bytes(self) -> int:
        return 2 * self.cache.k.numel() * self.cache.k.element_size()

    def _require_cache(self) -> KVCache:
        if self.cache is None:
            raise DustinError("this model has no KV cache; call model.setup_cache(batch, max_len) first")
        return self.cache

    @property
    def seq_lens(self) -> torch.Tensor:
        return self._require_cache().seq_lens

    def commit(self, n: torch.Tensor | int, *, check: bool = True) -> None:
        self._require_cache().commit(n, check=check)

    def rollback(self, n: torch.Tensor | int, *, check: bool = True) -> None:
        self._require_cache().rollback(n, check=check)

    def decode(self, input_ids: torch.Tensor, *, indices=None, valid: torch.Tensor | None = None,
               logits_at: torch.Tensor | None = None, capture: QueryCapture | None = None,
               float_logits: bool = True, check: bool = True, prefilling: bool = False) -> torch.Tensor:
        """Run `T` new tokens per sequence at positions `seq_lens[b] + t`, writing their K/V (uncommitted).

        input_ids: `[B, T]`; indices: None (whole cache), `[B, budget]` / `[B, Hkv, budget]` positions,
        or a callable `(layer, q) -> indices`; valid: `[B, T]` bool marks real tokens in a ragged
        chunk; logits_at: `[B, K]` token offsets whose logits to return. Returns `[B, T or K, V]` logits,
        float32, or in the model's dtype with `float_logits=False` (a greedy decoder only takes their argmax,
        and a vocabulary-wide float32 copy per row costs as much as the argmax). `prefilling`: a prompt's
        chunk, which reads the native weights whatever its size (`few_row_weights`).
        """
        cache = self._require_cache()
        B, T = input_ids.shape
        if check:
            if B != cache.batch:
                raise DustinError(f"input batch {B} does not match the cache's batch {cache.batch}")
            top = int(cache.seq_lens.max()) + T
            if top > cache.max_len:
                raise DustinError(
                    f"decoding {T} tokens would reach position {top} but the cache holds {cache.max_len}; "
                    "setup a larger cache or generate fewer tokens"
                )
        positions = cache.positions(T)
        if valid is not None:  # padding goes to the scratch slot, which the rope table also covers
            positions = torch.where(valid, positions, cache.max_len)
        backend = self.attention_backend
        fused = backend == "triton" and T <= 16
        linear_backend = self.linear_backend if fused and B * T <= MAX_ROWS else "torch"
        step = _Step(cache, positions, indices, capture, backend, fused, linear_backend, self._head_index,
                     fp8=self._few_row_weights == "fp8" and B * T <= MAX_ROWS and not prefilling)
        return self._run(input_ids, positions, step, logits_at, float_logits)

    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None, *,
                chunk_size: int | None = None) -> torch.Tensor:
        """Append ragged prompts to the cache in chunks and commit them.

        input_ids: `[B, T]` right-padded; lengths: `[B]` real lengths (default: all `T`). Chunks keep
        the attention scores at `chunk x context`, never `context^2`. Returns the logits `[B, V]` of
        each sequence's last real token (a sequence with length 0 gets zeros).
        """
        cache = self._require_cache()
        B, T = input_ids.shape
        dev = input_ids.device
        lengths = torch.full((B,), T, device=dev) if lengths is None else torch.as_tensor(lengths, device=dev).long()
        if lengths.shape != (B,) or bool((lengths < 0).any()) or bool((lengths > T).any()):
            raise DustinError(f"lengths must be [B] with 0 <= length <= {T}, got {lengths.tolist()}")
        top = int((cache.seq_lens.long() + lengths).max())
        self._check_length(top)
        if top > cache.max_len:
            raise DustinError(f"prompts reach position {top} but the cache holds {cache.max_len}; "
                              "setup a larger cache or shorten the prompt")
        chunk = chunk_size or self._default_chunk(top)
        last = torch.zeros(B, self.args.vocab_size, device=dev)
        for start in range(0, T, chunk):
            ids = input_ids[:, start:start + chunk]
            n_valid = (lengths - start).clamp(0, ids.shape[1])
            valid = torch.arange(ids.shape[1], device=dev)[None] < n_valid[:, None]
            logits = self.decode(ids, valid=valid, logits_at=(n_valid - 1).clamp(min=0)[:, None], check=False,
                                 prefilling=True)
            ends_here = (n_valid > 0) & (lengths <= start + chunk)
            last = torch.where(ends_here[:, None], logits[:, 0], last)
            cache.commit(n_valid, check=False)
        return last

    def _default_chunk(self, context: int) -> int:
        # keep one layer's scores (heads x chunk x context floats) near 256 MiB on the reference path
        return max(16, min(2048, (1 << 26) // max(1, self.args.n_heads * context)))
