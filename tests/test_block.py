"""The persistent one-launch decoder block against its torch reference, and a decode pass through it."""
import pytest
import torch

from conftest import rel_err, tiny_model

pytest.importorskip("triton")
from dustin import DustinError  # noqa: E402
from dustin.block import BlockWeights, block_reference, fused_block  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
TOL = 2e-2 if DTYPE == torch.bfloat16 else 1e-4


def random_block(g, dim, n_heads, n_kv, D, inter, bias):
    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=DEV, generator=g)).to(DTYPE)

    width = (n_heads + 2 * n_kv) * D
    return BlockWeights(ln1=1 + rnd(dim, scale=0.1), qkv=rnd(width, dim, scale=dim ** -0.5),
                        qkv_bias=rnd(width, scale=0.1) if bias else None, o=rnd(dim, n_heads * D, scale=(n_heads * D) ** -0.5),
                        o_bias=rnd(dim, scale=0.1) if bias else None, ln2=1 + rnd(dim, scale=0.1),
                        gate_up=rnd(2 * inter, dim, scale=dim ** -0.5), down=rnd(dim, inter, scale=inter ** -0.5),
                        eps=1e-6, n_heads=n_heads)


def rope_table(positions, D):
    inv = 1.0 / 10_000 ** (torch.arange(0, D, 2, device=DEV).float() / D)
    f = positions.float()[..., None] * inv
    emb = torch.cat((f, f), -1)
    return emb.cos().contiguous(), emb.sin().contiguous()


# awkward: GQA 1, 2 and 7; K and N not multiples of the tiles; T = 2 (a draft's catch-up pass); one
# sequence whose budget exceeds its length (sparse is then dense); 13 sequences
@pytest.mark.parametrize("B,T,dim,n_heads,n_kv,D,inter,budget,bias", [
    (3, 1, 64, 4, 2, 16, 96, 12, True),
    (2, 2, 48, 7, 1, 16, 80, 50, False),
    (13, 1, 32, 2, 2, 32, 40, 9, True),
    (4, 2, 80, 8, 4, 16, 200, 20, False),
])
def test_fused_block_matches_reference(B, T, dim, n_heads, n_kv, D, inter, budget, bias):
    g = torch.Generator(device=DEV).manual_seed(B * dim + inter)
    w = random_block(g, dim, n_heads, n_kv, D, inter, bias)
    S = 48
    seq_lens = torch.randint(1, S - T - 2, (B,), device=DEV, generator=g)
    seq_lens[0] = S - T  # the last slots of the cache
    k_cache = torch.randn(B, n_kv, S, D, device=DEV, generator=g).to(DTYPE)
    v_cache = torch.randn(B, n_kv, S, D, device=DEV, generator=g).to(DTYPE)
    indices = torch.randint(-1, S, (B, budget), device=DEV, generator=g)  # -1 and past-length entries are skipped
    positions = (seq_lens[:, None] + torch.arange(T, device=DEV)).contiguous()
    cos, sin = rope_table(positions, D)
    x = torch.randn(B, T, dim, device=DEV, generator=g).to(DTYPE)

    ref_k, ref_v = k_cache.float(), v_cache.float()
    expect = block_reference(x.float(), BlockWeights(**{k: (v.float() if torch.is_tensor(v) else v)
                                                        for k, v in vars(w).items()}),
                             ref_k, ref_v, seq_lens, indices, cos, sin, positions)
    for one_launch in ((False, True) if DEV == "cuda" else (False,)):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = fused_block(x, w, kc, vc, seq_lens, indices, cos, sin, positions, one_launch=one_launch)
        assert out.shape == x.shape and out.dtype == DTYPE
        assert rel_err(out.float(), expect) < 3 * TOL, one_launch
        assert rel_err(kc.float(), ref_k) < TOL and rel_err(vc.float(), ref_v) < TOL


def test_fused_block_refuses_bad_input():
    g = torch.Generator(device=DEV).manual_seed(0)
    w = random_block(g, 32, 4, 2, 16, 48, True)
    B, T, S = 2, 1, 20
    x = torch.randn(B, T, 32, device=DEV, dtype=DTYPE)
    kc = torch.zeros(B, 2, S, 16, device=DEV, dtype=DTYPE)
    seq_lens = torch.tensor([5, 7], device=DEV)
    pos = (seq_lens[:, None] + torch.arange(T, device=DEV)).contiguous()
    cos, sin = rope_table(pos, 16)
    idx = torch.zeros(B, 8, dtype=torch.long, device=DEV)
    args = (kc, kc.clone(), seq_lens, idx, cos, sin, pos)
    with pytest.raises(DustinError, match="rows"):
        fused_block(torch.randn(65, 1, 32, device=DEV, dtype=DTYPE), w, *args)
    with pytest.raises(DustinError, match="block weight qkv"):
        fused_block(x, BlockWeights(**{**vars(w), "qkv": w.qkv[:, :31]}), *args)
    with pytest.raises(DustinError, match="query heads"):
        fused_block(x, BlockWeights(**{**vars(w), "n_heads": 3}), *args)
    with pytest.raises(DustinError, match="cos must be float32"):
        fused_block(x, w, kc, kc.clone(), seq_lens, idx, cos.double(), sin, pos)
    with pytest.raises(DustinError, match="indices must be"):
        fused_block(x, w, kc, kc.clone(), seq_lens, idx[:, None, None], cos, sin, pos)
    with pytest.raises(DustinError, match="lie in the cache"):
        fused_block(x, w, kc, kc.clone(), torch.tensor([5, S], device=DEV), idx, cos, sin, pos)


@pytest.mark.parametrize("T", [1, 2])
def test_sparse_decode_through_fused_block_equals_cublas_path(T):
    """A draft's sparse decode pass with its blocks in one launch each gives the logits and cache of the
    same pass through cuBLAS and separate kernels. Layer 1 captures queries, so it takes the other path."""
    from dustin.model import QueryCapture

    model = tiny_model(seed=5, dim=64).to(DEV)  # head dim 16: the attention kernels' smallest
    ids = torch.randint(0, 64, (3, 40), device=DEV)
    indices = torch.tensor([[0, 3, 9, 11, 20, -1], [1, 2, 4, 8, 16, -1], [0, 5, 6, 7, 12, 24]], device=DEV)
    outs, caches, qs = [], [], []
    for backend in ("torch", "block"):
        model.linear_backend = backend
        model.attn_backend = "triton"
        model.setup_cache(3, 64)
        capture = QueryCapture({1: [0, 3]})
        with torch.no_grad():
            model.prefill(ids[:, :30], torch.tensor([30, 17, 25], device=DEV))
            outs.append(model.decode(ids[:, 30:30 + T], indices=indices, capture=capture))
        caches.append(model.cache.k[..., :64, :].clone())  # not the scratch slot: padding races to write it
        qs.append(capture.q[1])
    assert rel_err(outs[1], outs[0]) < 10 * TOL
    assert rel_err(caches[1], caches[0]) < 10 * TOL
    assert rel_err(qs[1], qs[0]) < 10 * TOL
