"""Configuration dataclasses: the model's architecture, read from a Hugging Face `config.json`."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import DustinError

# how few-row decode passes (a draft's steps) run their linear layers: `Transformer.linear_backend`
LINEAR_BACKENDS = {
    "auto": "triton for a model of hidden size up to 1024, else down: the faster of the two end to end on the "
            "H200 (benchmarks/gpu/e2e.json: the Qwen2.5-0.5B draft gains with triton, Llama-3.2-1B loses)",
    "torch": "cuBLAS for every linear layer",
    "down": "cuBLAS, but the down projection in the fused few-row kernel with the residual add in its "
            "epilogue (no split-K reduce launch)",
    "triton": "every linear layer in the fused few-row kernel, norms, SiLU and residual adds folded in",
}
# what those fused few-row kernels read: `Transformer.few_row_weights`
FEW_ROW_WEIGHTS = ("native", "fp8")


def resolve_linear_backend(name: str, dim: int) -> str:
    """`LINEAR_BACKENDS` name -> the backend a model of hidden size `dim` runs ("auto" resolved)."""
    if name not in LINEAR_BACKENDS:
        raise DustinError(f"unknown linear backend {name!r}; choose one of {', '.join(LINEAR_BACKENDS)}")
    if name == "auto":
        return "triton" if dim <= 1024 else "down"
    return name


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent RoPE scaling (`rope_type: llama3`); `factor == 1` means none."""

    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of one Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0: dim // n_heads
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False  # Llama's `attention_bias` also biases o_proj; Qwen2 biases q/k/v only
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise DustinError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs whole groups"
            )

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        if self.o_bias:
            attn += self.dim
        mlp = 3 * self.dim * self.intermediate_size
        per_layer = attn + mlp + 2 * self.dim
        embed = self.vocab_size * self.dim * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * per_layer + embed + self.dim

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V for one token of one sequence, over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Build from a parsed Hugging Face `config.json` (transformers 4 or 5 layout)."""
        archs = cfg.get("architectures") or [_arch_from_model_type(cfg.get("model_type"))]
        if isinstance(archs, str):  # a hand-written config may give the one name bare
            archs = [archs]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise DustinError(
                f"unsupported architecture {arch!r}; dustin runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers 5 moved rope settings under `rope_parameters`; 4 kept `rope_theta` + `rope_scaling`.
        rope = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))
        scaling_src = rope if rope.get("rope_type", rope.get("type")) not in (None, "default") else legacy
        rope_type = scaling_src.get("rope_type", scaling_src.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(scaling_src["factor"]),
                low_freq_factor=float(scaling_src.get("low_freq_factor", 1.0)),
                high_freq_factor=float(scaling_src.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(scaling_src.get("original_max_position_embeddings", 8192)),
            )
        elif rope_type not in ("default", None):
            raise DustinError(f"unsupported RoPE scaling {rope_type!r}; dustin supports default and llama3")
        sizes = {k: cfg.get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "intermediate_size")}
        sizes.update({k: cfg[k] for k in ("num_key_value_heads", "head_dim") if cfg.get(k) is not None})
        bad = [f"{k} ({json.dumps(v) if k in cfg else 'missing'})" for k, v in sizes.items()
               if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1)]
        if bad:
            raise DustinError(f"{', '.join(bad)}: model sizes must be positive integers; the config may be damaged "
                              "or not a Llama, Qwen2 or Mistral config.json")
        n_heads = cfg["num_attention_heads"]
        if cfg.get("head_dim") is None and cfg["hidden_size"] < n_heads:
            raise DustinError(f"hidden_size {cfg['hidden_size']} is smaller than num_attention_heads {n_heads}: no "
                              "head dimension is left; the config may be damaged")
        is_qwen2 = arch == "Qwen2ForCausalLM"
        window = cfg.get("sliding_window")
        if is_qwen2 and not cfg.get("use_sliding_window", False):
            window = None
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            intermediate_size=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            rope_theta=float(theta),
            rope_scaling=scaling,
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=bool(cfg.get("attention_bias", is_qwen2)),
            o_bias=bool(cfg.get("attention_bias", False)) and not is_qwen2,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            sliding_window=window,
            architecture=arch,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise DustinError(f"missing config file {path}; a checkpoint directory needs its config.json") from None
        except json.JSONDecodeError as e:
            raise DustinError(f"{path} is not valid JSON ({e}); the file may be truncated") from None
        if not isinstance(cfg, dict):
            raise DustinError(f"{path} holds a JSON {type(cfg).__name__}, not a model config; a checkpoint needs a "
                              "Hugging Face config.json")
        try:
            args = cls.from_hf_config(cfg)
        except DustinError as e:
            raise DustinError(f"{path}: {e}") from None
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            what = f"no {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise DustinError(f"{path} is not a model config dustin can read ({what}); it needs a Hugging Face "
                              "config.json of a Llama, Qwen2 or Mistral model") from None
        return args

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers-4-style `config.json` dict, readable by transformers 4 and 5 and by `from_hf_config`."""
        model_type = {"Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}.get(self.architecture, "llama")
        cfg: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }
        if model_type != "qwen2":
            cfg["attention_bias"] = self.qkv_bias or self.o_bias
        if self.rope_scaling is not None:
            cfg["rope_scaling"] = {"rope_type": "llama3", **asdict(self.rope_scaling)}
        if self.bos_token_id is not None:
            cfg["bos_token_id"] = self.bos_token_id
        if self.eos_token_id:
            cfg["eos_token_id"] = list(self.eos_token_id) if len(self.eos_token_id) > 1 else self.eos_token_id[0]
        if self.sliding_window is not None:
            cfg["sliding_window"] = self.sliding_window
            if model_type == "qwen2":
                cfg["use_sliding_window"] = True
        return cfg


