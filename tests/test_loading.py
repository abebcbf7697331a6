"""Loading checkpoints (safetensors, GGUF, chunk packages, random shapes) and the errors bad input gets."""
import hashlib
import sys

import numpy as np
import pytest
import torch

from conftest import rel_err, save_tiny_hf
from dustin import DustinError, defaults, load_args, load_model, load_tokenizer
from dustin.defaults import ChunkedModel


def write_gguf(path, hf, arch):
    """A GGUF file as llama.cpp's converter would write it (q/k rows interleaved for llama)."""
    import gguf

    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_eos_token_id(2)

    def permute(x, heads):
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, t in hf.state_dict().items():
        x = t.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            out = "output.weight"
        else:
            _, _, i, *mod, kind = name.split(".")
            out = f"blk.{i}.{names['.'.join(mod)]}.{kind}"
            if arch == "llama" and out.split(".")[2] in ("attn_q", "attn_k") and kind == "weight":
                heads = cfg.num_attention_heads if "attn_q" in out else cfg.num_key_value_heads
                x = permute(x, heads)
        w.add_tensor(out, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,kind", [("qwen2", "qwen2"), ("llama", "llama")])
def test_gguf_matches_transformers(tmp_path, arch, kind):
    _, hf = save_tiny_hf(tmp_path, kind)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf, arch)
    model = load_model(str(path))
    assert load_args(str(path)).n_kv_heads == 2
    ids = torch.randint(0, 257, (2, 40))
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) < 1e-5


def test_sharded_safetensors(tmp_path):
    _, hf = save_tiny_hf(tmp_path, "llama")
    out = tmp_path / "sharded"
    hf.save_pretrained(out, max_shard_size="50KB")
    assert (out / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 257, (1, 20))
    with torch.no_grad():
        assert rel_err(load_model(str(out))(ids), hf(ids).logits) < 1e-5


def test_random_shape_dtype_and_determinism():
    a = load_model("random:qwen2.5-0.5b", dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16 and a.args.n_layers == 24
    assert a.lm_head.weight is a.embed_tokens.weight  # tied, as the public config says
    b = load_model("random:qwen2.5-0.5b", dtype=torch.bfloat16)
    assert torch.equal(a.layers[3].mlp.gate_up_proj.weight, b.layers[3].mlp.gate_up_proj.weight)


def test_random_shape_is_built_on_the_target_device(monkeypatch):
    """Weights are created on the meta device and allocated directly where they will live."""
    from dustin import loading

    seen = []
    real = loading.Transformer.to_empty
    monkeypatch.setattr(loading.Transformer, "to_empty",
                        lambda self, *, device, recurse=True: seen.append(device) or real(self, device=device))
    load_model("random:qwen2.5-0.5b", dtype=torch.bfloat16)
    assert seen == [torch.device("cpu")]


@pytest.mark.parametrize("source,match", [
    ("/nonexistent/model", "no such model source"),
    ("/nonexistent/model.gguf", "no such GGUF file"),
    ("random:qwen9-1t", "unknown model shape"),
    ("default:judge", "unknown default model"),
])
def test_bad_sources(source, match):
    with pytest.raises(DustinError, match=match):
        load_model(source)


def test_truncated_files_are_named(tmp_path):
    path, _ = save_tiny_hf(tmp_path, "qwen2")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DustinError, match="truncated or corrupt"):
        load_model(str(path))
    (path / "config.json").unlink()
    with pytest.raises(DustinError, match="config.json"):
        load_model(str(path))
    gg = tmp_path / "cut.gguf"
    gg.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(DustinError, match="truncated"):
        load_model(str(gg))


def test_unsupported_architecture(tmp_path):
    import json

    path, _ = save_tiny_hf(tmp_path, "qwen2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DustinError, match="unsupported architecture 'GPTNeoXForCausalLM'"):
        load_model(str(path))


def test_random_model_has_no_tokenizer():
    with pytest.raises(DustinError, match="no tokenizer"):
        load_tokenizer("random:qwen2.5-7b")


@pytest.fixture
def fake_chunks(tmp_path, monkeypatch):
    """A two-part chunked 'model' installed as packages on sys.path."""
    blobs = [b"part-one" * 1000, b"part-two" * 500]
    for i, blob in enumerate(blobs, start=1):
        pkg = tmp_path / "site" / f"fakechunk_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = ChunkedModel(role="draft", name="fake", description="fake model", module="fakechunk_part",
                        package="fakechunk-part", version="1.0",
                        sha256=hashlib.sha256(b"".join(blobs)).hexdigest(),
                        parts=tuple((len(b), hashlib.sha256(b).hexdigest()) for b in blobs))
    monkeypatch.setitem(defaults.DEFAULTS, "draft", spec)
    monkeypatch.setenv("DUSTIN_CACHE", str(tmp_path / "cache"))
    return spec, tmp_path / "site"


