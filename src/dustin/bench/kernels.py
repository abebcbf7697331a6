"""`dustin bench kernels`: each attention kernel against PyTorch, as achieved bandwidth and speedup.

Per shape (query heads / KV heads / head dim of a real model), context and batch, with `gamma + 1`
verification queries and a `budget`-entry index set:
- full: our split-KV kernel (the best of a small split sweep: the baseline at its strongest; the
  engine's own plan is recorded beside it) against SDPA (`enable_gqa`, boolean mask for the causal tail);
- sparse: our index-set kernel against gather + SDPA, beside the read floor: a kernel that only reads
  the same K and V rows (`read_floor`), the fastest of a few splits and tiles, launched with and
  without PDL;
- scoring: the fused scoring of 4 heads of one KV group over the whole context (the history signal);
- selection: Dustin's budget split on the GPU (Triton masking and merge around one torch top-k), and
  the all-torch path it replaces;
- per layer, Dustin's verification attention = sparse (the default plan, as the engine runs it) +
  (scoring + selection) / n_layers, against full.
Every kernel is timed inside a CUDA graph; index sets rotate so the sparse reads do not sit in L2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import reference
from ..attention.decode import decode_attention, default_tile, plan_splits, sparse_attention
from ..attention.scoring import score_positions
from ..selection import split_kernels
from ..selection.indices import budget_split
from ..shapes import get_shape
from .common import copy_bandwidth, time_graph
from .read_floor import gather_read

PAPER_SHAPES = ("qwen2.5-72b", "qwen2.5-7b", "llama-3.1-8b")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _best(variants: dict[str, callable], **timing) -> tuple[str, float, dict]:
    """Time every variant; return the fastest's name and time, and all times (a variant the compiler
    cannot fit, say in shared memory, is recorded as failed)."""
    times = {}
    for name, fn in variants.items():
        try:
            times[name] = time_graph(fn, **timing)
        except Exception as e:  # noqa: BLE001 - a failed variant is a result, not a crash
            times[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    ok = {k: v for k, v in times.items() if isinstance(v, float)}
    name = min(ok, key=ok.get)
    return name, ok[name], times


def _default(times: dict, name: str) -> float:
    if not isinstance(times[name], float):
        raise RuntimeError(f"the engine's default configuration {name} did not run: {times[name]}")
    return times[name]


def bench_case(shape: str, context: int, batch: int, *, gamma: int = 4, budget: int = 512, n_sets: int = 16,
               dtype=torch.bfloat16, device="cuda", sdpa: bool = True) -> dict:
    args = get_shape(shape)
    B, Hq, Hkv, D, T = batch, args.n_heads, args.n_kv_heads, args.head_dim, gamma + 1
    S = context + T
    g = torch.Generator(device=device).manual_seed(0)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=g)
    q = torch.randn(B, Hq, T, D, device=device, dtype=dtype, generator=g)
    lens = torch.full((B,), context, device=device, dtype=torch.int32)
    # random positions in increasing order, as the budget split hands them to verification
    sets = [torch.rand(B, context, device=device, generator=g).topk(budget, dim=1).indices.sort(dim=1).values.int()
            for _ in range(n_sets)]
    rot = iter(range(1 << 30))

    kv_bytes = 2 * B * Hkv * (context + T) * D * k.element_size()
    out = {"shape": shape, "context": context, "batch": batch, "gamma": gamma, "budget": budget,
           "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "n_layers": args.n_layers, "kv_bytes": kv_bytes}

    # correctness on these inputs before any timing
    out["full_rel_err"] = _rel(decode_attention(q, k, v, lens), reference.dense_attention(q, k, v, lens))
    out["sparse_rel_err"] = _rel(sparse_attention(q, k, v, lens, sets[0]),
                                 reference.sparse_attention(q, k, v, lens, sets[0]))

    # the engine's plan (splits and tile), the split count that rounds up to a second wave, and double
    # and half of it
    splits, tile = plan_splits(B, Hkv, S, k.device), default_tile(D, False)
    full = {f"splits{n}-bn{bn}-w{w}": (lambda n=n, bn=bn, w=w: decode_attention(
        q, k, v, lens, n_splits=n, block_n=bn, num_warps=w, check=False))
        for n in sorted({splits, plan_splits(B, Hkv, S, k.device, round_up=True), 2 * splits, max(1, splits // 2)})
        for bn, w in ((tile, 4),)}
    out["full_config"], out["full_s"], out["full_variants_s"] = _best(full)
    out["full_default_config"] = f"splits{splits}-bn{tile}-w4"  # what the engine runs
    out["full_default_s"] = _default(out["full_variants_s"], out["full_default_config"])
    if sdpa:  # what a user of PyTorch would run: SDPA with a boolean mask for the causal tail
        mask = reference.new_token_mask(lens, T, S)[:, None]
        out["sdpa_full_s"] = time_graph(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                                        calls=3, replays=7)
        # without the mask (new tokens see each other both ways): cheaper, not the same result
        out["sdpa_nomask_full_s"] = time_graph(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                                               calls=3, replays=7)
    # the engine's default plan is the headline; the sweep shows whether another split count would beat it
    # heads 2: two programs share a KV group's query heads, each reading the group's keys; s2: two stages
    # of 64-key tiles at head dim 128 take 86 KB of shared memory against 118 KB for three (compiled for
    # sm_90), so two programs fit on an SM and two or four splits run in one wave
    sparse = {f"splits{n}-bn{bn}-s{st}-prefetch{int(pf)}" + (f"-heads{hs}" if hs > 1 else ""): (
        lambda n=n, bn=bn, st=st, pf=pf, hs=hs: sparse_attention(
            q, k, v, lens, sets[next(rot) % n_sets], n_splits=n, block_n=bn, num_stages=st, prefetch=pf,
            head_splits=hs, check=False))
        for n, bn, st, pf, hs in ((None, None, 3, True, 1), (1, 64, 3, True, 1), (2, 64, 3, True, 1),
                                  (4, 64, 3, True, 1), (8, 64, 3, True, 1), (2, 32, 4, True, 1), (1, 64, 5, False, 1),
                                  (1, 128, 3, True, 1), (1, 64, 3, True, 2), (2, 64, 2, True, 1),
                                  (4, 64, 2, True, 1))}
    out["sparse_best_config"], out["sparse_best_s"], out["sparse_variants_s"] = _best(sparse, calls=n_sets)
    out["sparse_config"] = "splitsNone-bnNone-s3-prefetch1"
    out["sparse_s"] = _default(out["sparse_variants_s"], out["sparse_config"])
    # what reading the set's K and V rows alone costs in a launch this size: the floor the sparse kernel
    # can approach (a 2 GiB copy's bandwidth is out of reach for a 10 us read); the sparse kernel launches
    # with PDL where it is on, and so does the floor's "-pdl" half
    floor = {f"splits{n}-bn{bn}" + ("-pdl" if on else ""): (
        lambda n=n, bn=bn, on=on: gather_read(k, v, sets[next(rot) % n_sets], n_splits=n, block_n=bn, use_pdl=on))
        for n in (1, 2, 4) for bn in (64, 128) for on in (False, True)}
    out["sparse_read_config"], out["sparse_read_s"], out["sparse_read_variants_s"] = _best(floor, calls=n_sets)
    out["gather_sdpa_s"] = time_graph(
        lambda: reference.sparse_attention(q, k, v, lens, sets[next(rot) % n_sets]), calls=n_sets)
    out["sparse_bytes"] = 2 * B * Hkv * (budget + T) * D * k.element_size()

    # the history signal: 4 heads of KV group 0, the last committed query, whole context
    heads = [0, 0, 0, 0]
    q_s = q[:, : len(heads), :1].contiguous()
    out["score_rel_err"] = float((score_positions(q_s, k, lens, heads) -
                                  reference.position_scores(q_s, k, lens, torch.tensor(heads, device=device))).abs().max())
    score = {f"splits{n}-bn{bn}-w{w}-s{st}": (lambda n=n, bn=bn, w=w, st=st: score_positions(
        q_s, k, lens, heads, n_splits=n, block_n=bn, num_warps=w, num_stages=st, check=False))
        for n in (None, 16, 32) for bn, w, st in ((64, 4, 4), (64, 4, 6), (128, 4, 3))}
    score["default"] = lambda: score_positions(q_s, k, lens, heads, check=False)  # score_positions' own plan
    out["score_best_config"], out["score_best_s"], out["score_variants_s"] = _best(score)
    out["score_config"] = "default"
    out["score_s"] = _default(out["score_variants_s"], out["score_config"])
    out["score_key_bytes"] = B * (context + 1) * D * k.element_size()
    s_T = torch.rand(B, S, device=device, generator=g)
    s_D = torch.rand(B, S, device=device, generator=g)
    m = (budget - 20) // 4
    out["select_s"] = time_graph(lambda: split_kernels.budget_split(s_T, s_D, lens, m, budget=budget, n_sink=4,
                                                                   n_recent=16, check=False))
    out["select_equal"] = bool(torch.equal(split_kernels.budget_split(s_T, s_D, lens, m, budget=budget, n_sink=4,
                                                                      n_recent=16),
                                           budget_split(s_T, s_D, lens, m, budget=budget, n_sink=4, n_recent=16)))
    out["select_torch_s"] = time_graph(lambda: budget_split(s_T, s_D, lens, m, budget=budget, n_sink=4, n_recent=16))
    both = torch.stack([s_T, s_D]).view(2 * B, S)
    out["select_topk_s"] = time_graph(lambda: both.topk(budget - 20, dim=1))  # the top-k inside the split
    out["dustin_layer_s"] = out["sparse_s"] + (out["score_s"] + out["select_s"]) / args.n_layers
    out["dustin_speedup"] = out["full_s"] / out["dustin_layer_s"]
    del k, v
    torch.cuda.empty_cache()
    return out


def run(*, shapes=PAPER_SHAPES, contexts=(8192, 16384, 32768), batches=(8, 16), gamma: int = 4, budget: int = 512,
        sdpa: bool = True, progress=print) -> dict:
    device = torch.device("cuda")
    copy = copy_bandwidth(device)
    bw = copy["best"]
    progress(f"device-to-device copy: {copy['memcpy'] / 1e12:.2f} TB/s (copy engine), "
             f"{copy['sm_kernel'] / 1e12:.2f} TB/s (SM kernel)")
    cases = []
    for shape in shapes:
        for ctx in contexts:
            for b in batches:
                c = bench_case(shape, ctx, b, gamma=gamma, budget=budget, sdpa=sdpa)
                c["full_bw_frac"] = c["kv_bytes"] / c["full_s"] / bw
                c["score_bw_frac"] = c["score_key_bytes"] / c["score_s"] / bw
                c["floor_full_s"] = c["kv_bytes"] / bw
                cases.append(c)
                progress(f"{shape} {ctx} x{b}: full {c['full_s'] * 1e3:.3f} ms ({c['full_bw_frac']:.0%} of copy bw; "
                         f"floor {c['floor_full_s'] * 1e3:.3f} ms; SDPA {c.get('sdpa_full_s', 0) * 1e3:.2f} ms), "
                         f"sparse {c['sparse_s'] * 1e6:.1f} us (best {c['sparse_best_s'] * 1e6:.1f} "
                         f"[{c['sparse_best_config']}]; read floor {c['sparse_read_s'] * 1e6:.1f}; "
                         f"gather+SDPA {c['gather_sdpa_s'] * 1e6:.1f}), "
                         f"score {c['score_s'] * 1e6:.1f} us ({c['score_bw_frac']:.0%}) "
                         f"[{c['score_config']}], select {c['select_s'] * 1e6:.1f} us, dustin/layer "
                         f"{c['dustin_layer_s'] * 1e6:.1f} us = {c['dustin_speedup']:.1f}x")
    return {"copy_bandwidth_Bps": bw, "copy_bandwidth": copy, "cases": cases}


def table(record: dict) -> str:
    rows = ["| shape | ctx | batch | full ms (floor) | % bw | full, engine plan ms | SDPA ms | sparse us (best variant) "
            "| read floor us | gather+SDPA us | score us (% bw) | select us | Dustin/layer us | speedup |",
            "|" + "---|" * 14]
    for c in record["cases"]:
        rows.append(f"| {c['shape']} | {c['context']} | {c['batch']} | {c['full_s'] * 1e3:.3f} ({c['floor_full_s'] * 1e3:.3f}) "
                    f"| {c['full_bw_frac']:.0%} | {c.get('full_default_s', float('nan')) * 1e3:.3f} "
                    f"| {c.get('sdpa_full_s', float('nan')) * 1e3:.2f} | {c['sparse_s'] * 1e6:.1f} "
                    f"({c.get('sparse_best_s', c['sparse_s']) * 1e6:.1f}) "
                    f"| {c.get('sparse_read_s', float('nan')) * 1e6:.1f} | {c['gather_sdpa_s'] * 1e6:.1f} "
                    f"| {c['score_s'] * 1e6:.1f} ({c['score_bw_frac']:.0%}) "
                    f"| {c['select_s'] * 1e6:.1f} | {c['dustin_layer_s'] * 1e6:.2f} | {c['dustin_speedup']:.1f}x |")
    return "\n".join(rows)


def plot(record: dict, path) -> None:
    """Per-layer verification attention, full against Dustin (scoring + selection + sparse), like Fig. 7."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = record["cases"]
    shapes = sorted({c["shape"] for c in cases}, key=[c["shape"] for c in cases].index)
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        cs = [c for c in cases if c["shape"] == shape]
        labels = [f"{c['context'] // 1024}k/b{c['batch']}" for c in cs]
        x = range(len(cs))
        ax.bar([i - 0.2 for i in x], [c["full_s"] * 1e3 for c in cs], 0.4, label="full (ours)")
        sparse = [c["sparse_s"] * 1e3 for c in cs]
        est = [(c["score_s"] + c["select_s"]) / c["n_layers"] * 1e3 for c in cs]
        ax.bar([i + 0.2 for i in x], sparse, 0.4, label="Dustin: sparse attention")
        ax.bar([i + 0.2 for i in x], est, 0.4, bottom=sparse, label="Dustin: scoring + selection / layers")
        for i, c in enumerate(cs):
            ax.text(i + 0.2, sparse[i] + est[i], f"{c['dustin_speedup']:.0f}x", ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_xticks(list(x), labels, rotation=45)
        ax.set_title(shape)
        ax.set_ylabel("ms per layer")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"verification attention per layer, gamma {cases[0]['gamma']}, budget {cases[0]['budget']} "
                 f"(copy bandwidth {record['copy_bandwidth_Bps'] / 1e12:.2f} TB/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
