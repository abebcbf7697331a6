"""Evaluation samples with answers known by construction.

- `ppl`: a context window of a book and the continuation that follows it;
- `retrieval`: RULER-style tasks over book haystacks: single needle, multi-key needle (several keys,
  one asked), multi-value needle (one key, every value asked), variable tracking (a chain of
  assignments, every name bound to the value asked);
- `agreement`: book excerpts to continue.
Each builder is a pure function of (tokenizer, texts, seed, index).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from . import haystack

RETRIEVAL_KINDS = ("single", "multikey", "multivalue", "vartrack")


@dataclass
class Sample:
    id: str
    prompt: list[int]
    answers: list[str] = field(default_factory=list)  # retrieval: every string a correct output contains
    continuation: list[int] = field(default_factory=list)  # ppl: the tokens to score
    meta: dict = field(default_factory=dict)


def _rng(seed: int, task: str, i: int) -> random.Random:
    return random.Random(f"{seed}/{task}/{i}")


def ppl_sample(tokenizer, texts: dict[str, str], *, context: int, continuation: int, seed: int, i: int) -> Sample:
    rng = _rng(seed, "ppl", i)
    name = sorted(texts)[i % len(texts)]
    ids = haystack.cut(tokenizer, texts[name], context + continuation, rng)
    return Sample(f"ppl-{i}", ids[:context], continuation=ids[context:], meta={"book": name})


def agreement_sample(tokenizer, texts: dict[str, str], *, context: int, seed: int, i: int) -> Sample:
    rng = _rng(seed, "agreement", i)
    name = sorted(texts)[(i + 1) % len(texts)]
    return Sample(f"agreement-{i}", haystack.cut(tokenizer, texts[name], context, rng), meta={"book": name})


def retrieval_sample(tokenizer, texts: dict[str, str], *, context: int, seed: int, i: int) -> Sample:
    """Kinds cycle with `i`; depths spread evenly over the samples of a kind."""
    rng = _rng(seed, "retrieval", i)
    kind = RETRIEVAL_KINDS[i % len(RETRIEVAL_KINDS)]
    text = texts[sorted(texts)[i % len(texts)]]
    depth = ((i // len(RETRIEVAL_KINDS)) * 0.37 + 0.1) % 0.9 + 0.05
    if kind == "single":
        needle, question = haystack.passkey_needle(rng)
        needles, answers, depths = [needle], [needle.answer], [depth]
    elif kind == "multikey":
        names = rng.sample(haystack.NAMES, 4)
        needles = []
        for name in names:
            key = f"{rng.choice(haystack.WORDS)}-{rng.randint(100, 999)}"
            needles.append(haystack.Needle(f" The secret passphrase of Mr. {name} is {key}. ", key))
        asked = rng.randrange(4)
        question = f"the secret passphrase of Mr. {names[asked]}"
        answers = [needles[asked].answer]
        depths = sorted(rng.uniform(0.05, 0.95) for _ in needles)
        depths[asked] = depth
    elif kind == "multivalue":
        name = rng.choice(haystack.NAMES)
        values = [str(rng.randint(1000, 9999)) for _ in range(3)]
        needles = [haystack.Needle(f" One of the lucky numbers of Mr. {name} is {v}. ", v) for v in values]
        question = f"every lucky number of Mr. {name} (list them all)"
        answers = values
        depths = [depth, (depth + 0.3) % 0.9 + 0.05, (depth + 0.6) % 0.9 + 0.05]
    else:  # variable tracking: X1 = value, X2 = X1, ... ; asked: the names bound to the value
        value = str(rng.randint(10000, 99999))
        names = [f"V{rng.randint(10, 99)}{c}" for c in "ABCD"]
        lines = [f" VAR {names[0]} = {value}. "] + [f" VAR {names[k]} = VAR {names[k - 1]}. " for k in range(1, 4)]
        needles = [haystack.Needle(line, n) for line, n in zip(lines, names)]
        question = f"the names of every VAR whose value is {value} (list them all)"
        answers = names
        depths = [min(0.9, depth + 0.05 * k) for k in range(4)]
    hay = haystack.build(tokenizer, text, n_tokens=context, needles=needles, depths=depths, question=question, rng=rng)
    spans = [[n.start, n.end] for n in hay.needles]
    return Sample(f"retrieval-{kind}-{i}", hay.ids, answers=answers,
                  meta={"kind": kind, "depth": round(depth, 3), "needle_spans": spans})


def score_retrieval(output: str, answers: list[str]) -> float:
    """Exact match: the share of the expected strings that the output contains (1.0 = all)."""
    return sum(a.lower() in output.lower() for a in answers) / len(answers)
