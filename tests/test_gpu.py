"""On a CUDA GPU: the Triton path inside the model and the engine, CUDA graphs, and kernels at real sizes."""
import pytest
import torch

from conftest import perturbed_copy, rel_err, tiny_model
from dustin.attention import reference
from dustin.config import SelectionConfig, SpecConfig
from dustin.selection import make_policy
from dustin.speculative import Generator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_pair():
    target = tiny_model(seed=0, head_dim=32, dim=128, n_heads=4, n_kv_heads=2).cuda()
    draft = perturbed_copy(target, 0.4).cuda()
    return target, draft


PROMPTS = [[(7 * i + 3 * b) % 64 for i in range(150 + 37 * b)] for b in range(3)]


def test_triton_backend_matches_torch_in_the_model():
    target, _ = gpu_pair()
    ids = torch.randint(0, 64, (3, 140), device="cuda")
    outs = {}
    for backend in ("torch", "triton"):
        target.attn_backend = backend
        target.setup_cache(3, 200)
        target.prefill(ids[:, :130], torch.tensor([130, 90, 111], device="cuda"))
        outs[backend] = (target.decode(ids[:, 130:135]),
                         target.decode(ids[:, 130:135], indices=torch.arange(64, device="cuda")[None].expand(3, -1) * 2))
    # float32 dots in Triton run on the tensor cores as tf32
    assert rel_err(outs["triton"][0], outs["torch"][0]) < 1e-2
    assert rel_err(outs["triton"][1], outs["torch"][1]) < 1e-2


@pytest.mark.parametrize("method,policy", [("sd", None), ("magicdec", None), ("dustin", "dustin")])
def test_cuda_graph_generation_equals_autoregressive(method, policy):
    target, draft = gpu_pair()
    n = 40
    ar = Generator(target, None, SpecConfig(method="ar", max_new_tokens=n, stop_tokens=())).generate(PROMPTS)
    pol = None
    if policy:
        pol = make_policy(SelectionConfig(policy=policy, budget=512, m=100, target_heads={1: [0, 2]},
                                          draft_heads={0: [1, 3]}))
    cfg = SpecConfig(method=method, gamma=4, max_new_tokens=n, stop_tokens=(), draft_budget=16, draft_n_sink=4)
    res = Generator(target, draft, cfg, policy=pol).generate(PROMPTS)
    assert res.tokens == ar.tokens
    assert res.stats.time["step"] > 0  # steps after the first two were replayed from a graph


def test_graph_and_eager_agree_with_sparse_selection():
    target, draft = gpu_pair()
    sel = SelectionConfig(policy="dustin", budget=64, m=20, n_recent=8, target_heads={1: [0, 2]},
                          draft_heads={0: [1, 3], 1: [0]}, adaptive=True)
    outs = []
    for graphs in (False, True):
        cfg = SpecConfig(method="dustin", gamma=4, max_new_tokens=30, stop_tokens=(), cuda_graphs=graphs,
                         draft_kv="selected")
        outs.append(Generator(target, draft, cfg, policy=make_policy(sel)).generate(PROMPTS).tokens)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("hq,hkv,ctx,batch", [(64, 8, 32768, 2), (28, 4, 16384, 3), (32, 8, 8191, 5)])
def test_kernels_at_real_sizes(hq, hkv, ctx, batch):
    from dustin.attention.decode import decode_attention, sparse_attention
    from dustin.attention.scoring import score_positions

    T, D = 5, 128
    q = torch.randn(batch, hq, T, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, hkv, ctx + T, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    lens = torch.tensor([ctx - 97 * i for i in range(batch)], device="cuda", dtype=torch.int32)
    assert rel_err(decode_attention(q, k, v, lens), reference.dense_attention(q, k, v, lens)) < 2e-2
    idx = torch.rand(batch, ctx - 97 * batch, device="cuda").topk(512, dim=1).indices
    assert rel_err(sparse_attention(q, k, v, lens, idx), reference.sparse_attention(q, k, v, lens, idx)) < 2e-2
    heads = [0, 1, 2, 3]
    s = score_positions(q[:, :4].contiguous(), k, lens, [h // (hq // hkv) for h in heads])
    r = reference.position_scores(q[:, :4].float(), k.float(), lens, torch.tensor([h // (hq // hkv) for h in heads]))
    assert (s - r).abs().max() < 1e-2
