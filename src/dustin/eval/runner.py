"""Running the evaluation: every policy at equal budget, one sample at a time, resumable.

Two runners share each sample's prefill across all methods:
- `lockstep` (ppl, recovery): teacher-forced on a book's true continuation in verification chunks of
  `gamma + 1` tokens. Per chunk the draft reads the chunk (its lookahead signal), every policy verifies
  it with its own selection, and one full pass gives the ground truth: NLL per policy, attention
  recovery per layer against the full attention of all heads, KL and top-1 agreement against the full
  logits. The full pass runs last, so the committed K/V are exact for every policy alike.
- `generate` (retrieval, agreement, acceptance): greedy speculative generation per method and policy,
  each from the same prefilled caches.
Each finished sample is appended to a JSONL file at once; a rerun skips the samples already there.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import SelectionConfig, SpecConfig
from ..errors import DustinError
from ..model import QueryCapture, Transformer
from ..selection import make_policy
from ..selection.metrics import capture_all, kl_divergence, layer_probs, recovery_from_probs
from ..speculative import Generator
from . import tasks
from .haystack import load_texts

SPARSE_POLICIES = ("dustin", "dustin-adaptive", "history", "lookahead", "oracle", "streaming", "snapkv", "quest")
DEFAULT_POLICIES = ("full",) + SPARSE_POLICIES
RUNNERS = {"ppl": "lockstep", "recovery": "lockstep", "retrieval": "retrieval", "agreement": "agreement",
           "acceptance": "agreement"}


@dataclass
class EvalConfig:
    task: str
    context: int = 2048
    budgets: tuple[float, ...] = (0.016, 0.03, 0.06)  # of the context, rounded to multiples of 16
    policies: tuple[str, ...] = DEFAULT_POLICIES
    limit: int = 4  # samples
    gamma: int = 4
    new_tokens: int = 48  # agreement: tokens generated; retrieval uses 24
    continuation: int = 160  # ppl: tokens scored after the context
    guard: float = 0.6  # the dustin-guard policy's recovery threshold
    seed: int = 0
    dtype: str = "bfloat16"
    target: str = "default:target"
    draft: str = "default:draft"
    data: str | None = None
    selection_config: str | None = None
    draft_weights: str = "native"  # what the draft's few-row passes read (`SpecConfig.draft_weights`)

    def budget_tokens(self) -> list[int]:
        return [max(32, int(round(f * self.context / 16)) * 16) for f in self.budgets]


class Store:
    """Finished samples, one JSON line each, written and flushed as each finishes."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut off by an interruption: that sample runs again
                    self.records[rec["id"]] = rec

    def add(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["id"]] = record


@dataclass
class Context:
    """Models, tokenizer and the policies to compare."""

    cfg: EvalConfig
    target: Transformer
    draft: Transformer
    tokenizer: object
    texts: dict[str, str]
    tuned: object
    settings: dict = field(default_factory=dict)

    def policy_config(self, name: str, budget: int) -> SelectionConfig:
        base = self.tuned.selection_config(self.target, self.draft, budget=budget)
        variants = {"dustin": {}, "dustin-adaptive": {"adaptive": True}, "dustin-guard": {"guard": self.cfg.guard},
                    "history": {"policy": "history"}, "lookahead": {"policy": "lookahead"},
                    "oracle": {"policy": "oracle"}, "oracle-shared": {"policy": "oracle", "oracle_shared": True},
                    "streaming": {"policy": "streaming"}, "snapkv": {"policy": "snapkv"}, "quest": {"policy": "quest"}}
        if name not in variants:
            raise DustinError(f"unknown policy {name!r}; choose from full, {', '.join(variants)}")
        return dataclasses.replace(base, **variants[name])

    def runs(self) -> list[tuple[str, int | None]]:
        """(policy, budget) pairs: `full` once, every other policy at every budget."""
        out = [("full", None)] if "full" in self.cfg.policies else []
        return out + [(p, b) for b in self.cfg.budget_tokens() for p in self.cfg.policies if p != "full"]


def run_key(policy: str, budget: int | None) -> str:
    return policy if budget is None else f"{policy}@{budget}"


