"""`dustin bench linear`: a draft's linear layers at decode sizes, read cold, the way a pass runs them.

Per draft shape, two measurements:
- per projection: the cuBLAS path (`F.linear` plus the norm, SiLU and residual kernels it needs)
  against the fused kernel (`dustin.linear`) under a sweep of plans (`linear.Plan`). Each timed call
  reads another copy of the weight, enough copies to overflow the L2 cache: in a pass over all layers
  every weight comes from memory, and timing one resident copy would flatter every variant;
- per pass: a whole decode pass of the draft (one token per sequence, an index set of `budget` entries
  at `context`, the LM head included) for each linear backend under the plans `linear.choose` makes,
  and for the fused backends again under the best measured plan of each projection (`linear.use_plans`)
  and under plans tuned in whole passes (`tune_in_pass`), since a plan also changes its neighbours.
The sweep holds every plan `linear.choose` makes for the draft shapes, so the planned time of each
projection is one of the measured variants.
Everything is timed as CUDA-graph replays; the weight bytes over the copy bandwidth give the floor.
"""
from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F

from .. import fused as fused_ops
from ..errors import DustinError
from ..linear import Plan, choose, linear, linear_reference, row_block, use_plans
from ..loading import random_model
from ..shapes import get_shape
from .common import copy_bandwidth, time_graph

DRAFT_SHAPES = ("qwen2.5-0.5b", "llama-3.2-1b")
COLD_BYTES = 256 << 20  # weight copies per projection: at least this much, four times the H200's L2
VARIANTS = {
    "plain": Plan(),
    "bn64-bk128-splits1": Plan(block_n=64, block_k=128, splits=1),
    "swap-bn64-bk64-s6": Plan(block_n=64, block_k=64, swap=True, num_stages=6),
    "swap-bn64-bk64-splits1-s6": Plan(block_n=64, block_k=64, splits=1, swap=True, num_stages=6),
    "swap-bn64-bk64-splits2-s6": Plan(block_n=64, block_k=64, splits=2, swap=True, num_stages=6),
    "swap-bn64-bk64-splits4-s4": Plan(block_n=64, block_k=64, splits=4, swap=True, num_stages=4),
    "swap-bn64-bk128-s4": Plan(block_n=64, block_k=128, swap=True, num_stages=4),
    "swap-bn64-bk128-splits1-s4": Plan(block_n=64, block_k=128, splits=1, swap=True, num_stages=4),
    "swap-bn128-bk64-s6": Plan(block_n=128, block_k=64, swap=True, num_stages=6),
    "swap-bn128-bk64-splits1-s8": Plan(block_n=128, block_k=64, splits=1, swap=True, num_stages=8),
    "swap-bn128-bk128-splits1-s4": Plan(block_n=128, block_k=128, splits=1, swap=True, num_stages=4),
    "swap-bn128-bk64-w8-s6": Plan(block_n=128, block_k=64, swap=True, num_warps=8, num_stages=6),
}
BACKENDS = ("torch", "down", "triton")


def _layers(shape: str, device, dtype, g) -> dict:
    a = get_shape(shape)
    D, I, qkv = a.dim, a.intermediate_size, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
    vec = lambda n: (1 + 0.1 * torch.randn(n, device=device, generator=g)).to(dtype)  # noqa: E731
    return {"qkv": dict(shape=(qkv, D), bias=vec(qkv) if a.qkv_bias else None, norm_weight=vec(D)),
            "o": dict(shape=(D, a.n_heads * a.head_dim), residual=True, next_norm=vec(D)),
            "gate_up": dict(shape=(2 * I, D), norm_weight=vec(D), silu=True),
            "down": dict(shape=(D, I), residual=True, next_norm=vec(D))}


