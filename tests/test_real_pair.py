"""The real default pair (Qwen2.5-Coder 0.5B draft, 1.5B target): loading and logits parity."""
import pytest
import torch

from conftest import rel_err
from dustin import defaults, load_model, load_tokenizer

pytestmark = pytest.mark.real

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


@pytest.mark.parametrize("role", ["draft", "target"])
def test_default_model_matches_transformers(role):
    import transformers

    import gc

    tok = load_tokenizer(f"default:{role}")
    ids = torch.tensor([tok.encode(PROMPT)])
    model = load_model(f"default:{role}")
    with torch.no_grad():
        ours = model(ids)
    del model
    gc.collect()  # one float32 copy of the model in memory at a time
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(defaults.ensure_converted(role)), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(ours, ref) < 1e-4
    assert torch.equal(ours[0, -1].argmax(), ref[0, -1].argmax())


def test_pair_shares_a_tokenizer_and_shapes():
    draft, target = load_tokenizer("default:draft"), load_tokenizer("default:target")
    assert draft.get_vocab() == target.get_vocab()
    assert draft.decode(draft.encode(PROMPT)) == PROMPT
    from dustin import load_args

    t, d = load_args("default:target"), load_args("default:draft")
    assert (t.n_layers, t.n_heads, t.n_kv_heads, t.head_dim) == (28, 12, 2, 128)
    assert (d.n_layers, d.n_heads, d.n_kv_heads, d.head_dim) == (24, 14, 2, 64)
    assert t.rope_theta == d.rope_theta == 1e6 and not t.tie_word_embeddings


def test_greedy_speculative_equals_autoregressive_on_the_real_pair():
    from dustin.config import SpecConfig
    from dustin.speculative import Generator

    target, draft = load_model("default:target"), load_model("default:draft")
    tok = load_tokenizer("default:target")
    prompts = [PROMPT, "The capital of France is Paris. The capital of Italy is", "import numpy as np\n"]
    n = 24
    ar = Generator(target, None, SpecConfig(method="ar", max_new_tokens=n), tokenizer=tok).generate(prompts)
    for method in ("sd", "magicdec"):
        cfg = SpecConfig(method=method, gamma=4, max_new_tokens=n, draft_budget=12, draft_n_sink=4)
        res = Generator(target, draft, cfg, tokenizer=tok, draft_tokenizer=tok).generate(prompts)
        assert res.tokens == ar.tokens, method
        assert res.stats.mean_tokens_per_step > 1.0