# --- lockstep: ppl and recovery -------------------------------------------------------------------
@torch.no_grad()
def lockstep_sample(ctx: Context, sample: tasks.Sample) -> dict:
    cfg, target, draft = ctx.cfg, ctx.target, ctx.draft
    T = cfg.gamma + 1
    dev = target.device
    prompt = torch.tensor([sample.prompt], device=dev)
    cont = sample.continuation
    n_chunks = len(cont) // T
    for m in (target, draft):
        m.setup_cache(1, len(sample.prompt) + n_chunks * T + 2)
        m.prefill(prompt[:, :-1])
    lens = torch.tensor([len(sample.prompt) - 1], device=dev)
    runs = [(p, b) for p, b in ctx.runs() if p != "full"]
    policies = {run_key(p, b): make_policy(ctx.policy_config(p, b)) for p, b in runs}
    for pol in policies.values():
        pol.reset(target, draft, prompt, lens)
    draft_heads: dict[int, set[int]] = {}
    for pol in policies.values():
        for layer, heads in getattr(pol.config, "draft_heads", {}).items():
            draft_heads.setdefault(layer, set()).update(heads)
    dcap = QueryCapture({layer: sorted(h) for layer, h in draft_heads.items()})
    keys = ["full"] + list(policies)
    acc = {k: {"nll": [], "kl": [], "top1": [], "recovery": [], "guarded": 0} for k in keys}
    last = sample.prompt[-1]
    for c in range(n_chunks):
        y = cont[c * T:(c + 1) * T]
        inp = torch.tensor([[last] + y[:-1]], device=dev)
        target_y = torch.tensor([y], device=dev)
        if dcap.heads:
            draft.decode(inp, capture=dcap)
            at = torch.arange(cfg.gamma, device=dev)[None]
            for pol in policies.values():
                sub = pol.draft_capture()
                if sub is not None:
                    sub.q = {layer: dcap.q[layer][:, [sorted(draft_heads[layer]).index(h) for h in hs]]
                             for layer, hs in sub.heads.items()}
                    pol.observe_draft(draft, sub, at)
        draft.commit(T)
        sparse = {}
        for key, pol in policies.items():
            used: dict[int, torch.Tensor] = {}
            idx = pol.select(target, inp)
            if callable(idx):
                fn = idx
                idx = lambda layer, q, fn=fn, used=used: used.setdefault(layer, fn(layer, q))  # noqa: E731
            tcap = pol.target_capture()
            logits = target.decode(inp, indices=idx, capture=tcap)
            guarded = pol.needs_full(target, tcap) and idx is not None
            sparse[key] = (logits, idx if not callable(idx) else [used[layer] for layer in range(target.args.n_layers)],
                           guarded, tcap)
        full_cap = capture_all(target)
        full = target.decode(inp, capture=full_cap)
        probs = layer_probs(target, full_cap)
        n_acc = torch.tensor([cfg.gamma], device=dev)  # teacher forcing: the whole chunk is kept
        acc["full"]["nll"].append(_nll(full, target_y))
        for key, pol in policies.items():
            logits, idx, guarded, tcap = sparse[key]
            if guarded:
                acc[key]["guarded"] += 1
                logits = full
            a = acc[key]
            a["nll"].append(_nll(logits, target_y))
            a["kl"].append(float(kl_divergence(full, logits).mean()))
            a["top1"].append(float((full.argmax(-1) == logits.argmax(-1)).float().mean()))
            rec = recovery_from_probs(probs, idx, target.seq_lens, target.args.n_kv_heads)[:, 0]
            a["recovery"].append(rec.tolist())
            pol.observe_target(target, tcap, n_acc, torch.ones(1, dtype=torch.long, device=dev))
        target.commit(T)
        last = y[-1]
    out = {"id": sample.id, "meta": sample.meta, "chunks": n_chunks, "runs": {}}
    for key in keys:
        a = acc[key]
        r = {"nll_sum": sum(a["nll"]), "tokens": n_chunks * T}
        if key != "full":
            r.update(kl=sum(a["kl"]) / n_chunks, top1=sum(a["top1"]) / n_chunks, guarded=a["guarded"],
                     recovery_by_layer=[sum(x) / n_chunks for x in zip(*a["recovery"])])
        out["runs"][key] = r
    return out