def _arch_from_model_type(model_type: str | None) -> str:
    return {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}.get(
        model_type or "", f"unknown model_type {model_type!r}"
    )


SPEC_METHODS = ("ar", "sd", "magicdec", "dustin")


@dataclass
class SpecConfig:
    """How `Generator` decodes.

    method: `ar` (target alone), `sd` (full-KV draft, full verification), `magicdec` (draft reads a
    StreamingLLM set of sinks + recent tokens, full verification), `dustin` (sparse verification).
    """

    method: str = "sd"
    gamma: int = 4  # draft tokens per step
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 128
    stop_tokens: tuple[int, ...] | None = None  # None: the models' and tokenizer's EOS tokens
    draft_budget: int = 512  # magicdec: KV entries the draft reads (n_sink sinks + the most recent)
    draft_n_sink: int = 4
    max_len: int | None = None  # cache capacity per sequence; None: longest prompt + max_new_tokens + slack
    draft_kv: str = "auto"  # what the draft reads: full | streaming | selected (dustin's set + recent); auto:
    # streaming for magicdec, else full
    cuda_graphs: bool = True  # on CUDA, replay greedy steps from a captured graph
    draft_linear: str = "auto"  # the draft's linear layers: torch (cuBLAS) | down (cuBLAS, the down projection
    # and its residual add in `dustin.linear`'s kernel) | triton (every one in the fused few-row kernels) | auto
    # (the faster of triton and down for the draft's size, benchmarks/gpu/e2e.json): `LINEAR_BACKENDS`
    draft_weights: str = "native"  # what the draft's few-row passes read: native | fp8 (copies with a scale per
    # channel, half the bytes, the LM head's too; on CUDA it needs draft_linear="triton"; slower on the H200,
    # benchmarks/gpu/e2e.json). Proposals may change, the acceptance rules do not

    def validate(self) -> None:
        if self.method not in SPEC_METHODS:
            raise DustinError(f"unknown method {self.method!r}; choose one of {', '.join(SPEC_METHODS)}")
        if self.gamma < 1:
            raise DustinError(f"gamma must be >= 1 (draft tokens per step), got {self.gamma}")
        if not self.temperature >= 0 or math.isinf(self.temperature):  # NaN fails the first test
            raise DustinError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DustinError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise DustinError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.draft_kv not in ("auto", "full", "streaming", "selected"):
            raise DustinError(f"draft_kv must be auto, full, streaming or selected, got {self.draft_kv!r}")
        if self.draft_kv == "selected" and self.method != "dustin":
            raise DustinError("draft_kv='selected' reads the verification index set, so it needs method='dustin'")
        if self.draft_linear not in LINEAR_BACKENDS:
            raise DustinError(f"draft_linear must be one of {', '.join(LINEAR_BACKENDS)}, got {self.draft_linear!r}")
        if self.draft_weights not in FEW_ROW_WEIGHTS:
            raise DustinError(f"draft_weights must be one of {', '.join(FEW_ROW_WEIGHTS)}, got {self.draft_weights!r}")
        if self.draft_budget <= self.draft_n_sink or self.draft_n_sink < 0:
            raise DustinError(f"draft_budget ({self.draft_budget}) must exceed draft_n_sink ({self.draft_n_sink}) >= 0")


