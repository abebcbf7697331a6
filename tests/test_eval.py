"""Evaluation tasks: answers really are where the builders say, scorers, and resumable runs."""
import json

import pytest
import torch

from conftest import perturbed_copy, tiny_model
from dustin import DustinError
from dustin.eval import haystack, tasks
from dustin.eval.runner import EvalConfig, make_context, run_task


class ByteTokenizer:
    """A lossless byte-level tokenizer (ids 0..255) for tests."""

    eos_token_id = None
    pad_token_id = None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")

    def __len__(self):
        return 256


TEXTS = {"a": ("It was a truth universally acknowledged. " * 300), "b": ("The rain fell on the moor.\n" * 400)}


@pytest.mark.parametrize("i", range(8))
def test_retrieval_answers_are_in_the_needles_at_their_depth(i):
    tok = ByteTokenizer()
    s = tasks.retrieval_sample(tok, TEXTS, context=3000, seed=0, i=i)
    assert abs(len(s.prompt) - 3000) < 60
    needle_text = "".join(tok.decode(s.prompt[a:b]) for a, b in s.meta["needle_spans"])
    for ans in s.answers:
        assert ans in needle_text
    if s.meta["kind"] in ("single", "multikey"):
        # the asked needle sits near its stated depth
        start = [a for a, b in s.meta["needle_spans"] if s.answers[0] in tok.decode(s.prompt[a:b])][0]
        assert abs(start / len(s.prompt) - s.meta["depth"]) < 0.1
    assert tasks.score_retrieval(" ".join(s.answers), s.answers) == 1.0
    assert tasks.score_retrieval("I do not know", s.answers) == 0.0


def test_ppl_sample_continues_its_context():
    tok = ByteTokenizer()
    s = tasks.ppl_sample(tok, TEXTS, context=500, continuation=40, seed=1, i=0)
    joined = tok.decode(s.prompt + s.continuation)
    assert joined in TEXTS[s.meta["book"]] * 2


def test_rouge_and_partial_scores():
    assert haystack.rouge1_recall("the key is amber-birch-123", "amber-birch-123") == 1.0
    assert tasks.score_retrieval("4711 and 1234", ["4711", "1234", "9999"]) == pytest.approx(2 / 3)


def _tuned(target, draft):
    from dustin.config import SelectionConfig
    from dustin.selection.heads import fingerprint
    from dustin.selection.tuning import TunedConfig

    sel = SelectionConfig(policy="dustin", budget=48, m=10, n_recent=8, target_heads={1: [0, 2]},
                          draft_heads={0: [1, 3]})
    return TunedConfig(fingerprint(target), fingerprint(draft), sel.to_dict(), 10 / 36, {})


@pytest.mark.parametrize("task", ["ppl", "agreement", "retrieval"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, task):
    target = tiny_model(seed=0, vocab_size=256)
    draft = perturbed_copy(target, 0.3)
    models = (target, draft, ByteTokenizer(), _tuned(target, draft))
    cfg = dict(context=400, budgets=(0.12,), policies=("full", "dustin", "quest", "snapkv"), gamma=3,
               new_tokens=8, continuation=12, dtype="float32")
    whole = run_task(make_context(EvalConfig(task=task, limit=2, **cfg), models=models), tmp_path / "a")
    run_task(make_context(EvalConfig(task=task, limit=1, **cfg), models=models), tmp_path / "b")  # interrupted
    resumed = run_task(make_context(EvalConfig(task=task, limit=2, **cfg), models=models), tmp_path / "b")
    assert json.dumps(whole, sort_keys=True) == json.dumps(resumed, sort_keys=True)
    assert len(resumed["samples"]) == 2 and set(resumed["runs"]) >= {"full", "dustin@48"}


def test_cut_off_store_line_is_rerun(tmp_path):
    from dustin.eval.runner import Store

    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"id": "a", "runs": {}}) + "\n" + '{"id": "b", "ru')
    assert set(Store(path).records) == {"a"}


def test_a_store_of_other_settings_is_refused_before_any_sample_runs(tmp_path):
    """Adding samples to a file made with other settings would leave it resumable under neither."""
    target = tiny_model(seed=0, vocab_size=256)
    draft = perturbed_copy(target, 0.3)
    models = (target, draft, ByteTokenizer(), _tuned(target, draft))
    cfg = dict(budgets=(0.12,), policies=("full",), gamma=3, continuation=12, dtype="float32")
    run_task(make_context(EvalConfig(task="ppl", limit=1, context=400, **cfg), models=models), tmp_path)
    before = (tmp_path / "lockstep.jsonl").read_text()
    with pytest.raises(DustinError, match="holds samples made with other settings"):
        run_task(make_context(EvalConfig(task="ppl", limit=2, context=300, **cfg), models=models), tmp_path)
    assert (tmp_path / "lockstep.jsonl").read_text() == before
