"""Retrieval-head profiling, after CompressKV: which heads look at a needle while the model retrieves it.

For needle-in-a-haystack prompts, decode greedily with attention probabilities on. Whenever the token
just generated is one of the needle's tokens, add to every (layer, head) the attention mass that head
put on the whole needle span. Average over the runs that answered correctly (ROUGE-1 recall > 0.5)
and keep the top heads of each layer.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..attention import reference
from ..errors import DustinError
from ..eval import haystack
from ..model import Transformer
from .metrics import capture_all


def _embedding_hash(model: Transformer, dtype: torch.dtype | None = None) -> str:
    sample = model.embed_tokens.weight[:64].detach()
    return hashlib.sha256((sample if dtype is None else sample.to(dtype)).float().cpu().numpy().tobytes()).hexdigest()


def fingerprint(model: Transformer) -> dict:
    """Identifies a model: its shape and hashes of part of its embedding table, as loaded and rounded to
    bf16 (the second matches the same checkpoint loaded in float32 or bf16)."""
    a = model.args
    return {"architecture": a.architecture, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
            "head_dim": a.head_dim, "dim": a.dim, "vocab_size": a.vocab_size,
            "embedding_sha256": _embedding_hash(model), "embedding_bf16_sha256": _embedding_hash(model, torch.bfloat16)}


def check_fingerprint(found: dict, model: Transformer, what: str) -> None:
    mine = fingerprint(model)
    shape_keys = [k for k in mine if not k.endswith("sha256")]
    same_shape = isinstance(found, dict) and all(found.get(k) == mine[k] for k in shape_keys)
    # the hashes tolerate nothing but the load dtype; files from before the bf16 hash compare the exact one,
    # or (made from a bf16 load) the exact one against this model rounded to bf16
    same_weights = (found.get("embedding_bf16_sha256") == mine["embedding_bf16_sha256"]
                    if isinstance(found, dict) and "embedding_bf16_sha256" in found else
                    isinstance(found, dict) and found.get("embedding_sha256") in (mine["embedding_sha256"],
                                                                                  mine["embedding_bf16_sha256"]))
    # shapes tell the user which model the file was made for
    if not (same_shape and same_weights):
        found = found if isinstance(found, dict) else {}
        raise DustinError(f"this {what} was made for another model ({found.get('architecture')}, "
                          f"{found.get('n_layers')} layers, {found.get('n_heads')} heads, embedding hash "
                          f"{str(found.get('embedding_sha256'))[:12]}) than the one loaded ({mine['architecture']}, "
                          f"{mine['n_layers']} layers, {mine['n_heads']} heads, {mine['embedding_sha256'][:12]}); "
                          "profile or tune this model first")


@dataclass
class HeadProfile:
    model: dict
    scores: list[list[float]]  # [n_layers][n_heads], mean needle attention while retrieving
    samples: int
    successful: int
    seconds: float
    settings: dict = field(default_factory=dict)

    def top_heads(self, k: int = 4) -> dict[int, list[int]]:
        s = torch.tensor(self.scores)
        return {layer: sorted(s[layer].topk(min(k, s.shape[1])).indices.tolist()) for layer in range(s.shape[0])}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path, model: Transformer | None = None) -> "HeadProfile":
        try:
            d = json.loads(Path(path).read_text())
            prof = cls(**d)
        except FileNotFoundError:
            raise DustinError(f"no head profile at {path}; make one with `dustin profile-heads`") from None
        except OSError as e:
            raise DustinError(f"cannot read the head profile {path} ({e.strerror})") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise DustinError(f"{path} is not a head profile ({e})") from None
        try:
            shape = torch.tensor(prof.scores, dtype=torch.float32).shape
        except (TypeError, ValueError, RuntimeError) as e:
            raise DustinError(f"{path} is not a head profile: its scores are not a layers x heads table ({e})") from None
        if not isinstance(prof.model, dict) or len(shape) != 2 or 0 in shape:
            raise DustinError(f"{path} is not a head profile: it needs a model fingerprint and a layers x heads table "
                              "of scores")
        if model is not None:
            check_fingerprint(prof.model, model, "head profile")
            if tuple(shape) != (model.args.n_layers, model.args.n_heads):
                raise DustinError(f"{path} scores {shape[0]} x {shape[1]} heads, but the model has "
                                  f"{model.args.n_layers} layers of {model.args.n_heads}; profile this model")
        return prof


@torch.no_grad()
def profile_heads(model: Transformer, tokenizer, texts: dict[str, str], *, samples: int = 8, context: int = 2048,
                  max_new_tokens: int = 12, seed: int = 0, progress=None) -> HeadProfile:
    """Run the CompressKV procedure on `samples` needle prompts of about `context` tokens."""
    if samples < 1 or context < 128:
        raise DustinError(f"profiling needs samples >= 1 and context >= 128, got {samples} and {context}")
    rng = random.Random(seed)
    a = model.args
    total = torch.zeros(a.n_layers, a.n_heads)
    ok = 0
    start = time.perf_counter()
    names = sorted(texts)
    stops = set(a.eos_token_id) | set(tokenizer.encode("\n"))
    for i in range(samples):
        needle, question = haystack.passkey_needle(rng)
        depth = (i + 0.5) / samples
        hay = haystack.build(tokenizer, texts[names[i % len(names)]], n_tokens=context, needles=[needle],
                             depths=[depth], question=question, rng=rng)
        span = set(hay.ids[needle.start:needle.end])
        model.setup_cache(1, len(hay.ids) + max_new_tokens + 1)
        model.prefill(torch.tensor([hay.ids[:-1]], device=model.device))
        last, out = hay.ids[-1], []
        acc, hits = torch.zeros(a.n_layers, a.n_heads), 0
        for _ in range(max_new_tokens):
            capture = capture_all(model)
            logits = model.decode(torch.tensor([[last]], device=model.device), capture=capture)
            last = int(logits[0, -1].argmax())
            if last in span:
                hits += 1
                for layer in range(a.n_layers):
                    probs = reference.attention_probs(capture.q[layer], model.cache.k[layer], model.seq_lens)
                    acc[layer] += probs[0, :, 0, needle.start:needle.end].sum(-1).cpu()
            model.commit(1)
            if last in stops:
                break
            out.append(last)
        answer = tokenizer.decode(out)
        if hits and haystack.rouge1_recall(answer, needle.answer) > 0.5:
            total += acc / hits
            ok += 1
        if progress is not None:
            progress(i + 1, samples, ok, answer)
    if ok == 0:
        raise DustinError(f"the model retrieved none of the {samples} needles; profiling needs successful runs "
                          "(try a shorter --context or more --samples)")
    return HeadProfile(model=fingerprint(model), scores=(total / ok).tolist(), samples=samples, successful=ok,
                       seconds=time.perf_counter() - start,
                       settings={"context": context, "max_new_tokens": max_new_tokens, "seed": seed,
                                 "texts": names, "procedure": "CompressKV needle attention while retrieving"})
