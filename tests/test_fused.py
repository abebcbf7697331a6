"""Fused layer kernels against their references, and the whole Triton decode path against the torch one."""
import pytest
import torch

from conftest import rel_err, tiny_model

pytest.importorskip("triton")
from dustin import fused  # noqa: E402
from dustin.model import QueryCapture  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32


@pytest.mark.parametrize("dim,rows", [(64, 3), (896, 7), (100, 1)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rmsnorm(dim, rows, with_delta):
    r = torch.randn(rows, dim, device=DEV, dtype=DTYPE)
    d = torch.randn(rows, dim, device=DEV, dtype=DTYPE) if with_delta else None
    w = torch.randn(dim, device=DEV, dtype=DTYPE)
    ref_out, ref_res = fused.add_rmsnorm_reference(r.clone(), d, w, 1e-6)
    r2 = r.clone()
    out, res = fused.add_rmsnorm(r2, d, w, 1e-6)
    assert rel_err(out, ref_out) < 1e-2 and rel_err(res, ref_res) < 1e-3
    assert res.data_ptr() == r2.data_ptr()  # the residual is updated in place


@pytest.mark.parametrize("B,T,hq,hkv,D", [(2, 5, 8, 2, 64), (3, 1, 7, 1, 128), (1, 3, 4, 4, 32)])
def test_rope_write(B, T, hq, hkv, D):
    S = 40
    qkv = torch.randn(B, T, (hq + 2 * hkv) * D, device=DEV, dtype=DTYPE)
    ang = torch.rand(B, 1, T, D // 2, device=DEV) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    pos = torch.stack([torch.randperm(S - 1, device=DEV)[:T] for _ in range(B)])
    kc = torch.zeros(B, hkv, S, D, device=DEV, dtype=DTYPE)
    vc = torch.zeros_like(kc)
    q = fused.rope_write(qkv, cos, sin, pos, kc, vc, hq, hkv)
    rq, rk, rv = fused.split_heads(qkv, hq, hkv, D)
    assert rel_err(q, fused.rope_reference(rq.float(), cos, sin)) < 1e-2
    rk = fused.rope_reference(rk.float(), cos, sin)
    for b in range(B):
        for t in range(T):
            assert rel_err(kc[b, :, pos[b, t]], rk[b, :, t]) < 1e-2
            assert torch.equal(vc[b, :, pos[b, t]], rv[b, :, t])


@pytest.mark.parametrize("shape", [(2, 3, 2 * 300), (1, 1, 2 * 4864)])
def test_silu_mul(shape):
    x = torch.randn(*shape, device=DEV, dtype=DTYPE)
    assert rel_err(fused.silu_mul(x), fused.silu_mul_reference(x)) < 1e-2


TOL_PATHS = 1e-2 if DEV == "cuda" else 1e-4  # on a GPU the torch path's float32 GEMMs and SDPA round differently


def _per_backend(run) -> dict:
    """`run(model)` on one small model through the torch path, then through every Triton kernel."""
    model = tiny_model(seed=0, dim=64, n_heads=4, n_kv_heads=2, head_dim=16).to(DEV)
    outs = {}
    for backend in ("torch", "triton"):
        model.attn_backend = backend
        outs[backend] = run(model)
    return outs


def test_triton_decode_path_equals_torch_path():
    """The model with every Triton kernel (layer ops and attention) against its torch reference path."""
    ids = torch.randint(0, 64, (2, 60), device=DEV)

    def run(model):
        model.setup_cache(2, 80)
        model.prefill(ids[:, :50], torch.tensor([50, 33], device=DEV))
        full = model.decode(ids[:, 50:55])
        model.cache.k.zero_()  # the sparse pass below (RoPE, cache write and attention in one launch) rewrites
        model.cache.v.zero_()  # its new tokens; the index set reads only zeros elsewhere
        idx = torch.arange(0, 40, 2, device=DEV)[None].expand(2, -1)
        sparse = model.decode(ids[:, 50:55], indices=idx)
        capture = QueryCapture({1: [0, 3]})  # a layer whose q is kept takes the two-launch path
        model.decode(ids[:, 50:55], indices=idx, capture=capture)
        return full, sparse, model.cache.k[..., :64, :].clone(), model.cache.v[..., :64, :].clone(), capture.q[1]

    outs = _per_backend(run)
    for i in range(5):
        assert rel_err(outs["triton"][i], outs["torch"][i]) < TOL_PATHS, i


def test_ragged_prefill_near_the_end_of_the_cache_through_triton():
    """Padding rows of a short chunk would reach past the cache: the kernel must not read there."""
    ids = torch.randint(0, 64, (2, 110), device=DEV)

    def run(model):
        model.setup_cache(2, 100)
        model.prefill(ids[:, :95], torch.tensor([95, 0], device=DEV), chunk_size=32)
        last = model.prefill(ids[:, 95:105], torch.tensor([3, 10], device=DEV), chunk_size=10)
        return last, model.decode(ids[:, :2] * 0 + 5)

    outs = _per_backend(run)
    assert rel_err(outs["triton"][0], outs["torch"][0]) < TOL_PATHS
    assert rel_err(outs["triton"][1], outs["torch"][1]) < TOL_PATHS


@pytest.mark.parametrize("rows,V,splits", [(1, 7, None), (3, 1000, 1), (5, 5000, 4), (2, 4097, None), (13, 3001, 8),
                                         (4, 20000, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_argmax_matches_torch(rows, V, splits, dtype):
    """The split argmax kernel picks what torch.argmax picks: the first of tied maxima, a NaN over any
    number, index 0 of a row of -inf, across split boundaries and on a strided view."""
    from dustin.sampling import _argmax_triton

    g = torch.Generator(device=DEV).manual_seed(rows * V)
    x = torch.randn(rows, V, device=DEV, generator=g).to(dtype)
    x[0, V // 3] = x.max() + 1
    x[0, V // 2] = x[0, V // 3]
    if rows > 1:
        x[1] = float("-inf")
    if rows > 2:
        x[2, V - 1] = x[2, 1] = float("nan")
    assert torch.equal(_argmax_triton(x, splits), x.argmax(-1))
    wide = torch.randn(2, rows, V + 9, device=DEV, generator=g).to(dtype)[..., :V]
    assert torch.equal(_argmax_triton(wide, splits), wide.argmax(-1))