POLICIES = ("full", "dustin", "history", "lookahead", "oracle", "streaming", "snapkv", "quest")


@dataclass
class SelectionConfig:
    """Which target KV entries a verification pass reads, and how they are chosen.

    The Dustin split: `n_sink` first positions + `n_recent` last positions + top-`m` of the draft's
    lookahead score + the rest of `budget` from the target's history score. Scores come from the
    (layer -> heads) maps `target_heads` and `draft_heads` only.
    """

    policy: str = "dustin"
    budget: int = 512
    n_sink: int = 4
    n_recent: int = 16
    m: int = 128  # the draft's share of the budget
    target_heads: dict[int, list[int]] = field(default_factory=dict)
    draft_heads: dict[int, list[int]] = field(default_factory=dict)
    history_query: str = "last"  # "last": the last committed token's query; "accepted": all accepted queries
    adaptive: bool = False  # adjust m per sequence from what the last steps showed
    adapt_rate: float = 0.5  # weight of the newest step's best split in the running m
    adapt_grid: int = 9  # candidate splits evaluated per step
    guard: float | None = None  # re-verify with the full cache when estimated recovery falls below this
    oracle_shared: bool = False  # oracle: one set for all layers instead of one per layer and KV head
    page_size: int = 16  # quest
    snapkv_window: int = 32  # snapkv: observation window at the end of the prompt
    snapkv_kernel: int = 7  # snapkv: pooling width over positions

    @property
    def fixed(self) -> int:
        return self.n_sink + self.n_recent

    def validate(self) -> None:
        if self.policy not in POLICIES:
            raise DustinError(f"unknown selection policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.n_sink < 0 or self.n_recent < 1:
            raise DustinError(f"n_sink must be >= 0 and n_recent >= 1, got {self.n_sink} and {self.n_recent}")
        if self.budget <= self.fixed:
            raise DustinError(f"budget ({self.budget}) must exceed n_sink + n_recent ({self.fixed})")
        if self.policy == "dustin" and not 0 <= self.m <= self.budget - self.fixed:
            raise DustinError(f"m must be between 0 and budget - n_sink - n_recent = {self.budget - self.fixed}, "
                              f"got {self.m}")
        if self.history_query not in ("last", "accepted"):
            raise DustinError(f"history_query must be 'last' or 'accepted', got {self.history_query!r}")
        if self.policy == "quest" and self.budget % self.page_size:
            raise DustinError(f"quest needs a budget that is a multiple of page_size ({self.page_size})")
        if self.guard is not None and not 0 < self.guard < 1:
            raise DustinError(f"guard is a recovery threshold in (0, 1), got {self.guard}")
        needs = {"dustin": "target_heads and draft_heads", "history": "target_heads", "lookahead": "draft_heads"}
        if self.policy in needs:
            if self.policy != "lookahead" and not self.target_heads:
                raise DustinError(f"policy {self.policy!r} needs {needs[self.policy]}; load a tuned config "
                                  "(dustin tune) or give the heads")
            if self.policy != "history" and not self.draft_heads:
                raise DustinError(f"policy {self.policy!r} needs {needs[self.policy]}; load a tuned config "
                                  "(dustin tune) or give the heads")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_heads"] = {str(k): v for k, v in self.target_heads.items()}
        d["draft_heads"] = {str(k): v for k, v in self.draft_heads.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SelectionConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise DustinError(f"unknown selection settings {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for key in ("target_heads", "draft_heads"):
            d[key] = {int(k): [int(h) for h in v] for k, v in d.get(key, {}).items()}
        return cls(**d)
