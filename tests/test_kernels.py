"""Triton kernels against their torch references on awkward shapes (interpreter on the CPU, real on a GPU)."""
import pytest
import torch

from conftest import rel_err
from dustin import DustinError, attention
from dustin.attention import reference

triton = pytest.importorskip("triton")
from dustin.attention.decode import decode_attention, sparse_attention  # noqa: E402
from dustin.attention.scoring import score_positions  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEV == "cuda" else [torch.float32, torch.float16]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make(B, hq, hkv, T, D, S, lens, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, hq, T, D, device=DEV, dtype=torch.float32, generator=g).to(dtype)
    k = torch.randn(B, hkv, S, D, device=DEV, dtype=torch.float32, generator=g).to(dtype)
    v = torch.randn(B, hkv, S, D, device=DEV, dtype=torch.float32, generator=g).to(dtype)
    return q, k, v, torch.tensor(lens, device=DEV, dtype=torch.int32)


def ref(fn, *args):
    """The reference in float32 from the same (rounded) inputs."""
    return fn(*[a.float() if a.is_floating_point() else a for a in args])


# (batch, query heads, KV heads, new tokens, head dim, lengths): GQA 1/4/7/8, odd lengths, batch 1 and 13
SHAPES = [
    (1, 4, 4, 5, 64, [37]),
    (3, 8, 2, 5, 128, [1, 200, 77]),
    (2, 7, 1, 3, 64, [130, 0]),
    (13, 8, 1, 1, 16, [5 * i + 3 for i in range(13)]),
    (2, 16, 2, 16, 32, [90, 301]),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("splits,fuse", [(1, False), (3, False), (3, True)])
def test_decode_attention_matches_reference(shape, splits, fuse):
    B, hq, hkv, T, D, lens = shape
    for dtype in DTYPES:
        q, k, v, sl = make(B, hq, hkv, T, D, max(lens) + T + 4, lens, dtype)
        out = decode_attention(q, k, v, sl, n_splits=splits, block_n=32, fuse_combine=fuse)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert rel_err(out.float(), ref(reference.dense_attention, q, k, v, sl)) < TOL[dtype]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget,per_head", [(24, False), (40, True), (512, False)])
def test_sparse_attention_matches_reference(shape, budget, per_head):
    B, hq, hkv, T, D, lens = shape
    dtype = DTYPES[0]
    q, k, v, sl = make(B, hq, hkv, T, D, max(lens) + T + 4, lens, dtype)
    g = torch.Generator(device=DEV).manual_seed(1)
    heads = hkv if per_head else 1
    # distinct positions per row, some out of range (-1 and >= length) that must be skipped
    idx = torch.stack([torch.randperm(max(lens) + 8, generator=g, device=DEV)[:budget] - 4 if max(lens) + 8 >= budget
                       else torch.arange(budget, device=DEV) for _ in range(B * heads)])
    idx = idx.view(B, heads, budget).clamp(min=-1).to(torch.int32)
    idx = idx if per_head else idx[:, 0].contiguous()
    # duplicated -1 entries are all skipped; make the kept ones unique per row
    # four splits of 16-entry tiles leave some splits no index-set tile, only the last the new tokens
    # three head splits of a group of 7 or 8 heads leave the last program fewer heads (3 + 3 + 1, 3 + 3 + 2)
    for splits, fuse, prefetch, hs in ((1, True, True, 1), (1, True, True, 3), (4, False, False, 3),
                                       (4, True, True, 1), (2, True, True, 3)):
        out = sparse_attention(q, k, v, sl, idx, n_splits=splits, block_n=16, fuse_combine=fuse, prefetch=prefetch,
                               head_splits=hs)
        assert rel_err(out.float(), ref(reference.sparse_attention, q, k, v, sl, idx)) < TOL[dtype]
    # the merge semaphores are left at zero for the next launch
    from dustin import scratch
    assert all(int(c.abs().sum()) == 0 for c in scratch.live("semaphore"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("splits,per_head", [(1, False), (3, True), (None, False)])
def test_sparse_attention_rope_equals_rope_write_then_sparse(shape, splits, per_head):
    """One launch for RoPE, the cache write and attention gives what `rope_write` then `sparse_attention`
    give: the same output and the same cache, padding tokens sent to the scratch slot included."""
    from dustin import fused
    from dustin.attention.decode import sparse_attention_rope

    B, hq, hkv, T, D, lens = shape
    dtype = DTYPES[0]
    S = max(lens) + T + 4
    g = torch.Generator(device=DEV).manual_seed(7)
    qkv = torch.randn(B, T, (hq + 2 * hkv) * D, device=DEV, generator=g).to(dtype)
    ang = torch.rand(B, T, D // 2, device=DEV, generator=g) * 6
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    sl = torch.tensor(lens, device=DEV, dtype=torch.int32)
    pos = sl[:, None].long() + torch.arange(T, device=DEV)
    pos[0, T - 1:] = S - 1 if T > 1 else pos[0, T - 1:]  # a padding token of a ragged chunk: the scratch slot
    heads = hkv if per_head else 1
    idx = torch.stack([torch.randperm(max(lens) + 8, generator=g, device=DEV)[:30] - 4 for _ in range(B * heads)])
    idx = idx.view(B, heads, 30).clamp(min=-1).to(torch.int32)
    idx = idx if per_head else idx[:, 0].contiguous()
    k0 = torch.randn(B, hkv, S, D, device=DEV, generator=g).to(dtype)
    v0 = torch.randn(B, hkv, S, D, device=DEV, generator=g).to(dtype)
    k1, v1, k2, v2 = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    q = fused.rope_write(qkv, cos[:, None], sin[:, None], pos, k1, v1, hq, hkv)
    expect = sparse_attention(q, k1, v1, sl, idx, n_splits=splits, block_n=16)
    # the first tile gathered before the wait, except with n_splits=1 (gathered after it)
    out = sparse_attention_rope(qkv, cos, sin, pos, k2, v2, sl, idx, hq, n_splits=splits, block_n=16,
                                early_gather=splits != 1)
    assert out.shape == (B, hq, T, D) and out.dtype == dtype
    real = torch.ones(B, T, dtype=torch.bool, device=DEV)
    real[0, T - 1] = T == 1  # the padding token's own output is never used (the two paths differ there)
    real = real[:, None, :, None]
    assert rel_err(torch.where(real, out, 0).float(), torch.where(real, expect, 0).float()) < TOL[dtype]
    assert rel_err(k2.float(), k1.float()) < TOL[dtype] and torch.equal(v2, v1)


def test_sparse_attention_rope_refuses_bad_input():
    from dustin.attention.decode import sparse_attention_rope

    B, T, hq, hkv, D, S = 2, 3, 4, 2, 32, 50
    qkv = torch.zeros(B, T, (hq + 2 * hkv) * D, device=DEV, dtype=DTYPES[0])
    cs = torch.zeros(B, T, D, device=DEV)
    k = torch.zeros(B, hkv, S, D, device=DEV, dtype=DTYPES[0])
    sl = torch.tensor([10, 20], device=DEV, dtype=torch.int32)
    pos = sl[:, None].long() + torch.arange(T, device=DEV)
    idx = torch.zeros(B, 4, device=DEV, dtype=torch.int32)
    with pytest.raises(DustinError, match="fused projection of 3 query heads"):
        sparse_attention_rope(qkv, cs, cs, pos, k, k.clone(), sl, idx, 3)
    with pytest.raises(DustinError, match="cos must be float32"):
        sparse_attention_rope(qkv, cs.half(), cs, pos, k, k.clone(), sl, idx, hq)
    with pytest.raises(DustinError, match="positions must lie"):
        sparse_attention_rope(qkv, cs, cs, pos + 40, k, k.clone(), sl, idx, hq)
    with pytest.raises(DustinError, match="needs an index set"):
        sparse_attention_rope(qkv, cs, cs, pos, k, k.clone(), sl, None, hq)
    with pytest.raises(DustinError, match="indices must be"):
        sparse_attention_rope(qkv, cs, cs, pos, k, k.clone(), sl, idx.float(), hq)


@pytest.mark.parametrize("D", [64, 128])
def test_sparse_attention_default_plan_matches_reference(D):
    """The tiling and splits the engine runs with when it passes none: 64-key tiles, 128 at head dim 128,
    over a ragged set (300 entries: two whole 128-key tiles and a part)."""
    B, hq, hkv, T, lens = 3, 8, 2, 5, [1, 290, 301]
    q, k, v, sl = make(B, hq, hkv, T, D, max(lens) + T + 4, lens, DTYPES[0])
    g = torch.Generator(device=DEV).manual_seed(2)
    idx = torch.stack([torch.randperm(max(lens), generator=g, device=DEV)[:300] for _ in range(B)]).sort(1).values
    out = sparse_attention(q, k, v, sl, idx.to(torch.int32).contiguous())
    assert rel_err(out.float(), ref(reference.sparse_attention, q, k, v, sl, idx)) < TOL[DTYPES[0]]


def test_sparse_tiles_can_be_overridden_for_a_block():
    from dustin.attention.decode import default_tile, use_sparse_tiles

    assert (default_tile(128, True), default_tile(64, True), default_tile(128, False)) == (128, 64, 64)
    with use_sparse_tiles(32):
        assert default_tile(128, True) == 32 and default_tile(128, False) == 64
        q, k, v, sl = make(2, 4, 2, 3, 128, 80, [40, 70], DTYPES[0])
        idx = torch.arange(60, device=DEV, dtype=torch.int32)[None].expand(2, -1).contiguous()
        out = sparse_attention(q, k, v, sl, idx)
        assert rel_err(out.float(), ref(reference.sparse_attention, q, k, v, sl, idx)) < TOL[DTYPES[0]]
    assert default_tile(128, True) == 128
    with pytest.raises(DustinError, match="power of two"):
        with use_sparse_tiles(48):
            pass


@pytest.mark.parametrize("early", [True, False])
def test_sparse_first_tile_early_or_late(early):
    """The first tile gathered before the wait or in the loop: one answer, with splits whose first tile
    is their only one and empty splits (the RoPE variant: `test_sparse_attention_rope_...`)."""
    from dustin.attention.decode import gathers_early, use_early_gather

    with use_early_gather(early):
        assert gathers_early(64, 64, True, True) == early and not gathers_early(128, 128, True, True)
        assert not gathers_early(64, 64, False, True) and not gathers_early(64, 64, True, False)
        q, k, v, sl = make(3, 6, 2, 2, 64, 200, [190, 3, 120], DTYPES[0])
        g = torch.Generator(device=DEV).manual_seed(4)
        idx = torch.randint(-3, 195, (3, 70), device=DEV, generator=g, dtype=torch.int32)
        for splits in (1, 3, 8):
            out = sparse_attention(q, k, v, sl, idx, n_splits=splits, block_n=32, early_gather=True)
            assert rel_err(out.float(), ref(reference.sparse_attention, q, k, v, sl, idx)) < TOL[DTYPES[0]]


def test_sparse_over_every_entry_equals_dense():
    q, k, v, sl = make(3, 8, 2, 5, 64, 140, [100, 37, 128], DTYPES[0])
    idx = torch.arange(130, device=DEV, dtype=torch.int32)[None].expand(3, -1).contiguous()
    dense = decode_attention(q, k, v, sl)
    assert rel_err(sparse_attention(q, k, v, sl, idx).float(), dense.float()) < TOL[DTYPES[0]]


@pytest.mark.parametrize("kv_heads", [[0, 0, 1, 1], [1], [0, 1, 1, 0, 0], [2, 2, 2, 2]])
@pytest.mark.parametrize("T", [1, 5])
def test_score_positions_matches_reference(kv_heads, T):
    B, hkv, D, lens = 3, 3, 64, [150, 1, 63]
    dtype = DTYPES[0]
    q, k, _, sl = make(B, len(kv_heads), hkv, T, D, max(lens) + T + 9, lens, dtype)
    for splits in (1, 4):
        out = score_positions(q, k, sl, kv_heads, n_splits=splits, block_n=32)
        expect = ref(reference.position_scores, q, k, sl, torch.tensor(kv_heads, device=DEV))
        assert out.shape == expect.shape == (B, T, k.shape[2])
        assert (out - expect).abs().max() < 1e-3 * len(kv_heads)
        # every query's scores sum to the number of heads
        assert torch.allclose(out.sum(-1), torch.full((B, T), float(len(kv_heads)), device=DEV), atol=1e-3)
        # added into existing scores (a policy's second layer)
        base = torch.rand(B, T, k.shape[2], device=DEV)
        into = base.clone()
        assert score_positions(q, k, sl, kv_heads, out=into, n_splits=splits, block_n=32) is into
        assert (into - base - expect).abs().max() < 1e-3 * len(kv_heads)
        # summed over the queries as well, alone and added in; the torch path agrees
        summed = expect.sum(1, keepdim=True)
        got = score_positions(q, k, sl, kv_heads, n_splits=splits, block_n=32, sum_queries=True)
        assert got.shape == (B, 1, k.shape[2]) and (got - summed).abs().max() < 1e-3 * len(kv_heads) * T
        into = base[:, :1].clone()
        score_positions(q, k, sl, kv_heads, out=into, n_splits=splits, block_n=32, sum_queries=True)
        assert (into - base[:, :1] - summed).abs().max() < 1e-3 * len(kv_heads) * T
    torch_path = attention.score(q, k, sl, torch.tensor(kv_heads, device=DEV), backend="torch", sum_queries=True)
    assert (torch_path - summed).abs().max() < 1e-3 * len(kv_heads) * T
    # the default plan: 128-key tiles at head dim 64, over a cache of two ragged tiles
    assert (score_positions(q, k, sl, kv_heads) - expect).abs().max() < 1e-3 * len(kv_heads)


def test_bad_input_is_refused():
    q, k, v, sl = make(2, 4, 2, 3, 32, 50, [10, 20], DTYPES[0])
    with pytest.raises(DustinError, match="one floating dtype"):
        decode_attention(q, k.to(torch.float64 if DEV == "cpu" else torch.float32), v, sl)
    with pytest.raises(DustinError, match="contiguous"):
        decode_attention(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, sl)
    with pytest.raises(DustinError, match="exceed the cache"):
        decode_attention(q, k, v, torch.tensor([10, 48], device=DEV, dtype=torch.int32))
    with pytest.raises(DustinError, match="seq_lens"):
        decode_attention(q, k, v, sl.float())
    with pytest.raises(DustinError, match="indices must be"):
        sparse_attention(q, k, v, sl, torch.zeros(2, 3, 4, device=DEV, dtype=torch.int32))
    with pytest.raises(DustinError, match="integer"):
        sparse_attention(q, k, v, sl, torch.zeros(2, 4, device=DEV))
    with pytest.raises(DustinError, match="head_splits"):
        sparse_attention(q, k, v, sl, torch.zeros(2, 4, device=DEV, dtype=torch.int32), head_splits=0)
    with pytest.raises(DustinError, match="head dims"):
        decode_attention(q[..., :24].contiguous(), k[..., :24].contiguous(), v[..., :24].contiguous(), sl)
    with pytest.raises(DustinError, match="out of range"):
        score_positions(q[:, :2], k, sl, [0, 5])
    with pytest.raises(DustinError, match=r"out must be float32 \(2, 3, 50\)"):
        score_positions(q[:, :2], k, sl, [0, 1], out=torch.zeros(2, 50, device=DEV))
    with pytest.raises(DustinError, match=r"out must be float32 \(2, 1, 50\)"):
        score_positions(q[:, :2], k, sl, [0, 1], out=torch.zeros(2, 3, 50, device=DEV), sum_queries=True)
    with pytest.raises(DustinError, match=r"out must be \(2, 1, 50\)"):  # the torch path, likewise
        attention.score(q[:, :2], k, sl, torch.tensor([0, 1]), out=torch.zeros(2, 3, 50, device=DEV),
                        sum_queries=True)


def test_sparse_split_plan_follows_partial_size():
    from dustin.attention.decode import _sm_count, plan_sparse_splits

    dev = torch.device(DEV)
    sms = _sm_count(dev)
    # verification groups (>= 32 rows) get one program per SM, rounded down; a draft's few rows two
    assert plan_sparse_splits(sms, 64, 512, 64, dev) == 1
    assert plan_sparse_splits(max(1, sms // 2), 64, 512, 64, dev) == (sms // max(1, sms // 2))
    assert plan_sparse_splits(max(1, sms // 4), 16, 512, 64, dev) == min(8, 2 * sms // max(1, sms // 4))
    # never more splits than whole tiles, never fewer than one
    assert plan_sparse_splits(1, 16, 100, 64, dev) == 1
    assert plan_sparse_splits(10 * sms, 16, 512, 64, dev) == 1


def test_plan_splits_keeps_the_programs_in_one_wave():
    """The full-cache plan never spills a partial second wave of programs; rounding up (the scoring
    plan) reaches the wave instead. Both stay within 1..32 splits of at least `min_keys` keys."""
    from dustin.attention.decode import _sm_count, plan_splits

    dev = torch.device(DEV)
    slots = 2 * _sm_count(dev)
    for units in (1, 3, 7, slots - 1, slots, 3 * slots):
        n = plan_splits(units, 1, 1 << 24, dev)
        assert 1 <= n <= 32 and (n * units <= slots or n == 1) and (n == 32 or (n + 1) * units > slots)
        up = plan_splits(units, 1, 1 << 24, dev, round_up=True)
        assert up == min(32, -(-slots // units))
    assert plan_splits(1, 1, 1500, dev, min_keys=512) == 2  # short caches keep their splits long
    assert plan_splits(1, 1, 100, dev) == 1


@pytest.mark.parametrize("budget,n_sink,n_recent", [(64, 4, 16), (37, 0, 5), (50, 3, 0)])
def test_budget_split_kernels_equal_reference(budget, n_sink, n_recent):
    """The Triton merge around torch's top-k gives the reference's index sets exactly: ties (integer
    scores), sequences shorter than the budget, per-sequence m from 0 to past the free share."""
    from dustin.selection import indices, split_kernels

    g = torch.Generator(device=DEV).manual_seed(3)
    B, S = 13, 301
    rest = budget - n_sink - n_recent
    lens = torch.randint(budget, S + 1, (B,), device=DEV, generator=g)
    lens[1], lens[4] = budget - 1, 7  # read in full
    hist = torch.rand(B, S + 7, device=DEV, generator=g)[:, :S]  # rows S + 7 apart
    look = torch.randint(0, 4, (B, S), device=DEV, generator=g).half()  # many ties
    m = torch.randint(0, rest + 1, (B,), device=DEV, generator=g)
    m[0], m[2], m[3] = 0, rest, rest + 9
    for mm in (m, 5):
        expect = indices.budget_split(hist, look, lens, mm, budget=budget, n_sink=n_sink, n_recent=n_recent)
        got = split_kernels.budget_split(hist, look, lens, mm, budget=budget, n_sink=n_sink, n_recent=n_recent)
        assert got.dtype == torch.long and torch.equal(got, expect)
        own = torch.zeros(B * S, dtype=torch.int8, device=DEV)  # a caller's own scratch, left zeroed
        got = split_kernels.budget_split(hist, look, lens, mm, budget=budget, n_sink=n_sink, n_recent=n_recent,
                                         scratch=own)
        assert torch.equal(got, expect) and int(own.abs().sum()) == 0
    with pytest.raises(DustinError, match="one \\[B, S\\] shape"):
        split_kernels.budget_split(hist, look[:, :9], lens, 5, budget=budget, n_sink=n_sink, n_recent=n_recent)
    with pytest.raises(DustinError, match="floating point"):
        split_kernels.budget_split(hist, look, lens.float(), 5, budget=budget, n_sink=n_sink, n_recent=n_recent)
    with pytest.raises(DustinError, match="m must be"):
        split_kernels.budget_split(hist, look, lens, m[:3], budget=budget, n_sink=n_sink, n_recent=n_recent)
    with pytest.raises(DustinError, match="scratch must be"):
        split_kernels.budget_split(hist, look, lens, m, budget=budget, n_sink=n_sink, n_recent=n_recent,
                                   scratch=torch.zeros(5, dtype=torch.int8, device=DEV))


@pytest.mark.parametrize("splits,block_n,budget", [(1, 16, 40), (3, 16, 40), (4, 32, 33)])
@pytest.mark.parametrize("use_pdl", [False, True])
def test_gather_read_sums_the_rows_an_index_set_names(splits, block_n, budget, use_pdl):
    """The benchmark's read floor reads exactly the rows of the index set: splits of whole tiles, a ragged
    last tile, splits left without rows (4 splits of 32-row tiles over 33 positions)."""
    from dustin.bench.read_floor import gather_read, gather_read_reference

    B, hkv, S, D = 3, 2, 70, 32
    g = torch.Generator(device=DEV).manual_seed(3)
    k = torch.randn(B, hkv, S, D, device=DEV, generator=g)
    v = torch.randn(B, hkv, S, D, device=DEV, generator=g)
    idx = torch.stack([torch.randperm(S, generator=g, device=DEV)[:budget] for _ in range(B)]).int()
    out = gather_read(k, v, idx, n_splits=splits, block_n=block_n, use_pdl=use_pdl)
    want = gather_read_reference(k, v, idx, n_splits=splits, block_n=block_n)
    assert torch.allclose(out, want, atol=1e-4)
    assert want.abs().sum() > 0 and (splits < 4 or bool((want[:, :, 2:] == 0).all()))
