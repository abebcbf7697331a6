"""The fused small-batch linear kernel against its reference, and a decode step through it."""
import pytest
import torch

from conftest import rel_err, tiny_model

pytest.importorskip("triton")
from dustin import DustinError  # noqa: E402
from dustin.linear import linear, linear_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
TOL = 2e-2 if DTYPE == torch.bfloat16 else 1e-4


@pytest.mark.parametrize("rows,n,k", [(1, 24, 40), (13, 100, 200), (33, 48, 129), (2, 16, 2100), (16, 40, 256)])
@pytest.mark.parametrize("norm,silu,residual,bias", [(False, False, False, False), (True, False, False, True),
                                                    (False, False, True, False), (True, True, False, False),
                                                    (True, True, True, False), (False, False, True, True)])
def test_linear_matches_reference(rows, n, k, norm, silu, residual, bias):
    g = torch.Generator(device=DEV).manual_seed(rows * n + k)
    x = torch.randn(rows, k, device=DEV, generator=g).to(DTYPE)
    w = (torch.randn(2 * n if silu else n, k, device=DEV, generator=g) / k ** 0.5).to(DTYPE)
    kw = dict(bias=torch.randn(n, device=DEV, generator=g).to(DTYPE) if bias else None,
              norm_weight=(1 + 0.1 * torch.randn(k, device=DEV, generator=g)).to(DTYPE) if norm else None,
              eps=1e-6, silu=silu, residual=torch.randn(rows, n, device=DEV, generator=g).to(DTYPE) if residual else None)
    expect = linear_reference(x.float(), w.float(), **{key: (v.float() if torch.is_tensor(v) else v) for key, v in kw.items()})
    # planned, one pass over K, and K split with the merge in the last program; each also accumulating out^T
    for splits in (None, 1, 3):
        for swap in (False, True):
            out = linear(x, w, **kw, splits=splits, block_k=64, swap=swap)
            assert out.shape == expect.shape == (rows, n) and out.dtype == DTYPE
            assert rel_err(out.float(), expect) < TOL, (splits, swap)


@pytest.mark.parametrize("rows,n,k", [(1, 24, 40), (13, 100, 200), (33, 48, 129)])
@pytest.mark.parametrize("norm,silu,residual,bias", [(True, False, False, True), (True, True, True, False),
                                                    (False, False, True, False)])
def test_fp8_weights_match_their_dequantised_reference(rows, n, k, norm, silu, residual, bias):
    """A float8 weight with per-row scales gives what the dequantised weight gives, whatever the plan."""
    from dustin.linear import FP8, quantize_fp8

    g = torch.Generator(device=DEV).manual_seed(rows + n + k)
    x = torch.randn(rows, k, device=DEV, generator=g).to(DTYPE)
    w = (torch.randn(2 * n if silu else n, k, device=DEV, generator=g) / k ** 0.5).to(DTYPE)
    w[0] *= 100  # rows of very different ranges: each keeps its own scale
    w8, scale = quantize_fp8(w)
    assert w8.dtype == FP8 and scale.shape == (w.shape[0],)
    assert rel_err(w8.float() * scale[:, None], w.float()) < 0.05  # e4m3 keeps 3 mantissa bits
    kw = dict(bias=torch.randn(n, device=DEV, generator=g).to(DTYPE) if bias else None,
              norm_weight=(1 + 0.1 * torch.randn(k, device=DEV, generator=g)).to(DTYPE) if norm else None,
              silu=silu, residual=torch.randn(rows, n, device=DEV, generator=g).to(DTYPE) if residual else None)
    expect = linear_reference(x.float(), w8, weight_scale=scale,
                              **{key: (v.float() if torch.is_tensor(v) else v) for key, v in kw.items()})
    for splits in (1, 3):
        for swap in (False, True):
            out = linear(x, w8, **kw, weight_scale=scale, splits=splits, block_k=64, swap=swap)
            assert out.dtype == DTYPE and rel_err(out.float(), expect) < TOL, (splits, swap)
    with pytest.raises(DustinError, match="weight_scale"):
        linear(x, w8, **kw)
    with pytest.raises(DustinError, match="weight_scale"):
        linear(x, w, **kw, weight_scale=scale)
    with pytest.raises(DustinError, match="weight_scale must be float32"):
        linear(x, w8, **kw, weight_scale=scale[:-1])


def test_measured_plans_apply_within_their_block_only():
    from dustin import linear as lin

    default = lin.plan(64, 96, 1, torch.device(DEV))
    table = {(64, 96, False, 16): lin.Plan(block_n=16, block_k=32, splits=3, swap=True, num_stages=2)}
    with lin.use_plans(table):
        p = lin.plan(64, 96, 1, torch.device(DEV))
        assert p == table[(64, 96, False, 16)]
        assert lin.plan(64, 96, 1, torch.device(DEV), block_m=32) == default  # another shape keeps the heuristic
        # explicit tiling replaces the plan: the fields given, the rest as in a plain `Plan`
        assert lin.plan(64, 96, 1, torch.device(DEV), splits=1, swap=True)[:4] == (32, 64, 1, True)
        x = torch.randn(5, 96, device=DEV, dtype=DTYPE)
        w = torch.randn(64, 96, device=DEV, dtype=DTYPE) / 10
        assert rel_err(linear(x, w).float(), linear_reference(x.float(), w.float())) < TOL
    assert lin.plan(64, 96, 1, torch.device(DEV)) == default


