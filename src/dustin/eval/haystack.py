"""Long texts and needles: haystacks cut from books, facts inserted at known depths.

Every builder is deterministic given its `random.Random`, and records where it put the answer, so a
task's ground truth is known by construction.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import DustinError

NAMES = ["Ashworth", "Belmont", "Carrow", "Delacey", "Everard", "Fenwick", "Garland", "Halloway", "Ingram",
         "Jessop", "Kendrick", "Lyndon", "Marlowe", "Norcott", "Osgood", "Pemberton", "Quarles", "Radley",
         "Sutcliffe", "Thorne", "Underhill", "Vance", "Whitlock", "Yardley"]
WORDS = ["amber", "birch", "cobalt", "dune", "ember", "falcon", "garnet", "harbor", "indigo", "juniper",
         "kestrel", "lantern", "meadow", "nutmeg", "orchid", "pepper", "quartz", "raven", "saffron", "thistle",
         "umber", "violet", "willow", "zephyr"]


def default_text_dir() -> Path:
    """`$DUSTIN_DATA`, else the books shipped beside the package in a source checkout."""
    if os.environ.get("DUSTIN_DATA"):
        return Path(os.environ["DUSTIN_DATA"])
    return Path(__file__).resolve().parents[3] / "data" / "books"


def load_texts(source: str | Path | None = None) -> dict[str, str]:
    """`{name: text}` from a text file or every `.txt` file of a folder (default: the books)."""
    path = Path(source) if source else default_text_dir()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.txt"))
    else:
        raise DustinError(f"no text at {path}; pass a text file or a folder of .txt files (or set DUSTIN_DATA)")
    if not files:
        raise DustinError(f"no .txt files in {path}")
    texts = {f.stem: f.read_text(encoding="utf-8", errors="replace") for f in files}
    empty = [k for k, v in texts.items() if len(v.split()) < 50]
    if empty:
        raise DustinError(f"text files too short to cut haystacks from: {empty}")
    return texts


@dataclass
class Needle:
    text: str  # the sentence inserted into the haystack
    answer: str  # what a correct answer contains
    start: int = -1  # token span of the needle in the prompt, set by `insert`
    end: int = -1


@dataclass
class Haystack:
    ids: list[int]  # the prompt's tokens
    needles: list[Needle]
    question_start: int  # token offset where the question begins


def passkey_needle(rng: random.Random) -> tuple[Needle, str]:
    """A fact and the question that retrieves it."""
    name = rng.choice(NAMES)
    key = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}-{rng.randint(100, 999)}"
    return Needle(f" The secret passphrase of Mr. {name} is {key}. ", key), f"the secret passphrase of Mr. {name}"


def cut(tokenizer, text: str, n_tokens: int, rng: random.Random) -> list[int]:
    """`n_tokens` tokens of `text` from a random offset, starting at a line break."""
    chars_per_token = 4
    span = n_tokens * chars_per_token * 2
    if len(text) <= span:
        start = 0
    else:
        start = rng.randrange(0, len(text) - span)
        nl = text.find("\n", start)
        start = nl + 1 if 0 <= nl < start + 2000 else start
    ids = tokenizer.encode(text[start: start + span])
    while len(ids) < n_tokens:  # a short text: repeat it
        ids += tokenizer.encode(text)
    return ids[:n_tokens]


def build(tokenizer, text: str, *, n_tokens: int, needles: list[Needle], depths: list[float], question: str,
          rng: random.Random) -> Haystack:
    """A prompt of about `n_tokens` tokens: haystack with each needle at its depth, then the question.

    Needles go in at the first sentence or line end after their depth. Each piece is tokenized on its
    own, so the recorded token spans of the needles are exact.
    """
    enc = tokenizer.encode
    head = "Read the text and answer the question at the end.\n\n"
    tail = f"\n\nQuestion: what is {question}?\nAnswer: The answer is"
    room = n_tokens - len(enc(head)) - len(enc(tail)) - sum(len(enc(n.text)) for n in needles)
    if room < 16:
        raise DustinError(f"{n_tokens} tokens leave no room for a haystack around {len(needles)} needle(s)")
    body = tokenizer.decode(cut(tokenizer, text, room, rng))
    points = []
    for d in depths:
        at = int(d * len(body))
        ends = [k for k in (body.find(". ", at), body.find("\n", at)) if 0 <= k < at + 400]
        points.append(min(ends) + 1 if ends else at)
    ids, pos = enc(head), 0
    for i in sorted(range(len(needles)), key=lambda i: points[i]):
        ids += enc(body[pos:points[i]])
        needles[i].start = len(ids)
        ids += enc(needles[i].text)
        needles[i].end = len(ids)
        pos = points[i]
    ids += enc(body[pos:])
    return Haystack(ids + enc(tail), needles, len(ids))


def rouge1_recall(prediction: str, reference: str) -> float:
    """Share of the reference's words (split on non-alphanumerics) that the prediction contains."""
    import re

    ref = re.findall(r"[a-z0-9]+", reference.lower())
    pred = set(re.findall(r"[a-z0-9]+", prediction.lower()))
    return sum(w in pred for w in ref) / len(ref) if ref else 0.0