def _nll(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cross_entropy(logits[0].float(), y[0], reduction="sum"))


# --- generation: retrieval, agreement and acceptance ----------------------------------------------
@torch.no_grad()
def generate_sample(ctx: Context, sample: tasks.Sample, *, new_tokens: int, methods: bool) -> dict:
    """Greedy generations from one prefill: `full` (sd), every policy x budget, and with `methods` also
    ar, magicdec and dustin with the draft reading the verification set."""
    cfg, target, draft = ctx.cfg, ctx.target, ctx.draft
    need = len(sample.prompt) + new_tokens + cfg.gamma + 2
    for m in (target, draft):
        m.setup_cache(1, need)
        m.prefill(torch.tensor([sample.prompt[:-1]], device=target.device))
    saved = [m.seq_lens.clone() for m in (target, draft)]
    runs: list[tuple[str, SpecConfig, object]] = []
    base = dict(gamma=cfg.gamma, max_new_tokens=new_tokens, max_len=need, draft_weights=cfg.draft_weights)
    if methods:
        runs += [("ar", SpecConfig(method="ar", **base), None), ("magicdec", SpecConfig(method="magicdec", **base), None)]
    for policy, budget in ctx.runs():
        if policy == "full":
            runs.append(("full", SpecConfig(method="sd", **base), None))
            continue
        sel = ctx.policy_config(policy, budget)
        runs.append((run_key(policy, budget), SpecConfig(method="dustin", **base), sel))
        if methods and policy == "dustin":
            runs.append((run_key("dustin+draft-selected", budget),
                         SpecConfig(method="dustin", draft_kv="selected", **base), sel))
    out = {"id": sample.id, "meta": sample.meta, "answers": sample.answers, "runs": {}}
    for key, spec, sel in runs:
        for m, s in zip((target, draft), saved):
            m.cache.seq_lens.copy_(s)
        gen = Generator(target, draft if spec.method != "ar" else None, spec, tokenizer=ctx.tokenizer,
                        policy=make_policy(sel) if sel is not None else None)
        res = gen.generate([sample.prompt], reuse_prefill=True)
        st = res.stats
        rec = {"tokens": res.tokens[0], "text": res.texts[0], "steps": st.steps, "accepted": st.accepted,
               "proposed": st.proposed, "guarded": st.guarded,
               "per_step": {str(k): v for k, v in sorted(st.per_step.items())}}
        if sample.answers:
            rec["score"] = tasks.score_retrieval(res.texts[0].split("\n")[0], sample.answers)
        out["runs"][key] = rec
    return out


# --- driving a task -------------------------------------------------------------------------------
def build_samples(ctx: Context) -> list[tasks.Sample]:
    cfg, tok, texts = ctx.cfg, ctx.tokenizer, ctx.texts
    runner = RUNNERS[cfg.task]
    make = {
        "lockstep": lambda i: tasks.ppl_sample(tok, texts, context=cfg.context, continuation=cfg.continuation,
                                               seed=cfg.seed, i=i),
        "retrieval": lambda i: tasks.retrieval_sample(tok, texts, context=cfg.context, seed=cfg.seed, i=i),
        "agreement": lambda i: tasks.agreement_sample(tok, texts, context=cfg.context, seed=cfg.seed, i=i),
    }[runner]
    return [make(i) for i in range(cfg.limit)]


def run_task(ctx: Context, out_dir: Path, *, progress=None) -> dict:
    """Run (or resume) the task's samples, then aggregate every finished one into the result dict."""
    cfg = ctx.cfg
    runner = RUNNERS[cfg.task]
    store = Store(out_dir / f"{runner}.jsonl")
    # before any work: a sample added to a file of other settings would make it resumable under none
    mismatched = [i for i, r in store.records.items() if r.get("settings") != ctx.settings]
    if mismatched:
        raise DustinError(f"{store.path} holds samples made with other settings ({mismatched[:3]}); use another "
                          "--out-dir, or the settings they were made with")
    samples = build_samples(ctx)
    todo = [s for s in samples if s.id not in store.records]
    for s in todo:
        start = time.perf_counter()
        if runner == "lockstep":
            rec = lockstep_sample(ctx, s)
        else:
            rec = generate_sample(ctx, s, new_tokens=24 if runner == "retrieval" else cfg.new_tokens,
                                  methods=runner == "agreement")
        rec["settings"] = ctx.settings
        store.add(rec)
        if progress is not None:
            progress(s.id, time.perf_counter() - start)
    return aggregate(cfg.task, [store.records[s.id] for s in samples if s.id in store.records])


