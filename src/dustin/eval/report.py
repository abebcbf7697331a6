"""Tables and plots from aggregated evaluation results."""
from __future__ import annotations

METRIC = {"ppl": ("ppl", "perplexity", False), "retrieval": ("score", "exact match", True),
          "agreement": ("matching_share", "tokens matching ar", True),
          "acceptance": ("mean_tokens_per_step", "tokens per step", True),
          "recovery": ("recovery", "attention recovery", True)}


def split_key(key: str) -> tuple[str, int | None]:
    name, _, budget = key.partition("@")
    return name, int(budget) if budget else None


def table(task: str, result: dict, context: int) -> str:
    """Policies as rows, budgets (tokens and share of the context) as columns."""
    metric, label, _ = METRIC[task]
    runs = result["runs"]
    budgets = sorted({b for b in (split_key(k)[1] for k in runs) if b is not None})
    names = list(dict.fromkeys(split_key(k)[0] for k in runs))
    head = f"| {label} | " + " | ".join(f"{b} ({b / context:.1%})" for b in budgets) + " |"
    rows = [head, "|---" * (len(budgets) + 1) + "|"]
    for name in names:
        if name in runs:  # reads the whole cache: the same at every budget
            vals = [runs[name].get(metric)] * len(budgets)
        else:
            vals = [runs.get(f"{name}@{b}", {}).get(metric) for b in budgets]
        rows.append(f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |")
    if task == "recovery":
        rows += ["", "| KL(full \\|\\| sparse), nats | " + " | ".join(str(b) for b in budgets) + " |",
                 "|---" * (len(budgets) + 1) + "|"]
        for name in names:
            rows.append(f"| {name} | " + " | ".join(_fmt(runs.get(f"{name}@{b}", {}).get("kl"), 4) for b in budgets) + " |")
    return "\n".join(rows)


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def plot(results: dict[str, dict], context: int, path) -> None:
    """Score against budget per policy, one panel per task; and recovery per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in METRIC if t in results]
    extra = 1 if "recovery" in results else 0
    fig, axes = plt.subplots(1, len(tasks) + extra, figsize=(5 * (len(tasks) + extra), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric, label, _ = METRIC[task]
        runs = results[task]["runs"]
        by_name: dict[str, list[tuple[int, float]]] = {}
        for key, r in runs.items():
            name, budget = split_key(key)
            if budget is not None:
                by_name.setdefault(name, []).append((budget, r[metric]))
        for name, pts in by_name.items():
            pts.sort()
            ax.plot([100 * b / context for b, _ in pts], [v for _, v in pts], marker="o", label=name)
        for ref in ("full", "sd"):
            if ref in runs:
                ax.axhline(runs[ref][metric], color="k", linestyle="--", label=f"{ref} (whole cache)")
        ax.set_xlabel("budget, % of context")
        ax.set_title(label)
    if extra:
        ax = axes[0][-1]
        runs = results["recovery"]["runs"]
        budgets = sorted({split_key(k)[1] for k in runs})
        mid = budgets[len(budgets) // 2]
        for name in ("oracle", "dustin", "history", "lookahead", "quest", "streaming"):
            r = runs.get(f"{name}@{mid}")
            if r:
                ax.plot(r["recovery_by_layer"], label=name)
        ax.set_xlabel("target layer")
        ax.set_title(f"attention recovery per layer, budget {mid}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
