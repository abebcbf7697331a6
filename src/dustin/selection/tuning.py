"""Offline configuration of a (target, draft) pair: layers by attention recovery, the split m by Optuna.

1. Record verification traces: greedy speculative decoding with full verification, where a recording
   policy keeps, per step, the true attention mass of all target heads and layers (the ground truth),
   the history signal of every target layer's retrieval heads and the lookahead signal of every draft
   layer's retrieval heads.
2. Pick the target layer whose history signal alone recovers the most attention; greedily add draft
   layers while the hybrid improves; tune `m` with Optuna's TPE sampler.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import SelectionConfig
from ..errors import DustinError
from ..model import QueryCapture
from .heads import check_fingerprint, fingerprint
from .indices import budget_split
from .metrics import full_attention_mass
from .policies import Policy, kv_heads_of
from .. import attention


@dataclass
class Traces:
    """Stacked verification steps (one row per sequence and step), padded to a common length `S`."""

    lens: torch.Tensor  # [N] committed length at the step
    truth: torch.Tensor  # [N, S] true attention mass per position, all heads and layers, summed
    captured_new: torch.Tensor  # [N] true mass on the new tokens
    total: torch.Tensor  # [N] all the mass
    history: torch.Tensor  # [n_target_layers, N, S] each layer's history signal from the step before
    lookahead: torch.Tensor  # [n_draft_layers, N, S] each draft layer's lookahead signal of the step

    def recovery(self, target_layers, draft_layers, m: int, *, budget: int, n_sink: int, n_recent: int) -> float:
        """Mean attention recovery of the Dustin split with these layers' signals."""
        hist = self.history[list(target_layers)].sum(0) if target_layers else torch.zeros_like(self.truth)
        look = self.lookahead[list(draft_layers)].sum(0) if draft_layers else torch.zeros_like(self.truth)
        idx = budget_split(hist, look, self.lens, m, budget=budget, n_sink=n_sink, n_recent=n_recent)
        inside = self.truth.gather(1, idx.clamp(0, self.truth.shape[1] - 1))
        inside = inside.masked_fill(idx >= self.lens[:, None], 0.0).sum(1)
        return float(((inside + self.captured_new) / self.total).mean())


class TraceRecorder(Policy):
    """Full verification that records what the search needs at every step."""

    name = "record"
    graph_safe = False

    def __init__(self, target_heads: dict[int, list[int]], draft_heads: dict[int, list[int]]):
        self.target_heads, self.draft_heads = target_heads, draft_heads
        self.rows: list[dict] = []

    def reset(self, target, draft, ids, lengths):
        self.prev_history = None

    def draft_capture(self):
        return QueryCapture(dict(self.draft_heads))

    def _per_layer(self, model, capture) -> torch.Tensor:
        """`[n_layers, B, T, S]` scores of each captured layer's heads."""
        backend = model.attention_backend
        return torch.stack([attention.score(q, model.cache.k[layer], model.seq_lens,
                                            kv_heads_of(model, capture.heads[layer]), backend=backend)
                            for layer, q in capture.q.items()])

    def observe_draft(self, draft, capture, at):
        scores = self._per_layer(draft, capture)
        if at is not None:
            self.lookahead = torch.zeros(scores.shape[0], scores.shape[1], scores.shape[3], device=scores.device)
            scores = scores.gather(2, at[None, :, :, None].expand(scores.shape[0], -1, 1, scores.shape[3]))
        self.lookahead += scores.sum(2)

    def select(self, target, tokens):
        mass = full_attention_mass(target, tokens).sum((0, 2))  # [B, S]
        lens = target.seq_lens.long()
        j = torch.arange(mass.shape[1], device=mass.device)[None]
        self.step = {"lens": lens.clone(), "truth": mass.masked_fill(j >= lens[:, None], 0.0),
                     "new": mass.masked_fill(j < lens[:, None], 0.0).sum(1),
                     "total": torch.full_like(lens, target.args.n_layers * target.args.n_heads * tokens.shape[1]).float()}
        return None

    def target_capture(self):
        return QueryCapture(dict(self.target_heads))

    def needs_full(self, target, capture):
        self.step_probs = self._per_layer(target, capture)  # [n_layers, B, T, S]
        return False

    def observe_target(self, target, capture, n_acc, live):
        if self.prev_history is not None:
            S_d = self.lookahead.shape[2]
            S = self.step["truth"].shape[1]
            for b in torch.nonzero(live).flatten().tolist():
                self.rows.append({"lens": self.step["lens"][b], "truth": self.step["truth"][b],
                                  "new": self.step["new"][b], "total": self.step["total"][b],
                                  "history": self.prev_history[:, b],
                                  "lookahead": F.pad(self.lookahead[:, b], (0, max(0, S - S_d)))[:, :S]})
        weights = (torch.arange(self.step_probs.shape[2])[None] == n_acc[:, None]).float()
        self.prev_history = torch.einsum("lbts,bt->lbs", self.step_probs, weights)

    def traces(self) -> Traces:
        if not self.rows:
            raise DustinError("no verification steps were recorded; generate more tokens per prompt")
        S = max(r["truth"].shape[0] for r in self.rows)

        def stack(key, dim=0):
            return torch.stack([F.pad(r[key], (0, S - r[key].shape[-1])) for r in self.rows], dim)

        return Traces(lens=torch.stack([r["lens"] for r in self.rows]), truth=stack("truth"),
                      captured_new=torch.stack([r["new"] for r in self.rows]),
                      total=torch.stack([r["total"] for r in self.rows]),
                      history=stack("history", 1), lookahead=stack("lookahead", 1))