def test_join_parts_checks_every_part(fake_chunks, tmp_path):
    spec, site = fake_chunks
    out = tmp_path / "joined"
    defaults.join_parts(spec, out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == spec.sha256
    (site / "fakechunk_part2" / "data" / "part02.bin").write_bytes(b"part-two" * 499 + b"corrupt!")
    with pytest.raises(DustinError, match="part 2 .* is corrupt"):
        defaults.join_parts(spec, out)


def test_missing_chunk_package_is_named(fake_chunks):
    import shutil

    spec, site = fake_chunks
    shutil.rmtree(site / "fakechunk_part2")
    sys.modules.pop("fakechunk_part2", None)
    with pytest.raises(DustinError, match=r"fakechunk-part2==1.0 .* is not installed"):
        load_model("default:draft")


def test_unwritable_cache_folder(fake_chunks, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DUSTIN_CACHE", str(blocker / "cache"))
    with pytest.raises(DustinError, match="not writable.*DUSTIN_CACHE"):
        load_model("default:draft")


@pytest.mark.parametrize("edit,match", [
    (lambda cfg: [1, 2], "holds a JSON list, not a model config"),
    (lambda cfg: {k: v for k, v in cfg.items() if k != "num_attention_heads"},
     r"num_attention_heads \(missing\): model sizes must be positive integers"),
    (lambda cfg: {**cfg, "num_attention_heads": 0}, r"num_attention_heads \(0\): model sizes must be positive"),
    (lambda cfg: {**cfg, "vocab_size": "128"}, r"vocab_size \(\"128\"\): model sizes must be positive"),
    (lambda cfg: {**cfg, "head_dim": None, "hidden_size": 2}, "no head dimension is left"),
    (lambda cfg: {**cfg, "rope_scaling": "yes"}, "not a model config dustin can read"),
    (lambda cfg: {**cfg, "architectures": "GPTNeoXForCausalLM"}, "unsupported architecture 'GPTNeoXForCausalLM'"),
    (lambda cfg: {**cfg, "num_hidden_layers": -2}, "must be positive"),
    (lambda cfg: {**cfg, "hidden_size": 64.5}, "must be positive integers"),
    (lambda cfg: {**cfg, "num_hidden_layers": True}, "must be positive integers"),
])
def test_malformed_configs_are_named(tmp_path, edit, match):
    """A hand-edited or foreign config.json gets a message naming the file, not a traceback."""
    import json

    path, _ = save_tiny_hf(tmp_path, "qwen2")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(edit(cfg)))
    with pytest.raises(DustinError, match=match):
        load_args(str(path))


@pytest.mark.parametrize("edit", [
    lambda cfg: {k: v for k, v in cfg.items() if k not in ("num_key_value_heads", "head_dim")},
    lambda cfg: {**cfg, "num_key_value_heads": None, "head_dim": None},
])
def test_optional_sizes_may_be_omitted_or_null(tmp_path, edit):
    """Without num_key_value_heads a model has one KV head per query head; without head_dim, hidden / heads."""
    import json

    path, _ = save_tiny_hf(tmp_path, "qwen2")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(edit(cfg)))
    args = load_args(str(path))
    assert (args.n_kv_heads, args.head_dim) == (cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"])


def test_checkpoint_tensors_of_the_wrong_shape_are_named(tmp_path):
    import json

    path, _ = save_tiny_hf(tmp_path, "qwen2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] += 8  # the embedding on disk no longer fits
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DustinError, match="do not match its config: embed_tokens.weight"):
        load_model(str(path))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(DustinError, match="is not a safetensors index: it needs a weight_map"):
        load_model(str(path))


def test_gguf_without_required_metadata_is_named(tmp_path):
    import gguf

    path = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DustinError, match="lacks what dustin needs: llama.attention.head_count, "
                                          "llama.embedding_length, llama.feed_forward_length, the token_embd"):
        load_args(str(path))
