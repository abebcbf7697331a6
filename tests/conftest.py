import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # run the Triton kernels in Triton's interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_hf_config(kind: str, **overrides):
    """A small transformers config of a supported family."""
    import transformers

    common = dict(vocab_size=257, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "rope_theta": 1e6, "tie_word_embeddings": True, **overrides})
    elif kind == "llama":
        cfg = transformers.LlamaConfig(**{**common, "rope_theta": 5e5, "tie_word_embeddings": False, **overrides})
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**{**common, "sliding_window": None, **overrides})
    else:
        raise ValueError(kind)
    return cfg


def save_tiny_hf(tmp_path, kind: str, seed: int = 0, **overrides):
    """Random tiny HF model saved as a safetensors directory; returns (directory, hf_model)."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_hf_config(kind, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():  # default init leaves biases at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / f"{kind}-{seed}"
    model.save_pretrained(out)
    return out, model


@pytest.fixture
def tiny_qwen(tmp_path):
    return save_tiny_hf(tmp_path, "qwen2")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def tiny_args(**overrides):
    from dustin import ModelArgs

    base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48,
                rope_theta=10_000.0, max_position_embeddings=4096, qkv_bias=True)
    return ModelArgs(**{**base, **overrides})


def tiny_model(seed=0, **overrides):
    """A tiny random float32 model on the CPU, with weights large enough to give peaked distributions."""
    from dustin.loading import random_model

    model = random_model(tiny_args(**overrides), device=torch.device("cpu"), dtype=torch.float32, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(8.0)
    return model


def perturbed_copy(model, scale, seed=1):
    """A draft that mostly agrees with `model`: same weights plus noise."""
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g).to(p.device))
    draft.cache = None
    return draft
