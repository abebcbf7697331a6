"""Programmatic dependent launch: when it is on, and that a chain of kernels launched with it in a CUDA
graph still computes what the references do."""
import pytest
import torch

from conftest import rel_err

pytest.importorskip("triton")
from dustin import pdl  # noqa: E402
from dustin.attention import reference  # noqa: E402
from dustin.attention.decode import sparse_attention  # noqa: E402
from dustin.attention.scoring import score_positions  # noqa: E402
from dustin.bench.e2e import METHODS  # noqa: E402
from dustin.config import SpecConfig  # noqa: E402
from dustin.fused import add_rmsnorm, add_rmsnorm_reference, rope_write  # noqa: E402
from dustin.linear import linear, linear_reference  # noqa: E402


@pytest.fixture
def restore_pdl():
    was = pdl.is_enabled()
    yield
    pdl.set_enabled(was)


def test_pdl_is_off_on_the_cpu_and_when_disabled(restore_pdl):
    pdl.set_enabled(True)
    assert pdl.options(torch.device("cpu")) == {"PDL": False}
    pdl.set_enabled(False)
    assert not pdl.is_enabled()
    if torch.cuda.is_available():
        assert pdl.options(torch.device("cuda")) == {"PDL": False}


@pytest.mark.parametrize("variant, key, value", [("dustin+draft-selected+no-pdl", "pdl", False),
                                                 ("dustin+draft-selected+sparse-tiles-64", "sparse_tiles", 64),
                                                 ("dustin+draft-selected+late-gather", "early_gather", False)])
def test_launch_bench_variants_are_the_default_step_with_one_switch(variant, key, value):
    spec = dict(METHODS[variant])
    assert spec.pop(key) == value
    assert spec == METHODS["dustin+draft-selected"]
    SpecConfig(**spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="PDL needs a CUDA device")
@pytest.mark.parametrize("on", [True, False])
def test_a_graph_of_dependent_launches_matches_the_references(on, restore_pdl):
    """Each kernel reads what the one before it wrote; with PDL a wrong wait would read stale rows. The
    attention gathers its first tile before its wait: the cache rows it reads there were written two
    kernels earlier (RoPE and the cache write), at positions and with values that change between replays.
    A scoring closes the chain (launched the usual way: with PDL its normalising launch's programs, scheduled
    early, took the SMs from the logits launch's second wave): queries from the last kernel, keys from the
    cache write."""
    from dustin.attention.decode import default_tile, gathers_early

    assert gathers_early(64, default_tile(64, True), True, True)  # the chain's attention does gather early
    pdl.set_enabled(on)
    g = torch.Generator(device="cuda").manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(16, 896, device=dev, dtype=dt, generator=g)
    w1 = torch.randn(1152, 896, device=dev, dtype=dt, generator=g) / 30
    w2 = torch.randn(896, 1152, device=dev, dtype=dt, generator=g) / 30
    norm = torch.rand(896, device=dev, dtype=dt, generator=g) + 0.5
    k_cache = torch.randn(16, 2, 301, 64, device=dev, dtype=dt, generator=g)
    v_cache = torch.randn(16, 2, 301, 64, device=dev, dtype=dt, generator=g)
    seq_lens = torch.randint(200, 300, (16,), device=dev, dtype=torch.int32, generator=g)
    indices = torch.zeros(16, 2, 100, device=dev, dtype=torch.int32)
    new_qkv = torch.zeros(16, 1, 18 * 64, device=dev, dtype=dt)  # a pass's q/k/v, written into the cache
    cos = torch.rand(16, 1, 1, 64, device=dev, generator=g)
    sin = (1 - cos**2).sqrt()
    positions = torch.zeros(16, 1, device=dev, dtype=torch.long)  # below every sequence's length

    def attend(h, attention):
        q = h[:, :896].reshape(16, 14, 1, 64)
        return attention(q, k_cache, v_cache, seq_lens, indices).reshape(16, 896)

    def chain(x):
        rope_write(new_qkv, cos, sin, positions, k_cache, v_cache, 14, 2)
        h = linear(x, w1, norm_weight=norm, check=False)
        a = attend(h, lambda *t: sparse_attention(*t, early_gather=True, check=False))  # reads the linear's output
        y = linear(torch.cat([a, h[:, 896:]], -1), w2, residual=x, check=False)
        out, _ = add_rmsnorm(y, x, norm, 1e-6)
        return out, score_positions(out[:, :256].reshape(16, 4, 1, 64), k_cache, seq_lens, heads, check=False)

    heads = [0, 1, 1, 0]
    chain(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, scores = chain(x)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, device=dev, dtype=dt, generator=g))
        indices.copy_(torch.randint(-5, 310, indices.shape, device=dev, dtype=torch.int32, generator=g))
        new_qkv.copy_(torch.randn(new_qkv.shape, device=dev, dtype=dt, generator=g))
        positions.copy_(torch.randint(0, 200, positions.shape, device=dev, generator=g))
        indices[:, :, 0] = positions  # every first tile reads a row the graph has just rewritten
        graph.replay()
        h = linear_reference(x, w1, norm_weight=norm)
        y = linear_reference(torch.cat([attend(h, reference.sparse_attention), h[:, 896:]], -1), w2, residual=x)
        want = add_rmsnorm_reference(y, x, norm, 1e-6)[0]
        assert rel_err(out, want) < 2e-2
        q_s = out[:, :256].reshape(16, 4, 1, 64)  # the kernel's own queries: their rounding is not under test
        expect = reference.position_scores(q_s.float(), k_cache.float(), seq_lens, torch.tensor(heads, device=dev))
        assert (scores - expect).abs().max() < 1e-3 * len(heads)
