"""Checkpoints to models: Hugging Face safetensors directories, GGUF files, the default pair, random shapes.

    model = load_model("default:target")                 # converted once, then loaded from the cache
    model = load_model("/path/to/hf-dir", device="cuda")  # config.json + (sharded) safetensors
    model = load_model("model.gguf")                      # dequantised on load
    model = load_model("random:qwen2.5-72b", device="cuda")  # never materialised on the CPU
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import defaults
from .config import ModelArgs
from .errors import DustinError
from .model import Transformer
from .shapes import get_shape

_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_args(source: str) -> ModelArgs:
    """The architecture of `source` without loading its weights."""
    kind, rest = _split(source)
    if kind == "random":
        return get_shape(rest)
    if kind == "default":
        return ModelArgs.from_json(defaults.ensure_converted(rest) / "config.json")
    path = Path(source)
    if path.suffix == ".gguf":
        return gguf_args(_gguf_reader(path))
    return ModelArgs.from_json(_checkpoint_dir(path) / "config.json")


def load_model(source: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
               seed: int = 0) -> Transformer:
    """Build a model from a checkpoint, the default pair (`default:draft` / `default:target`) or a named
    shape with random weights (`random:<shape>`; `seed` sets the weights). Default dtype: bf16 on CUDA,
    float32 on the CPU."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    kind, rest = _split(source)
    if kind == "random":
        return random_model(get_shape(rest), device=device, dtype=dtype, seed=seed)
    if kind == "default":
        return _load_safetensors_dir(defaults.ensure_converted(rest), device, dtype)
    path = Path(source)
    if path.suffix == ".gguf":
        reader = _gguf_reader(path)
        args = gguf_args(reader)
        return _assemble(args, gguf_state_dict(reader, args), device, dtype, path)
    return _load_safetensors_dir(_checkpoint_dir(path), device, dtype)


def load_tokenizer(source: str):
    """The tokenizer of a checkpoint directory, a GGUF file or a default model (a transformers tokenizer)."""
    from transformers import AutoTokenizer

    kind, rest = _split(source)
    if kind == "random":
        raise DustinError(f"{source!r} has random weights and no tokenizer: text needs a checkpoint with one (in "
                          "Python, token ids work with any model)")
    if kind == "default":
        return AutoTokenizer.from_pretrained(str(defaults.ensure_converted(rest)))
    path = Path(source)
    if path.suffix == ".gguf":
        _gguf_reader(path)
        try:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # transformers' GGUF tokenizer reader raises assorted errors on missing fields
            raise DustinError(f"no usable tokenizer in {path} ({e}); use a GGUF file that carries its tokenizer, "
                              "or the model's Hugging Face directory") from None
    directory = _checkpoint_dir(path)
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise DustinError(f"no usable tokenizer in {directory} ({e}); it needs tokenizer.json or the "
                          "tokenizer files of its model") from None


def _split(source: str) -> tuple[str, str]:
    for kind in ("random", "default"):
        if source.startswith(kind + ":"):
            return kind, source[len(kind) + 1:]
    return "path", source


def _checkpoint_dir(path: Path) -> Path:
    if not path.exists():
        raise DustinError(f"no such model source {str(path)!r}; give a checkpoint directory, a .gguf file, "
                          "default:draft, default:target or random:<shape>")
    if not path.is_dir():
        raise DustinError(f"{path} is neither a checkpoint directory nor a .gguf file")
    return path


