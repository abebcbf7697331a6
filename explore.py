import json, math, os, itertools, torch, triton
from dustin.attention import scoring as SC
from dustin.attention.decode import sparse_attention, LOG2E, dot_precision
from dustin.bench.common import time_graph, copy_bandwidth
dev = "cuda"; B, Hq, Hkv, D, T, ctx, budget = 16, 64, 8, 128, 5, 32768, 512
S = ctx + T
g = torch.Generator(device=dev).manual_seed(0)
k = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16, generator=g)
v = torch.randn(B, Hkv, S, D, device=dev, dtype=torch.bfloat16, generator=g)
q = torch.randn(B, Hq, T, D, device=dev, dtype=torch.bfloat16, generator=g)
lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
sets = [torch.rand(B, ctx, device=dev, generator=g).topk(budget, dim=1).indices.sort(dim=1).values.int() for _ in range(16)]
rot = itertools.count()
res = {"bw": copy_bandwidth(torch.device(dev))["best"]}
print("bw", res["bw"] / 1e12, flush=True)
def t(name, fn, **kw):
    try:
        res[name] = time_graph(fn, **kw)
        print(f"{name}: {res[name]*1e6:.1f} us", flush=True)
    except Exception as e:
        print(name, "failed", str(e)[:100], flush=True)
# scoring pieces
heads = [0, 0, 0, 0]
for Tq in (1, 4):
    q_s = q[:, :4, :Tq].contiguous()
    table, kvt = SC._groups(tuple(heads), q.device)
    for n_splits, bn, w, st in [(8, 64, 4, 4), (16, 64, 4, 4), (16, 64, 8, 4), (8, 128, 8, 3), (16, 128, 8, 3), (32, 64, 4, 4), (16, 64, 4, 3), (16, 32, 4, 4)]:
        block_m = max(16, triton.next_power_of_2(4 * Tq))
        logits = torch.empty(B, 4, Tq, S, device=dev, dtype=torch.float16)
        n_tiles = triton.cdiv(S, bn)
        tile_max = torch.empty(B * 4 * Tq * n_tiles, device=dev); pm = torch.empty(B * 4 * Tq * n_splits, device=dev); pl = torch.empty_like(pm)
        out = torch.empty(B, Tq, S, device=dev)
        def lg():
            SC._logits_kernel[(B, n_splits)](q_s, k, lens, table, kvt, logits, tile_max, pm, pl, q_s.stride(0), q_s.stride(1), q_s.stride(2),
                k.stride(0), k.stride(1), k.stride(2), logits.stride(0), logits.stride(1), logits.stride(2), 1, 4, n_tiles, LOG2E / math.sqrt(D),
                T=Tq, HG=4, D=D, BLOCK_M=block_m, BLOCK_N=bn, N_SPLITS=n_splits, PRECISION="tf32", num_warps=w, num_stages=st)
        def nz(bs=1024, nw=4):
            SC._normalize_kernel[(B, triton.cdiv(S, bs))](logits, tile_max, pm, pl, lens, out, logits.stride(0), logits.stride(1), logits.stride(2),
                out.stride(0), out.stride(1), S, n_tiles, H=4, T=Tq, N_SPLITS=n_splits, BLOCK_S=bs, BLOCK_N=bn, ACCUMULATE=False, num_warps=nw)
        tag = f"T{Tq}-splits{n_splits}-bn{bn}-w{w}-s{st}"
        t("logits-" + tag, lg)
        if (n_splits, bn, w, st) == (16, 64, 4, 4):
            for bs, nw in ((1024, 4), (2048, 8), (4096, 8), (512, 4)):
                t(f"normalize-T{Tq}-bs{bs}-w{nw}", lambda: nz(bs, nw))
            t("both-" + tag, lambda: (lg(), nz()))
    t(f"score_positions-T{Tq}", lambda: SC.score_positions(q_s, k, lens, heads, check=False))
# sparse variants
for n, bn, w, st, pf in itertools.product((1, 2), (32, 64, 128), (4, 8), (2, 3, 4), (True,)):
    t(f"sparse-splits{n}-bn{bn}-w{w}-s{st}", lambda: sparse_attention(q, k, v, lens, sets[next(rot) % 16], n_splits=n, block_n=bn, num_warps=w, num_stages=st, prefetch=pf, check=False), calls=16)
os.makedirs(os.environ["OUT"], exist_ok=True)
json.dump(res, open(os.path.join(os.environ["OUT"], "explore.json"), "w"), indent=1)