def aggregate(task: str, records: list[dict]) -> dict:
    """Per run (policy@budget): the task's scores over all finished samples (deterministic: no timings)."""
    keys = list(records[0]["runs"]) if records else []
    out = {"samples": [r["id"] for r in records], "runs": {}}
    for key in keys:
        rs = [r["runs"][key] for r in records]
        if task == "ppl":
            nll, n = sum(r["nll_sum"] for r in rs), sum(r["tokens"] for r in rs)
            out["runs"][key] = {"ppl": math.exp(nll / n), "nll_per_token": nll / n, "tokens": n}
        elif task == "recovery":
            if key == "full":
                continue
            layers = [sum(x) / len(rs) for x in zip(*[r["recovery_by_layer"] for r in rs])]
            out["runs"][key] = {"recovery": sum(layers) / len(layers), "recovery_by_layer": layers,
                                "kl": sum(r["kl"] for r in rs) / len(rs), "top1": sum(r["top1"] for r in rs) / len(rs),
                                "guarded_chunks": sum(r["guarded"] for r in rs)}
        elif task == "retrieval":
            by_kind: dict[str, list[float]] = {}
            for rec, r in zip(records, rs):
                by_kind.setdefault(rec["meta"]["kind"], []).append(r["score"])
            out["runs"][key] = {"score": sum(r["score"] for r in rs) / len(rs),
                                "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}
        elif task in ("agreement", "acceptance"):
            ref = [r["runs"]["ar"]["tokens"] for r in records]
            if task == "agreement":
                first = [_first_divergence(r["tokens"], a) for r, a in zip(rs, ref)]
                match = [sum(x == y for x, y in zip(r["tokens"], a)) / max(1, len(a)) for r, a in zip(rs, ref)]
                out["runs"][key] = {"matching_share": sum(match) / len(match),
                                    "tokens_before_divergence": sum(first) / len(first)}
            elif key != "ar":
                hist: dict[str, int] = {}
                for r in rs:
                    for k, v in r["per_step"].items():
                        hist[k] = hist.get(k, 0) + v
                steps = sum(hist.values())
                out["runs"][key] = {"mean_tokens_per_step": sum(int(k) * v for k, v in hist.items()) / steps,
                                    "acceptance_rate": sum(r["accepted"] for r in rs) / max(1, sum(r["proposed"] for r in rs)),
                                    "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
                                    "guarded_steps": sum(r["guarded"] for r in rs)}
    return out


def _first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def make_context(cfg: EvalConfig, *, device: str = "cpu", models=None) -> Context:
    """Load models, tokenizer, texts and the tuned selection (or take `models` = (target, draft, tokenizer, tuned))."""
    from ..loading import load_model, load_tokenizer
    from ..selection.tuning import TunedConfig

    if cfg.task not in RUNNERS:
        raise DustinError(f"unknown task {cfg.task!r}; choose from {', '.join(RUNNERS)}")
    texts = load_texts(cfg.data)
    if models is None:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
        target = load_model(cfg.target, device=device, dtype=dtype)
        draft = load_model(cfg.draft, device=device, dtype=dtype)
        tokenizer = load_tokenizer(cfg.target)
        path = cfg.selection_config
        if path is None:
            from importlib.resources import files

            path = str(files("dustin") / "data" / "configs" / "default-pair.json")
        tuned = TunedConfig.load(path)
    else:
        target, draft, tokenizer, tuned = models
    # native draft weights are left out: samples recorded before the option existed still resume
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("task", "limit") and (k, v) != ("draft_weights", "native")}
    settings["budget_tokens"] = cfg.budget_tokens()
    settings["data_files"] = sorted(texts)
    settings = json.loads(json.dumps(settings))  # as a resumed run reads them back (tuples become lists)
    return Context(cfg, target, draft, tokenizer, texts, tuned, settings)