# --- random weights at a named shape ---------------------------------------------------------------
def random_model(args: ModelArgs, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """Random weights created directly on `device` in `dtype` (a 72B shape never touches the CPU)."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype).to_empty(device=device)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.requires_grad_(False)  # inference only: no autograd bookkeeping
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def fuse_projections(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face's separate q/k/v and gate/up tensors -> dustin's fused `qkv_proj` and `gate_up_proj`."""
    state = dict(state)
    for i in range(n_layers):
        for fused, parts in ((f"layers.{i}.self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                             (f"layers.{i}.mlp.gate_up_proj", ("gate_proj", "up_proj"))):
            prefix = fused.rsplit(".", 1)[0]
            for kind in ("weight", "bias"):
                names = [f"{prefix}.{p}.{kind}" for p in parts]
                if all(n in state for n in names):
                    state[f"{fused}.{kind}"] = torch.cat([state.pop(n) for n in names])
    return state


def _assemble(args: ModelArgs, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
              source: Path) -> Transformer:
    state = fuse_projections(state, args.n_layers)
    with torch.device("meta"):
        model = Transformer(args)
    expected = set(model.state_dict())
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise DustinError(f"{source}: the checkpoint does not match a {args.architecture} with this config: missing "
                          f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                          f"{'...' if len(unexpected) > 5 else ''}")
    wrong = [f"{k} {tuple(state[k].shape)} (config: {tuple(ref.shape)})" for k, ref in model.state_dict().items()
             if k in state and state[k].shape != ref.shape]
    if wrong:
        raise DustinError(f"{source}: the checkpoint's tensors do not match its config: {', '.join(wrong[:3])}"
                          f"{'...' if len(wrong) > 3 else ''}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=False)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.requires_grad_(False).eval()


# --- Hugging Face safetensors ----------------------------------------------------------------------
def _load_safetensors_dir(directory: Path, device: torch.device, dtype: torch.dtype) -> Transformer:
    from safetensors import SafetensorError, safe_open

    args = ModelArgs.from_json(directory / "config.json")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except json.JSONDecodeError as e:
            raise DustinError(f"{index} is not valid JSON ({e}); the file may be truncated") from None
        except (KeyError, TypeError, AttributeError) as e:
            raise DustinError(f"{index} is not a safetensors index: it needs a weight_map from tensor names to "
                              f"file names ({type(e).__name__}: {e})") from None
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise DustinError(f"no model.safetensors or model.safetensors.index.json in {directory}")
    state = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise DustinError(f"missing weight file {path} named by the checkpoint's index")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    state[key.removeprefix("model.")] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise DustinError(f"cannot read {path} ({e}); the file is truncated or corrupt") from None
    return _assemble(args, state, device, dtype, directory)


# --- GGUF ------------------------------------------------------------------------------------------
def _gguf_reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise DustinError(f"no such GGUF file {path}")
    try:
        return GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors on a cut-off or foreign file
        raise DustinError(f"cannot read {path} as GGUF ({type(e).__name__}: {e}); the file is truncated "
                          "or not GGUF") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_args(reader) -> ModelArgs:
    """Model args from GGUF metadata (llama.cpp's keys), in the Hugging Face layout of `ModelArgs`."""
    arch = _field(reader, "general.architecture")
    hf_arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(arch)
    if hf_arch is None:
        raise DustinError(f"unsupported GGUF architecture {arch!r}; dustin reads llama and qwen2 GGUF files")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise DustinError("this GGUF stores Llama-3 RoPE scaling as a rope_freqs tensor, which dustin does not "
                          "read; load the Hugging Face checkpoint directory instead")
    sizes = {key: _field(reader, f"{arch}.{key}") for key in
             ("attention.head_count", "embedding_length", "block_count", "feed_forward_length")}
    bad = [k for k, v in sizes.items() if not isinstance(v, (int, np.integer)) or v < 1]
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if bad or embd is None:
        lacks = [f"{arch}.{k}" for k in bad] + (["the token_embd.weight tensor"] if embd is None else [])
        name = getattr(reader.data, "filename", None) or "this GGUF file"  # the reader maps its file
        raise DustinError(f"{name} lacks what dustin needs: {', '.join(lacks)}")
    n_heads, dim = int(sizes["attention.head_count"]), int(sizes["embedding_length"])
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelArgs(
        vocab_size=int(embd.shape[1]), dim=dim, n_layers=int(sizes["block_count"]),
        n_heads=n_heads, n_kv_heads=_field(reader, f"{arch}.attention.head_count_kv", n_heads),
        intermediate_size=int(sizes["feed_forward_length"]),
        head_dim=_field(reader, f"{arch}.attention.key_length", dim // n_heads),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10_000.0)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        qkv_bias="blk.0.attn_q.bias" in names, tie_word_embeddings="output.weight" not in names,
        architecture=hf_arch, bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=(eos,) if eos is not None else (),
    )


def _unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows for its rotary layout (llama architecture only)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_state_dict(reader, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Dequantised float32 tensors under dustin's (Hugging Face) parameter names."""
    from gguf import quants

    permute = args.architecture == "LlamaForCausalLM"
    state = {}
    for t in reader.tensors:
        w = quants.dequantize(t.data, t.tensor_type)
        if t.name in _GGUF_NAMES:
            name = _GGUF_NAMES[t.name]
        else:
            parts = t.name.split(".")  # blk.N.<kind>.<weight|bias>
            if parts[0] != "blk" or parts[2] not in _GGUF_LAYER_NAMES:
                raise DustinError(f"unexpected GGUF tensor {t.name!r} for a {args.architecture}")
            name = f"layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
            if permute and parts[2] in ("attn_q", "attn_k"):
                w = _unpermute_rope(w, args.n_heads if parts[2] == "attn_q" else args.n_kv_heads)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # a copy: F32 tensors are read-only views
    return state


def convert_gguf(path: Path, out: Path, *, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a Hugging Face-style directory (config.json, model.safetensors, tokenizer) from a GGUF file."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    reader = _gguf_reader(path)
    args = gguf_args(reader)
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.to(dtype).contiguous()
             for k, v in gguf_state_dict(reader, args).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2))
    del reader, state
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))