def _cublas(x, w, spec, res):
    """What the unfused decode path launches for this projection. Its two norms per block ride with the
    residual adds (`add_rmsnorm`), so they are counted at o and down, not at qkv and gate/up."""
    y = F.linear(x, w, spec.get("bias"))
    if spec.get("silu"):
        y = fused_ops.silu_mul(y)
    if spec.get("residual"):
        y, _ = fused_ops.add_rmsnorm(res, y, spec["next_norm"], 1e-6)
    return y


def bench_projections(shape: str, rows: int, *, device="cuda", dtype=torch.bfloat16) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, spec in _layers(shape, device, dtype, g).items():
        n2, k = spec["shape"]
        n = n2 // 2 if spec.get("silu") else n2
        nbytes = n2 * k * torch.finfo(dtype).bits // 8
        copies = max(4, min(64, -(-COLD_BYTES // nbytes)))
        ws = [(torch.randn(n2, k, device=device, generator=g) / k ** 0.5).to(dtype) for _ in range(copies)]
        x = torch.randn(rows, k, device=device, generator=g).to(dtype)
        res = torch.randn(rows, n, device=device, generator=g).to(dtype) if spec.get("residual") else None
        kw = dict(bias=spec.get("bias"), norm_weight=spec.get("norm_weight"), silu=spec.get("silu", False),
                  residual=res)
        ref = linear_reference(x.float(), ws[0].float(), **{key: (v.float() if torch.is_tensor(v) else v)
                                                             for key, v in kw.items()})
        rot = itertools.cycle(range(copies))
        res_inplace = res.clone() if res is not None else None  # add_rmsnorm updates the residual in place
        rec = {"n": n, "k": k, "weight_bytes": nbytes, "copies": copies,
               "cublas_s": time_graph(lambda: _cublas(x, ws[next(rot)], spec, res_inplace), calls=copies)}
        times, errors = {}, {}
        for label, p in VARIANTS.items():
            fields = {f: v for f, v in p._asdict().items() if v is not None}
            try:
                errors[label] = float((linear(x, ws[0], **kw, **fields).float() - ref).norm() / ref.norm())
                times[label] = time_graph(lambda: linear(x, ws[next(rot)], **kw, **fields, check=False), calls=copies)
            except Exception as e:  # noqa: BLE001 - a variant the compiler cannot fit is a result, not a crash
                times[label] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        rec.update(fused_variants_s=times, rel_err=errors)
        out[name] = rec
    return out


def bench_passes(shape: str, rows: int, best: dict, candidates: dict, *, context: int, budget: int, device="cuda",
                 dtype=torch.bfloat16) -> tuple[dict, dict]:
    """Seconds per decode pass of the draft for each backend, under the measured best plans, and under
    plans tuned in whole passes (`tune_in_pass`, over each projection's `candidates`: the variants that
    compiled and matched the reference alone); returns those and the tuning's record."""
    args = dataclasses.replace(get_shape(shape), max_position_embeddings=max(context + 64, 32768))
    model = random_model(args, device=torch.device(device), dtype=dtype)
    cache = model.setup_cache(rows, context + 64)
    for layer in range(args.n_layers):
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    cache.seq_lens.fill_(context)
    g = torch.Generator(device=device).manual_seed(1)
    indices = torch.rand(rows, context, device=device, generator=g).argsort(1)[:, :budget].sort(1).values.int()
    ids = torch.randint(0, 1000, (rows, 1), device=device, generator=g)
    step = lambda: model.decode(ids, indices=indices, float_logits=False, check=False)  # noqa: E731
    out = {}
    for backend in BACKENDS:
        model.linear_backend = backend
        out[backend] = time_graph(step, calls=4)
        if backend != "torch":
            with use_plans(best):
                out[f"{backend}+measured-plans"] = time_graph(step, calls=4)
    model.linear_backend = "triton"
    keys = {name: (spec["shape"][0] // (2 if spec.get("silu") else 1), spec["shape"][1], bool(spec.get("silu")),
                   row_block(rows)) for name, spec in _layers(shape, device, dtype, g).items()}
    tuning = tune_in_pass(lambda plans: _timed_under(plans, step), keys, best, candidates)
    for backend in BACKENDS[1:]:
        model.linear_backend = backend
        with use_plans({keys[name]: VARIANTS[label] for name, label in tuning["plans"].items()}):
            out[f"{backend}+tuned-plans"] = time_graph(step, calls=4)
    return out, tuning


def _timed_under(plans: dict, step) -> float:
    with use_plans(plans):
        return time_graph(step, calls=4)


def tune_in_pass(time_pass, keys: dict, start: dict, candidates: dict | None = None, *,
                 margin: float = 0.01) -> dict:
    """Coordinate descent over the sweep's plans, timed in whole passes: a projection's plan changes the
    neighbouring launches too (split-K's parked sums and semaphores, how early the next kernel may
    start), so the best plan alone is not always the best plan in a pass. From `start` (a plan for each
    of `keys`, keyed like `use_plans`), each projection in turn tries every variant (of its `candidates`,
    by default all) with the others held, keeping one that beats the current pass by more than `margin`.
    Returns the chosen variant per projection and every trial's seconds per pass."""
    labels = {p: label for label, p in reversed(list(VARIANTS.items()))}
    current = {key: start[key] for key in keys.values()}
    base = time_pass(current)
    trials = {"start": base}
    for name, key in keys.items():
        trials[name] = {}
        for label, p in VARIANTS.items():
            if p == current[key] or (candidates is not None and label not in candidates[name]):
                continue
            t = trials[name][label] = time_pass({**current, key: p})
            if t < base * (1 - margin):
                current, base = {**current, key: p}, t
    return {"plans": {name: labels.get(current[key], "?") for name, key in keys.items()}, "pass_s": base,
            "trials": trials}


def summarise(case: dict, bw: float) -> dict:
    """A case's derived figures from its measured variants: per projection the plain, planned
    (`linear.choose`) and best plan (a variant within 2e-2 of the reference), and their sums per block."""
    for name, r in case["layers"].items():
        times = r["fused_variants_s"]
        ok = {key: v for key, v in times.items() if isinstance(v, float) and r["rel_err"].get(key, 1.0) < 2e-2}
        planned = choose(r["n"], r["k"], silu=name == "gate_up", residual=name in ("o", "down"),
                         block_m=row_block(case["rows"]))
        r["fused_planned"] = next((key for key, p in VARIANTS.items() if p == planned), None)
        for key in ("plain", r["fused_planned"]):
            if key not in ok:
                raise DustinError(f"{case['shape']} {name}: the fused kernel's plan {key} failed or missed the "
                                  f"reference: {times.get(key)}, error {r['rel_err'].get(key)}")
        r.update(fused_ok=sorted(ok), fused_plain_s=ok["plain"], fused_planned_s=ok[r["fused_planned"]],
                 fused_best=min(ok, key=ok.get), fused_best_s=min(ok.values()))
    for key in ("cublas", "fused_plain", "fused_planned", "fused_best"):
        case[f"{key}_block_s"] = sum(r[f"{key}_s"] for r in case["layers"].values())
    case["floor_block_s"] = sum(r["weight_bytes"] for r in case["layers"].values()) / bw
    case["best_plans"] = {name: r["fused_best"] for name, r in case["layers"].items()}
    return case


def run(*, shapes=DRAFT_SHAPES, rows=(16,), context=32768, budget=528, progress=print) -> dict:
    device = torch.device("cuda")
    copy = copy_bandwidth(device)
    bw = copy["best"]
    cases = []
    for shape in shapes:
        for m in rows:
            c = summarise({"shape": shape, "rows": m, "context": context, "budget": budget,
                           "layers": bench_projections(shape, m)}, bw)
            best = {(r["n"], r["k"], name == "gate_up", row_block(m)): VARIANTS[r["fused_best"]]
                    for name, r in c["layers"].items()}
            candidates = {name: r["fused_ok"] for name, r in c["layers"].items()}
            c["pass_s"], c["pass_tuning"] = bench_passes(shape, m, best, candidates, context=context, budget=budget)
            cases.append(c)
            torch.cuda.empty_cache()
            progress(f"{shape} x{m}: per block cuBLAS path {c['cublas_block_s'] * 1e6:.1f} us, fused "
                     f"{c['fused_planned_block_s'] * 1e6:.1f} planned, {c['fused_best_block_s'] * 1e6:.1f} best "
                     f"(floor {c['floor_block_s'] * 1e6:.1f}); pass " + ", ".join(
                         f"{k} {v * 1e3:.3f} ms" for k, v in c["pass_s"].items()))
    return {"copy_bandwidth_Bps": bw, "copy_bandwidth": copy, "variants": {k: p._asdict() for k, p in VARIANTS.items()},
            "cases": cases}


def table(record: dict) -> str:
    rows = ["| shape | rows | layer | N x K | cuBLAS path us | fused us: plain | planned [plan] | best [plan] "
            "| floor us |", "|" + "---|" * 9]
    bw = record["copy_bandwidth_Bps"]
    for c in record["cases"]:
        for name, r in c["layers"].items():
            rows.append(f"| {c['shape']} | {c['rows']} | {name} | {r['n']} x {r['k']} | {r['cublas_s'] * 1e6:.1f} "
                        f"| {r['fused_plain_s'] * 1e6:.1f} | {r['fused_planned_s'] * 1e6:.1f} [{r['fused_planned']}] "
                        f"| {r['fused_best_s'] * 1e6:.1f} [{r['fused_best']}] | {r['weight_bytes'] / bw * 1e6:.1f} |")
        rows.append(f"| {c['shape']} | {c['rows']} | **block** | | {c['cublas_block_s'] * 1e6:.1f} "
                    f"| {c['fused_plain_block_s'] * 1e6:.1f} | {c['fused_planned_block_s'] * 1e6:.1f} "
                    f"| {c['fused_best_block_s'] * 1e6:.1f} | {c['floor_block_s'] * 1e6:.1f} |")
    keys = list(record["cases"][0]["pass_s"])
    rows += ["", "| shape | rows | context | budget | " + " | ".join(f"pass ms: {k}" for k in keys) + " |",
             "|" + "---|" * (4 + len(keys))]
    for c in record["cases"]:
        rows.append(f"| {c['shape']} | {c['rows']} | {c['context']} | {c['budget']} | "
                    + " | ".join(f"{c['pass_s'][k] * 1e3:.3f}" for k in keys) + " |")
    rows += ["", "| shape | rows | plans tuned in whole passes (qkv, o, gate_up, down) |", "|---|---|---|"]
    for c in record["cases"]:
        tuned = c.get("pass_tuning", {}).get("plans", {})
        rows.append(f"| {c['shape']} | {c['rows']} | " + ", ".join(f"{k}: {v}" for k, v in tuned.items()) + " |")
    return "\n".join(rows)


def plot(record: dict, path) -> None:
    """Per-block time of the four projections (cuBLAS path, fused as planned, fused best) with the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = record["cases"]
    labels = [f"{c['shape']}\nx{c['rows']}" for c in cases]
    x = range(len(cases))
    fig, ax = plt.subplots(figsize=(2 + 2.5 * len(cases), 4))
    for off, key, label in ((-0.27, "cublas_block_s", "cuBLAS + norm/SiLU kernels"),
                            (0.0, "fused_planned_block_s", "fused, planned"),
                            (0.27, "fused_best_block_s", "fused, best plan")):
        ax.bar([i + off for i in x], [c[key] * 1e6 for c in cases], 0.27, label=label)
    ax.scatter(list(x), [c["floor_block_s"] * 1e6 for c in cases], color="k", marker="_", s=600, label="weight floor")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("us per block (4 projections, weights cold)")
    ax.set_title(f"draft block linears (copy bandwidth {record['copy_bandwidth_Bps'] / 1e12:.2f} TB/s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