def search(traces: Traces, *, budget: int, n_sink: int = 4, n_recent: int = 16, max_draft_layers: int = 3,
           trials: int = 40, seed: int = 0) -> dict:
    """Target layer, then draft layers (greedy), then `m` (Optuna). Returns the choices and their recoveries."""
    try:
        import optuna
    except ImportError as e:
        raise DustinError("tuning the split m needs optuna: pip install 'dustin[eval]' (or optuna)") from e

    rest = budget - n_sink - n_recent
    kw = dict(budget=budget, n_sink=n_sink, n_recent=n_recent)
    by_target = [traces.recovery([layer], [], 0, **kw) for layer in range(traces.history.shape[0])]
    t_layer = int(torch.tensor(by_target).argmax())
    grid = sorted({round(rest * f) for f in (0.125, 0.25, 0.375, 0.5, 0.75)})
    chosen, best = [], max(by_target)
    for _ in range(max_draft_layers):
        scores = {}
        for d in range(traces.lookahead.shape[0]):
            if d not in chosen:
                scores[d] = max(traces.recovery([t_layer], chosen + [d], m, **kw) for m in grid)
        if not scores:  # every draft layer is in
            break
        d, score = max(scores.items(), key=lambda kv: kv[1])
        if score <= best + 1e-4:
            break
        chosen.append(d)
        best = score
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(lambda t: traces.recovery([t_layer], chosen, t.suggest_int("m", 0, rest), **kw), n_trials=trials)
    m = int(study.best_params["m"])
    return {
        "target_layer": t_layer, "draft_layers": sorted(chosen), "m": m, "m_fraction": m / rest,
        "recovery": study.best_value,
        "recovery_history_only": traces.recovery([t_layer], [], 0, **kw),
        "recovery_lookahead_only": traces.recovery([], chosen, rest, **kw) if chosen else None,
        "recovery_by_target_layer": by_target, "steps": int(traces.lens.shape[0]),
    }


@dataclass
class TunedConfig:
    """What `dustin tune` writes and `dustin generate --method dustin` reads."""

    target: dict  # fingerprints
    draft: dict
    selection: dict  # SelectionConfig.to_dict() at the tuned budget
    m_fraction: float  # m / (budget - n_sink - n_recent), to carry the split to other budgets
    search: dict

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.__dict__, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "TunedConfig":
        try:
            tuned = cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise DustinError(f"no tuned config at {path}; make one with `dustin tune`") from None
        except OSError as e:
            raise DustinError(f"cannot read the tuned config {path} ({e.strerror})") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise DustinError(f"{path} is not a tuned dustin config ({e})") from None
        if not isinstance(tuned.selection, dict) or not isinstance(tuned.m_fraction, (int, float)):
            raise DustinError(f"{path} is not a tuned dustin config (its selection must be a mapping and its "
                              "m_fraction a number)")
        return tuned

    def selection_config(self, target=None, draft=None, *, budget: int | None = None, **overrides) -> SelectionConfig:
        """The tuned selection, checked against the loaded models, at `budget` (m rescaled) if given."""
        if target is not None:
            check_fingerprint(self.target, target, "tuned config's target")
        if draft is not None:
            check_fingerprint(self.draft, draft, "tuned config's draft")
        try:
            cfg = SelectionConfig.from_dict({**self.selection, **overrides})
            if budget is not None:
                cfg.budget = budget
                cfg.m = round(self.m_fraction * (budget - cfg.fixed))
            cfg.validate()
        except DustinError:
            raise
        except (TypeError, ValueError, AttributeError) as e:  # a hand-edited file: values of the wrong kind
            raise DustinError(f"the tuned config's selection is malformed ({e}); make a new one with "
                              "`dustin tune`") from None
        for heads, model, role in ((cfg.target_heads, target, "target"), (cfg.draft_heads, draft, "draft")):
            if model is not None:
                _check_heads(heads, model, role)
        return cfg


def _check_heads(heads: dict[int, list[int]], model, role: str) -> None:
    """Every (layer, head) the selection scores exists in `model`."""
    args = model.args
    for layer, hs in heads.items():
        if not 0 <= layer < args.n_layers or not all(0 <= h < args.n_heads for h in hs):
            raise DustinError(f"the tuned config scores {role} layer {layer}, heads {hs}, but the {role} has "
                              f"{args.n_layers} layers of {args.n_heads} heads; tune for this model")


def make_tuned(target, draft, target_heads, draft_heads, result: dict, *, budget: int, n_sink: int,
               n_recent: int, seconds: float, settings: dict) -> TunedConfig:
    sel = SelectionConfig(policy="dustin", budget=budget, n_sink=n_sink, n_recent=n_recent, m=result["m"],
                          target_heads={result["target_layer"]: target_heads[result["target_layer"]]},
                          draft_heads={d: draft_heads[d] for d in result["draft_layers"]})
    return TunedConfig(target=fingerprint(target), draft=fingerprint(draft), selection=sel.to_dict(),
                       m_fraction=result["m_fraction"], search={**result, "seconds": seconds, **settings})

