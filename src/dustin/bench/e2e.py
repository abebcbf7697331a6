"""`dustin bench e2e`: whole decoding steps of each method on a GPU, at real model shapes.

Weights and cache contents are random (their values do not change the cost); the caches are filled to
the context length directly instead of by a prefill. Every step runs the engine's own step function
(draft, scoring and selection, verification through the project's kernels, acceptance, commit and
rollback), captured in a CUDA graph. Acceptance is forced: each step accepts a number of drafts per
sequence drawn from a given distribution, through the real acceptance and rollback path, the same for
every method. Between timed steps the caches are set back to the nominal context.

Tokens per second = batch x tokens per step / step time, at the paper's mean acceptance length 2.2
and, when given, at the acceptance lengths measured on the real pair by `dustin eval` (each figure
says which one it used).
"""
from __future__ import annotations

import dataclasses
import json
import statistics

import torch

from .. import pdl
from ..config import SelectionConfig, SpecConfig
from ..loading import random_model
from ..model import Transformer
from ..sampling import greedy_accept
from ..selection import make_policy
from ..shapes import get_shape
from ..speculative import _NO_CLOCK, Generator, _State
from .common import copy_bandwidth

PAIRS = {"qwen2.5-7b": "qwen2.5-0.5b", "llama-3.1-8b": "llama-3.2-1b"}
METHODS = {
    "ar": dict(method="ar"),
    "sd": dict(method="sd"),
    "magicdec": dict(method="magicdec"),
    "dustin": dict(method="dustin"),
    "dustin+draft-selected": dict(method="dustin", draft_kv="selected"),
    "dustin+draft-selected+fused-linear-draft": dict(method="dustin", draft_kv="selected", draft_linear="triton"),
    "dustin+draft-selected+down-draft": dict(method="dustin", draft_kv="selected", draft_linear="down"),
    "dustin+draft-selected+cublas-draft": dict(method="dustin", draft_kv="selected", draft_linear="torch"),
    # every draft projection and its LM head in the fused kernels, reading fp8 copies of the weights
    "dustin+draft-selected+fp8-draft": dict(method="dustin", draft_kv="selected", draft_linear="triton",
                                            draft_weights="fp8"),
    "dustin-adaptive+draft-selected": dict(method="dustin", draft_kv="selected", adaptive=True),
    # the same step with every kernel launched the usual way (`dustin.pdl`), side by side
    "dustin+draft-selected+no-pdl": dict(method="dustin", draft_kv="selected", pdl=False),
    # ... and with the verification's index set read in 64-key tiles (`decode.use_sparse_tiles`)
    "dustin+draft-selected+sparse-tiles-64": dict(method="dustin", draft_kv="selected", sparse_tiles=64),
    # ... and with every index-set tile gathered after the PDL wait (`decode.use_early_gather`)
    "dustin+draft-selected+late-gather": dict(method="dustin", draft_kv="selected", early_gather=False),
}
SLACK = 64


def acceptance_distribution(mean_tokens: float, gamma: int) -> list[float]:
    """P(n accepted drafts), n = 0..gamma: a truncated geometric whose mean is `mean_tokens - 1`."""
    target = mean_tokens - 1
    lo, hi = 1e-6, 1e6
    for _ in range(200):
        r = (lo * hi) ** 0.5
        w = [r**n for n in range(gamma + 1)]
        mean = sum(n * x for n, x in enumerate(w)) / sum(w)
        lo, hi = (r, hi) if mean < target else (lo, r)
    total = sum(w)
    return [x / total for x in w]


def read_bytes(model: Transformer) -> int:
    """Weight bytes one forward pass reads: everything but the embedding table (only B x T rows of it)."""
    a = model.args
    n = a.n_params() - (0 if a.tie_word_embeddings else a.vocab_size * a.dim)
    return n * model.dtype.itemsize


