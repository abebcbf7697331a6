"""Named real model shapes, from the public `config.json` of each model, for random-weight benchmarks."""
from __future__ import annotations

from .config import ModelArgs, RopeScaling
from .errors import DustinError

_QWEN = dict(rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True, max_position_embeddings=32768,
             architecture="Qwen2ForCausalLM", bos_token_id=151643, eos_token_id=(151645,))
_LLAMA31 = dict(rope_theta=500_000.0, norm_eps=1e-5, max_position_embeddings=131072,
                architecture="LlamaForCausalLM", bos_token_id=128000, eos_token_id=(128001, 128008, 128009))

SHAPES: dict[str, ModelArgs] = {
    "qwen2.5-0.5b": ModelArgs(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                              intermediate_size=4864, tie_word_embeddings=True, **_QWEN),
    "qwen2.5-1.5b": ModelArgs(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                              intermediate_size=8960, tie_word_embeddings=True, **_QWEN),
    "qwen2.5-7b": ModelArgs(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                            intermediate_size=18944, **_QWEN),
    "qwen2.5-14b": ModelArgs(vocab_size=152064, dim=5120, n_layers=48, n_heads=40, n_kv_heads=8,
                             intermediate_size=13824, **_QWEN),
    "qwen2.5-32b": ModelArgs(vocab_size=152064, dim=5120, n_layers=64, n_heads=40, n_kv_heads=8,
                             intermediate_size=27648, **_QWEN),
    "qwen2.5-72b": ModelArgs(vocab_size=152064, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                             intermediate_size=29568, **_QWEN),
    "llama-3.1-8b": ModelArgs(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                              intermediate_size=14336, rope_scaling=RopeScaling(factor=8.0), **_LLAMA31),
    "llama-3.2-1b": ModelArgs(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                              intermediate_size=8192, head_dim=64, tie_word_embeddings=True,
                              rope_scaling=RopeScaling(factor=32.0), **_LLAMA31),
    "llama-3.3-70b": ModelArgs(vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                               intermediate_size=28672, rope_scaling=RopeScaling(factor=8.0), **_LLAMA31),
}


def get_shape(name: str) -> ModelArgs:
    try:
        return SHAPES[name.lower()]
    except KeyError:
        raise DustinError(f"unknown model shape {name!r}; known shapes: {', '.join(SHAPES)}") from None
