"""The model against transformers' own modelling code, and the cached paths against the plain forward."""
import json

import pytest
import torch

from conftest import rel_err, save_tiny_hf
from dustin import DustinError, ModelArgs, load_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

VARIANTS = {
    "qwen2-gqa-bias-tied": ("qwen2", {}),
    "qwen2-untied-mha": ("qwen2", {"tie_word_embeddings": False, "num_key_value_heads": 8}),
    "llama-gqa-untied": ("llama", {}),
    "llama3-rope-scaling-tied": ("llama", {"rope_scaling": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "llama-attention-bias-mqa": ("llama", {"attention_bias": True, "num_key_value_heads": 1}),
    "mistral-head-dim": ("mistral", {"head_dim": 16}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(tmp_path, variant):
    kind, overrides = VARIANTS[variant]
    path, hf = save_tiny_hf(tmp_path, kind, **overrides)
    model = load_model(str(path))
    ids = torch.randint(0, 257, (2, 150))  # longer than original_max_position_embeddings
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
    assert rel_err(out, ref) < 1e-5


def test_transformers4_config_layout(tmp_path):
    path, hf = save_tiny_hf(tmp_path, "llama", rope_scaling=LLAMA3_ROPE)
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (path / "config.json").write_text(json.dumps(cfg))
    args = ModelArgs.from_json(path / "config.json")
    assert args.rope_theta == 5e5 and args.rope_scaling.factor == 8.0
    ids = torch.randint(0, 257, (1, 100))
    with torch.no_grad():
        assert rel_err(load_model(str(path))(ids), hf(ids).logits) < 1e-5


def test_hf_config_round_trip():
    from dustin.shapes import SHAPES

    for args in SHAPES.values():
        assert ModelArgs.from_hf_config(args.to_hf_config()) == args


def _prefill_decode(model, ids, lengths, n_decode, chunk):
    """Prefill ragged prompts, then decode `n_decode` tokens of each row one chunk at a time."""
    B = ids.shape[0]
    model.setup_cache(B, 256)
    prompt = torch.zeros(B, int(lengths.max()), dtype=torch.long)
    for b in range(B):
        prompt[b, : lengths[b]] = ids[b, : lengths[b]]
    first = model.prefill(prompt, lengths, chunk_size=chunk)
    outs = []
    pos = lengths.clone()
    for start in range(0, n_decode, 3):
        t = min(3, n_decode - start)
        step = torch.stack([ids[b, pos[b]: pos[b] + t] for b in range(B)])
        outs.append(model.decode(step))
        model.commit(t)
        pos += t
    return first, torch.cat(outs, dim=1)


@pytest.mark.parametrize("chunk", [7, 64])
def test_prefill_and_multi_token_decode_equal_plain_forward(tiny_qwen, chunk):
    path, _ = tiny_qwen
    model = load_model(str(path))
    torch.manual_seed(1)
    ids = torch.randint(0, 257, (3, 60))
    lengths = torch.tensor([20, 33, 1])
    n_decode = 10
    with torch.no_grad():
        first, decoded = _prefill_decode(model, ids, lengths, n_decode, chunk)
        for b in range(3):
            L = int(lengths[b])
            full = model(ids[b: b + 1, : L + n_decode])[0]
            assert rel_err(first[b], full[L - 1]) < 1e-5
            assert rel_err(decoded[b], full[L: L + n_decode]) < 1e-5
    assert model.seq_lens.tolist() == (lengths + n_decode).tolist()


def test_rollback_then_redecode_equals_never_decoding(tiny_qwen):
    path, _ = tiny_qwen
    model = load_model(str(path))
    ids = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        model.setup_cache(2, 64)
        model.prefill(ids[:, :30])
        model.decode(torch.randint(0, 257, (2, 5)))  # written, never committed
        model.commit(torch.tensor([5, 2]))
        model.rollback(torch.tensor([5, 2]))
        assert model.seq_lens.tolist() == [30, 30]
        got = model.decode(ids[:, 30:34])
        ref = model(ids[:, :34])[:, 30:34]
    assert rel_err(got, ref) < 1e-5


def test_ragged_rollback_per_sequence(tiny_qwen):
    path, _ = tiny_qwen
    model = load_model(str(path))
    ids = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        model.setup_cache(2, 64)
        model.prefill(ids[:, :20])
        model.decode(ids[:, 20:25])
        model.commit(torch.tensor([5, 1]))  # row 0 keeps all five, row 1 one
        assert model.seq_lens.tolist() == [25, 21]
        model.rollback(torch.tensor([2, 0]))
        nxt = torch.stack([ids[0, 23:26], ids[1, 21:24]])
        got = model.decode(nxt)
        assert rel_err(got[0], model(ids[:1, :26])[0, 23:26]) < 1e-5
        assert rel_err(got[1], model(ids[1:, :24])[0, 21:24]) < 1e-5


def test_cache_misuse_is_refused(tiny_qwen):
    path, _ = tiny_qwen
    model = load_model(str(path))
    with pytest.raises(DustinError, match="setup_cache"):
        model.decode(torch.zeros(1, 1, dtype=torch.long))
    model.setup_cache(2, 16)
    with pytest.raises(DustinError, match="roll back"):
        model.rollback(1)
    with pytest.raises(DustinError, match="commit"):
        model.commit(17)
    with pytest.raises(DustinError, match="cache holds 16"):
        model.prefill(torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(DustinError, match="batch"):
        model.decode(torch.zeros(3, 1, dtype=torch.long))


def test_prompt_longer_than_positions_is_refused(tiny_qwen):
    path, _ = tiny_qwen
    model = load_model(str(path))
    with pytest.raises(DustinError, match="model has 512"):
        model(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(DustinError, match="512"):
        model.setup_cache(1, 600)


def test_memory_estimate_and_refusal(tiny_qwen):
    from dustin import estimate_memory
    from dustin.shapes import get_shape

    est = estimate_memory(get_shape("qwen2.5-72b"), batch=16, context=32768)
    assert abs(est.kv_cache / 2**30 - 160.0) < 0.1  # 80 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes x 512k tokens
    assert est.weights > 130 * 2**30 and "GiB" in est.describe()
    path, _ = tiny_qwen
    model = load_model(str(path))
    with pytest.raises(DustinError, match=r"needs [\d.]+ GiB but only [\d.]+ GiB is free"):
        model.setup_cache(10**7, 512)


def test_attention_backend_follows_the_kernels_head_dims():
    """On CUDA the Triton kernels need head dims that are powers of two >= 16: 'auto' falls back to
    torch for others and an explicit 'triton' is refused by name (the interpreter has no such limit)."""
    pytest.importorskip("triton")
    from dustin.attention import resolve_backend

    cuda = torch.device("cuda")  # resolving needs no GPU
    assert resolve_backend("auto", cuda, 64) == "triton"
    assert resolve_backend("auto", cuda, 80) == "torch" and resolve_backend("auto", cuda, 8) == "torch"
    with pytest.raises(DustinError, match="powers of two >= 16.*is 80"):
        resolve_backend("triton", cuda, 80)
    assert resolve_backend("triton", torch.device("cpu"), 8) == "triton"
    with pytest.raises(DustinError, match="unknown attention backend"):
        resolve_backend("flash", cuda, 64)