def test_plans_by_kind_of_projection():
    from dustin.linear import Plan, choose

    assert choose(4864, 896, silu=True).swap and choose(4864, 896, silu=True).splits == 1  # gate/up
    assert choose(896, 4864).swap and choose(3072, 2048).swap  # 4M weight elements and more
    assert choose(1152, 896) == Plan()  # a small one: the plain plan
    small_residual = choose(896, 896, residual=True)  # the attention's o: out^T in one pass over K
    assert small_residual.swap and small_residual.splits == 1 and choose(896, 4864, residual=True) == choose(896, 4864)


def test_bench_sweep_holds_every_planned_draft_projection():
    """bench linear reports each projection's planned time from its sweep: the sweep must hold the plan."""
    from dustin.bench.linear import DRAFT_SHAPES, VARIANTS, _layers
    from dustin.linear import choose

    for shape in DRAFT_SHAPES:
        for name, spec in _layers(shape, "cpu", torch.float32, torch.Generator().manual_seed(0)).items():
            n2, k = spec["shape"]
            silu = spec.get("silu", False)
            plan = choose(n2 // 2 if silu else n2, k, silu=silu, residual=spec.get("residual", False))
            assert plan in VARIANTS.values(), (shape, name)


def test_tuning_in_whole_passes_takes_a_plan_only_when_the_pass_gains():
    """Coordinate descent from the start plans: a variant replaces a projection's plan only when the
    whole pass gets faster by more than the margin, and every trial is kept."""
    from dustin.bench.linear import VARIANTS, tune_in_pass
    from dustin.linear import choose

    keys = {"o": (896, 896, False, 16), "down": (896, 4864, False, 16)}
    start = {keys["o"]: VARIANTS["plain"], keys["down"]: choose(896, 4864, residual=True)}
    gains = {(keys["o"], "swap-bn64-bk128-splits1-s4"): 0.2, (keys["down"], "plain"): 0.005,
             (keys["down"], "swap-bn128-bk64-s6"): 0.05}
    label = {p: k for k, p in VARIANTS.items()}

    def time_pass(plans):
        return 1.0 - sum(gains.get((key, label[p]), 0.0) for key, p in plans.items())

    out = tune_in_pass(time_pass, keys, start)
    assert out["plans"] == {"o": "swap-bn64-bk128-splits1-s4", "down": "swap-bn128-bk64-s6"}
    assert out["pass_s"] == pytest.approx(0.75)
    assert out["trials"]["start"] == 1.0 and len(out["trials"]["o"]) == len(VARIANTS) - 1
    assert out["trials"]["down"]["plain"] == pytest.approx(0.795)  # a gain under the margin is not taken
    # a variant that failed alone (say, out of shared memory) is never tried in a pass
    out = tune_in_pass(time_pass, keys, start, {"o": ["plain"], "down": ["plain", "swap-bn64-bk128-s4"]})
    assert out["plans"] == {"o": "plain", "down": "swap-bn64-bk128-s4"} and out["trials"]["o"] == {}
    assert out["trials"]["down"].keys() == {"plain"}  # tried, and under the margin


def test_linear_plans_by_its_epilogue(monkeypatch):
    """`linear` tells the planner whether the projection adds a residual (the attention's o does)."""
    from dustin import linear as lin

    seen = []
    real = lin.choose
    monkeypatch.setattr(lin, "choose", lambda *a, **kw: seen.append(kw["residual"]) or real(*a, **kw))
    x = torch.randn(3, 64, device=DEV, dtype=DTYPE)
    w = torch.randn(32, 64, device=DEV, dtype=DTYPE) / 8
    linear(x, w)
    linear(x, w, residual=torch.zeros(3, 32, device=DEV, dtype=DTYPE))
    assert seen == [False, True]


def test_linear_keeps_leading_dims_and_refuses_bad_input():
    x = torch.randn(2, 3, 32, device=DEV, dtype=DTYPE)
    w = torch.randn(16, 32, device=DEV, dtype=DTYPE)
    assert linear(x, w).shape == (2, 3, 16)
    with pytest.raises(DustinError, match="does not fit"):
        linear(x, torch.randn(16, 31, device=DEV, dtype=DTYPE))
    with pytest.raises(DustinError, match="silu needs"):
        linear(x, torch.randn(15, 32, device=DEV, dtype=DTYPE), silu=True)
    with pytest.raises(DustinError, match="rows"):
        linear(torch.randn(65, 32, device=DEV, dtype=DTYPE), w)
    with pytest.raises(DustinError, match="one dtype"):
        linear(x.double(), w)
    with pytest.raises(DustinError, match="contiguous"):
        linear(x, torch.randn(32, 16, device=DEV, dtype=DTYPE).t())
    with pytest.raises(DustinError, match="residual"):
        linear(x, w, residual=torch.zeros(2, 3, 8, device=DEV, dtype=DTYPE))
    with pytest.raises(DustinError, match="bias"):
        linear(x, w, torch.zeros(8, device=DEV, dtype=DTYPE))


def test_linear_backend_is_checked_when_set():
    model = tiny_model(seed=3, dim=64)
    with pytest.raises(DustinError, match="unknown linear backend 'cublas'.*triton"):
        model.linear_backend = "cublas"
    assert model.linear_backend == "torch"
    model.linear_backend = "auto"  # resolved by the model's size: this one is small
    assert model.linear_backend == "triton"
    from dustin.config import resolve_linear_backend

    assert resolve_linear_backend("auto", 2048) == "down" and resolve_linear_backend("torch", 64) == "torch"


@pytest.mark.parametrize("T", [1, 2])
def test_decode_through_fused_linears_equals_cublas_path(T):
    """A draft-sized decode step with every linear layer in the fused kernel, or only the down projection,
    gives the same logits and cache as the same step through F.linear."""
    model = tiny_model(seed=3, dim=64).to(DEV)  # head dim 16: the attention kernels' smallest
    ids = torch.randint(0, 64, (3, 40), device=DEV)
    outs, caches = [], []
    for backend in ("torch", "triton", "down"):
        model.linear_backend = backend
        model.attn_backend = "triton"
        model.setup_cache(3, 64)
        with torch.no_grad():
            model.prefill(ids[:, :30], torch.tensor([30, 17, 25], device=DEV))
            outs.append(model.decode(ids[:, 30:30 + T]))
        caches.append(model.cache.k[..., :64, :].clone())  # not the scratch slot: padding races to write it
    for out, cache in zip(outs[1:], caches[1:]):
        assert rel_err(out, outs[0]) < 10 * TOL
        assert rel_err(cache, caches[0]) < 10 * TOL


def test_fp8_few_row_weights_read_their_dequantised_weights():
    """With few_row_weights = "fp8" a few-row pass, through the fused kernels or F.linear, gives what the
    dequantised weights give; passes with more rows (the prefill) keep the native weights, and the
    checkpoint is unchanged."""
    import copy

    from torch import nn

    from dustin.linear import dequantize_fp8

    model = tiny_model(seed=3, dim=64).to(DEV)
    ids = torch.randint(0, 64, (3, 40), device=DEV)
    lens = torch.tensor([30, 17, 25], device=DEV)
    keys = set(model.state_dict())
    with pytest.raises(DustinError, match="unknown few-row weights 'int4'"):
        model.few_row_weights = "int4"
    model.few_row_weights = "fp8"
    assert set(model.state_dict()) == keys and model.lm_head.weight_fp8.dtype == torch.float8_e4m3fn
    ref = copy.deepcopy(model)
    ref.few_row_weights = "native"
    assert not hasattr(ref.lm_head, "weight_fp8")
    caches = []
    for m in (model, ref):  # a prompt of 20 rows is a few-row pass, but a prefill: native weights
        m.attn_backend, m.linear_backend = "triton", "triton"
        m.setup_cache(2, 16)
        with torch.no_grad():
            m.prefill(ids[:2, :10])
        caches.append(m.cache.k[..., :10, :].clone())
    assert torch.equal(caches[0], caches[1])
    outs = []
    for m, backend in ((model, "triton"), (ref, "torch")):
        m.attn_backend, m.linear_backend = "triton", backend
        m.setup_cache(3, 64)
        with torch.no_grad():
            m.prefill(ids[:, :30], lens)  # 90 rows: the native weights in both
            if m is ref:  # the same weights the fp8 model's few-row kernels read, as native parameters
                for name, lin in model.named_modules():
                    if hasattr(lin, "weight_fp8"):
                        w = dequantize_fp8(lin.weight_fp8, lin.weight_scale, lin.weight.dtype)
                        ref.get_submodule(name).weight = nn.Parameter(w)  # unties a tied LM head
            outs.append(m.decode(ids[:, 30:31]))
    assert rel_err(outs[0], outs[1]) < 10 * TOL
    model.linear_backend = "torch"
    with torch.no_grad():
        if DEV == "cuda":  # a dequantised copy of every weight would cost memory: refused on the GPU
            with pytest.raises(DustinError, match="read by the fused few-row kernels only"):
                model.decode(ids[:, 30:31])
        else:  # F.linear reads what the fp8 copies stand for, in few-row passes only
            assert rel_err(model.decode(ids[:, 30:31]), outs[1]) < 10 * TOL
    native = copy.deepcopy(ref)
    native.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel_err(outs[0], native.decode(ids[:, 30:31])) > 1e-4  # the fp8 weights did change the result
    model.linear_backend = "triton"
    model.to(torch.float64)
    with pytest.raises(DustinError, match="fp8 weight copies were cast"):
        model.decode(ids[:, 30:31])