def step_bytes(name: str, target: Transformer, draft: Transformer, *, batch: int, context: int, gamma: int,
               budget: int, draft_budget: int, sel: SelectionConfig) -> int:
    """The fewest bytes one step must move (weights once per pass, each KV entry it reads once)."""
    T = gamma + 1
    kv_t = target.args.kv_bytes_per_token(target.dtype.itemsize) * batch
    kv_d = draft.args.kv_bytes_per_token(draft.dtype.itemsize) * batch
    if name == "ar":
        return read_bytes(target) + kv_t * (context + 1)
    spec = METHODS[name]
    draft_ctx = {"magicdec": draft_budget}.get(spec["method"], context)
    if spec.get("draft_kv") == "selected":
        draft_ctx = budget + sel.n_recent
    draft_weights = read_bytes(draft) // (2 if spec.get("draft_weights") == "fp8" else 1)  # norms aside, fp8 halves
    total = gamma * (draft_weights + kv_d * (draft_ctx + 2))
    if spec["method"] != "dustin":
        return total + read_bytes(target) + kv_t * (context + T)
    key = lambda m, layer_heads: sum(len({h // m.args.group_size for h in hs}) for hs in layer_heads.values()) \
        * m.args.head_dim * m.dtype.itemsize * batch * context  # noqa: E731
    score = key(target, sel.target_heads) + key(draft, sel.draft_heads)  # the draft scores a step's queries at once
    return total + read_bytes(target) + kv_t * (budget + T) + score


def _fill(model: Transformer, batch: int, context: int, max_len: int) -> None:
    cache = model.setup_cache(batch, max_len)
    for layer in range(model.args.n_layers):  # layer by layer: no full-size temporary
        cache.k[layer].normal_()
        cache.v[layer].normal_()
    cache.seq_lens.fill_(context)


def time_replays(fn, restore, *, replays: int, before=None) -> list[float]:
    """Capture `fn` once; time each replay with events; call `restore` (untimed) after each."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        restore()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    restore()
    times = []
    for _ in range(replays + 2):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        restore()
    del graph
    return times[2:]


def bench_method(name: str, target: Transformer, draft: Transformer, *, batch: int, context: int, gamma: int,
                 budget: int, draft_budget: int, sel: SelectionConfig, dist: list[float], replays: int,
                 profile: bool = False) -> dict:
    from ..attention.decode import use_early_gather, use_sparse_tiles  # triton: only when a GPU bench runs

    spec = dict(METHODS[name])
    adaptive = spec.pop("adaptive", False)
    was = pdl.is_enabled()
    pdl.set_enabled(spec.pop("pdl", True) and was)
    try:
        on = pdl.options(target.device)["PDL"]
        with use_sparse_tiles(spec.pop("sparse_tiles", None)), use_early_gather(spec.pop("early_gather", True)):
            out = _bench(spec, adaptive, target, draft, batch=batch, context=context, gamma=gamma,
                         draft_budget=draft_budget, sel=sel, dist=dist, replays=replays, profile=profile)
    finally:
        pdl.set_enabled(was)
    out["pdl"] = on
    return out


def _bench(spec: dict, adaptive: bool, target: Transformer, draft: Transformer, *, batch: int, context: int,
           gamma: int, draft_budget: int, sel: SelectionConfig, dist: list[float], replays: int,
           profile: bool) -> dict:
    cfg = SpecConfig(gamma=gamma, max_len=context + SLACK, draft_budget=draft_budget, **spec)
    policy = None
    if cfg.method == "dustin":
        policy = make_policy(dataclasses.replace(sel, adaptive=adaptive))
    gen = Generator(target, draft if cfg.method != "ar" else None, cfg, policy=policy,
                    vocab_size=min(target.args.vocab_size, draft.args.vocab_size))
    dev = target.device
    g = torch.Generator(device=dev).manual_seed(0)
    st = _State.start(torch.randint(0, 1000, (batch,), device=dev, generator=g), gamma)
    st.forced = torch.zeros(batch, dtype=torch.long, device=dev)
    from ..speculative import SpecStats

    gen.stats = SpecStats(cfg.method, gamma, batch)
    models = [target] if cfg.method == "ar" else [target, draft]
    if policy is not None:
        policy.reset(target, draft, None, target.seq_lens)
        policy.s_T.uniform_()
        policy.s_D.uniform_()
        policy.has_history = True
        policy.select(target, None)  # so the draft may read the set from the first captured step on
    saved = [m.cache.seq_lens.clone() for m in models]
    probs = torch.tensor(dist, device=dev)

    def restore():
        for m, s in zip(models, saved):
            m.cache.seq_lens.copy_(s)

    def draw():
        st.forced.copy_(torch.multinomial(probs, batch, replacement=True, generator=g))

    torch.cuda.reset_peak_memory_stats(dev)
    step = time_replays(lambda: gen._step(st, None, _NO_CLOCK), restore, replays=replays, before=draw)
    out = {"step_s": statistics.median(step), "step_s_all": step,
           "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30}

    # the step's parts, each captured alone with the same state
    tokens = torch.cat([st.last[:, None], st.drafted], 1)
    phases = {}
    if cfg.method != "ar":
        phases["draft"] = lambda: gen._draft(st, None)
    if policy is not None:
        phases["select"] = lambda: policy.select(target, tokens)
        cap = policy.target_capture()
        target.decode(tokens, indices=policy.indices, capture=cap, check=False)
        n_acc = st.forced if st.forced is not None else torch.zeros_like(st.n_acc)
        phases["score_target"] = lambda: policy.observe_target(target, cap, n_acc, st.live)
        phases["score_draft"] = policy.score_lookahead  # part of select: the step's draft queries, once
    indices = policy.indices if policy is not None else None
    verify_tokens = tokens[:, :1] if cfg.method == "ar" else tokens
    phases["verify"] = lambda: target.decode(verify_tokens, indices=indices, check=False)
    phases["verify_attention"] = lambda: _attention_only(target, verify_tokens.shape[1], indices)
    logits = target.decode(verify_tokens, indices=indices, check=False)
    phases["accept"] = lambda: greedy_accept(st.drafted, logits) if cfg.method != "ar" else logits[:, 0].argmax(-1)
    for phase, fn in phases.items():
        out[f"{phase}_s"] = statistics.median(time_replays(fn, restore, replays=max(5, replays // 2)))
    if profile:
        out["kernels"] = _profile(lambda: gen._step(st, None, _NO_CLOCK), restore)
    del gen
    return out


def _profile(fn, restore, replays: int = 3) -> list[dict]:
    """The kernels one captured step spends its time in, per step, most expensive first."""
    from torch.profiler import ProfilerActivity, profile

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    restore()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
            torch.cuda.synchronize()
            restore()
    rows = [{"kernel": e.key[:90], "per_step_us": e.device_time_total / replays, "count": e.count // replays}
            for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r["per_step_us"])[:25]


def _attention_only(model: Transformer, T: int, indices) -> None:
    """Every layer's verification attention kernel, on the model's own cache (what `verify` spends in it)."""
    from .. import attention

    a, cache = model.args, model.cache
    q = _attention_only.q.get((a.n_heads, T, a.head_dim))
    if q is None:
        q = torch.randn(cache.batch, a.n_heads, T, a.head_dim, device=model.device, dtype=model.dtype)
        _attention_only.q[(a.n_heads, T, a.head_dim)] = q
    for layer in range(a.n_layers):
        attention.attend(q, cache.k[layer], cache.v[layer], cache.seq_lens, indices=indices, backend="triton")


_attention_only.q = {}


def default_selection(target: Transformer, draft: Transformer, budget: int) -> SelectionConfig:
    """Paper-like heads for random weights: 1 target layer x 4 heads, 3 draft layers x 4 heads."""
    t, d = target.args, draft.args
    return SelectionConfig(policy="dustin", budget=budget, m=(budget - 20) // 4,
                           target_heads={t.n_layers // 2: [0, 1, 2, 3]},
                           draft_heads={layer: [0, 1, 2, 3] for layer in (d.n_layers // 2 - 1, d.n_layers // 2,
                                                                            d.n_layers // 2 + 1)})


def run(*, pairs=tuple(PAIRS), contexts=(8192, 16384, 32768), batches=(8, 16), methods=tuple(METHODS), gamma=4,
        budget=512, draft_budget=512, accept=2.2, measured: dict | None = None, replays=20, profile=False,
        progress=print) -> dict:
    dev = torch.device("cuda")
    copy = copy_bandwidth(dev)
    bw = copy["best"]
    progress(f"device-to-device copy: {bw / 1e12:.2f} TB/s")
    dist = acceptance_distribution(accept, gamma)
    results = []
    for t_name in pairs:
        d_name = PAIRS[t_name]
        longest = max(contexts) + SLACK
        # random weights: extend the positions so every nominal context fits (RoPE works at any position)
        t_args = dataclasses.replace(get_shape(t_name), max_position_embeddings=max(longest, 32768))
        d_args = dataclasses.replace(get_shape(d_name), max_position_embeddings=max(longest, 32768))
        target = random_model(t_args, device=dev, dtype=torch.bfloat16)
        draft = random_model(d_args, device=dev, dtype=torch.bfloat16)
        sel = default_selection(target, draft, budget)
        for ctx in contexts:
            for b in batches:
                _fill(target, b, ctx, ctx + SLACK)
                _fill(draft, b, ctx, ctx + SLACK)
                for name in methods:
                    r = bench_method(name, target, draft, batch=b, context=ctx, gamma=gamma, budget=budget,
                                     draft_budget=draft_budget, sel=sel, dist=dist, replays=replays,
                                     profile=profile)
                    r.update(pair=f"{t_name}/{d_name}", target=t_name, draft=d_name, method=name, context=ctx,
                             batch=b, gamma=gamma, budget=budget)
                    r["bytes"] = step_bytes(name, target, draft, batch=b, context=ctx, gamma=gamma, budget=budget,
                                            draft_budget=draft_budget, sel=sel)
                    r["floor_s"] = r["bytes"] / bw
                    r["roofline_frac"] = r["floor_s"] / r["step_s"]
                    results.append(r)
                    progress(f"{t_name} {ctx} x{b} {name}: step {r['step_s'] * 1e3:.2f} ms (floor "
                             f"{r['floor_s'] * 1e3:.2f} ms, {r['roofline_frac']:.0%})")
                for m in (target, draft):
                    m.cache = None
                torch.cuda.empty_cache()
        del target, draft
        torch.cuda.empty_cache()
    record = {"copy_bandwidth_Bps": bw, "copy_bandwidth": copy, "accept_paper": accept,
              "accept_measured": measured or {}, "accept_distribution": dist,
              "selection": sel.to_dict(), "results": results}
    add_throughput(record, measured or {})
    return record


def add_throughput(record: dict, measured: dict) -> None:
    """Tokens per second and speedup over `ar` of the same case, at each acceptance source."""
    by_case = {}
    for r in record["results"]:
        by_case.setdefault((r["pair"], r["context"], r["batch"]), {})[r["method"]] = r
    for case in by_case.values():
        ar = case.get("ar")
        for name, r in case.items():
            sources = {"paper 2.2": record["accept_paper"]}
            if name in measured or (name == "ar" and measured):
                sources["measured on the real pair"] = measured.get(name, 1.0)
            r["throughput"] = {}
            for label, acc in sources.items():
                tokens = 1.0 if name == "ar" else acc
                tps = r["batch"] * tokens / r["step_s"]
                entry = {"accept": tokens, "tokens_per_s": tps}
                if ar is not None:
                    entry["speedup_vs_ar"] = tps / (r["batch"] / ar["step_s"])
                r["throughput"][label] = entry


def load_measured(path, *, budget_fraction: float) -> dict:
    """Mean tokens per step per benchmarked method, from a `dustin eval acceptance` result, taking the
    evaluated budget closest to `budget_fraction` of the context for the dustin runs."""
    from ..errors import DustinError

    try:
        data = json.loads(open(path).read())
        runs, context = data["runs"], int(data["settings"]["context"])
        budgets = sorted({int(k.split("@")[1]) for k in runs if "@" in k})
        if not budgets or context < 1:
            raise ValueError("no dustin runs at a budget" if context >= 1 else "no context")
        b = min(budgets, key=lambda x: abs(x / context - budget_fraction))
        names = {"sd": "full", "magicdec": "magicdec", "dustin": f"dustin@{b}",
                 "dustin+draft-selected": f"dustin+draft-selected@{b}"}
        out = {m: float(runs[k]["mean_tokens_per_step"]) for m, k in names.items() if k in runs}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DustinError(f"{path} is not a `dustin eval acceptance` result ({type(e).__name__}: {e})") from None
    out["_source"] = f"{path}: budget {b} of {context} tokens"
    return out


def table(record: dict) -> str:
    measured = "measured on the real pair"
    rows = ["| pair | ctx | batch | method | step ms | floor ms | roofline | tok/s @2.2 | speedup vs ar @2.2 "
            "| tokens/step measured | speedup vs ar, measured | peak GiB |", "|" + "---|" * 12]
    for r in record["results"]:
        t = r["throughput"]["paper 2.2"]
        m = r["throughput"].get(measured)
        mcols = f"{m['accept']:.2f} | {m.get('speedup_vs_ar', float('nan')):.2f}x" if m else "- | -"
        rows.append(f"| {r['pair']} | {r['context']} | {r['batch']} | {r['method']} | {r['step_s'] * 1e3:.2f} | "
                    f"{r['floor_s'] * 1e3:.2f} | {r['roofline_frac']:.0%} | {t['tokens_per_s']:.0f} | "
                    f"{t.get('speedup_vs_ar', float('nan')):.2f}x | {mcols} | {r['peak_memory_gib']:.1f} |")
    return "\n".join(rows)


def plot(record: dict, path) -> None:
    """Step time split into phases per method (the analogue of the paper's Fig. 1), largest case per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = record["results"]
    pairs = sorted({r["pair"] for r in res})
    fig, axes = plt.subplots(1, len(pairs), figsize=(7 * len(pairs), 4.5), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        rs = [r for r in res if r["pair"] == pair]
        ctx, b = max(r["context"] for r in rs), max(r["batch"] for r in rs)
        rs = [r for r in rs if r["context"] == ctx and r["batch"] == b]
        names = [r["method"] for r in rs]
        parts = {"draft": [], "scoring + selection": [], "verification attention": [], "rest of verification": [],
                 "acceptance / rollback": []}
        for r in rs:
            score = r.get("select_s", 0) + r.get("score_target_s", 0)
            parts["draft"].append(r.get("draft_s", 0) * 1e3)
            parts["scoring + selection"].append(score * 1e3)
            parts["verification attention"].append(r["verify_attention_s"] * 1e3)
            parts["rest of verification"].append(max(0.0, r["verify_s"] - r["verify_attention_s"]) * 1e3)
            parts["acceptance / rollback"].append(max(0.0, r["step_s"] - r.get("draft_s", 0) - r["verify_s"]
                                                      - r.get("select_s", 0) - r.get("score_target_s", 0)) * 1e3)
        bottom = [0.0] * len(rs)
        for label, vals in parts.items():
            ax.barh(names, vals, left=bottom, label=label)
            bottom = [x + y for x, y in zip(bottom, vals)]
        for i, r in enumerate(rs):
            ax.text(bottom[i], i, f" {r['step_s'] * 1e3:.1f} ms", va="center", fontsize=8)
        ax.set_xlabel("ms per step")
        ax.set_title(f"{pair}, {ctx // 1024}k, batch {b}")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
