"""Index sets, policies and metrics of sparse verification."""
import pytest
import torch

from conftest import perturbed_copy, rel_err, tiny_model
from dustin import DustinError
from dustin.config import SelectionConfig, SpecConfig
from dustin.selection import budget_split, make_policy, streaming_indices
from dustin.selection.metrics import kl_divergence, recovery, top1_agreement
from dustin.speculative import Generator

HEADS = dict(target_heads={1: [0, 2]}, draft_heads={0: [1, 3], 1: [0]})


@pytest.mark.parametrize("m", [0, 7, 40])
def test_budget_split_index_sets(m):
    torch.manual_seed(0)
    B, S, budget, n_sink, n_recent = 5, 300, 64, 4, 16
    lens = torch.tensor([299, 64, 65, 30, 150])
    hist, look = torch.rand(B, S), torch.rand(B, S)
    idx = budget_split(hist, look, lens, m, budget=budget, n_sink=n_sink, n_recent=n_recent)
    assert idx.shape == (B, budget)
    for b in range(B):
        L = int(lens[b])
        row = idx[b].tolist()
        if L < budget:
            assert row == list(range(budget))  # read in full
            continue
        assert len(set(row)) == budget and all(0 <= j < L for j in row) and row == sorted(row)
        assert set(range(n_sink)) <= set(row) and set(range(L - n_recent, L)) <= set(row)
        free = [j for j in range(n_sink, L - n_recent)]
        draft_pick = sorted(free, key=lambda j: -look[b, j])[:m]
        assert set(draft_pick) <= set(row)  # the draft share is exactly the top-m lookahead positions
        rest = [j for j in free if j not in draft_pick]
        target_pick = sorted(rest, key=lambda j: -hist[b, j])[: budget - n_sink - n_recent - m]
        assert set(row) == set(range(n_sink)) | set(range(L - n_recent, L)) | set(draft_pick) | set(target_pick)


def test_budget_split_per_sequence_m():
    B, S = 3, 200
    hist, look = torch.rand(B, S), torch.rand(B, S)
    lens = torch.full((B,), 180)
    m = torch.tensor([0, 10, 44])
    idx = budget_split(hist, look, lens, m, budget=64, n_sink=4, n_recent=16)
    for b in range(B):
        one = budget_split(hist[b:b + 1], look[b:b + 1], lens[b:b + 1], int(m[b]), budget=64, n_sink=4, n_recent=16)
        assert torch.equal(idx[b], one[0])


def test_dustin_select_same_sets_through_triton_and_torch():
    """The policy's budget split gives the same index set on the Triton path (its scratch row included)
    as on the torch path."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs the kernels on the CPU
    target, draft, ids, lens, tokens = _verification_state(dev, dim=64)  # head dim 16: the kernels' smallest
    pol = make_policy(SelectionConfig(policy="dustin", budget=64, m=20, n_recent=8, **HEADS))
    pol.reset(target, draft, ids, lens)
    with torch.no_grad():
        cap = pol.draft_capture()
        draft.decode(tokens[:, :1], capture=cap)
        pol.observe_draft(draft, cap, torch.zeros(2, 1, dtype=torch.long, device=dev))
        sets = []
        for backend in ("torch", "triton"):
            target.attn_backend = backend
            sets.append(pol.select(target, tokens).clone())
    target.attn_backend = "auto"
    assert torch.equal(sets[0], sets[1]) and int(pol._scratch.abs().sum()) == 0


def test_streaming_indices():
    idx = streaming_indices(torch.tensor([100, 10]), budget=20, n_sink=4)
    assert idx[0].tolist() == [0, 1, 2, 3] + list(range(84, 100))
    assert idx[1].tolist() == list(range(20))


def _pair(**overrides):
    target = tiny_model(seed=0, **overrides)
    return target, perturbed_copy(target, 0.4)


PROMPTS = [[(7 * i + 3 * b) % 64 for i in range(150 + 37 * b)] for b in range(3)]


@pytest.mark.parametrize("policy", ["dustin", "history", "lookahead", "oracle", "streaming", "snapkv", "quest"])
def test_budget_covering_the_context_equals_full_verification(policy):
    target, draft = _pair()
    n = 20
    ar = Generator(target, None, SpecConfig(method="ar", max_new_tokens=n, stop_tokens=())).generate(PROMPTS)
    sel = SelectionConfig(policy=policy, budget=512, m=100, **HEADS)
    res = Generator(target, draft, SpecConfig(method="dustin", max_new_tokens=n, stop_tokens=()),
                    policy=make_policy(sel)).generate(PROMPTS)
    assert res.tokens == ar.tokens


def test_sparse_read_of_every_entry_equals_dense():
    target, _ = _pair()
    target.setup_cache(2, 200)
    ids = torch.randint(0, 64, (2, 120))
    with torch.no_grad():
        target.prefill(ids[:, :100], torch.tensor([100, 77]))
        step = ids[:, 100:105]
        dense = target.decode(step)
        idx = torch.arange(128)[None].expand(2, -1)  # every committed entry, padding past the length
        sparse = target.decode(step, indices=idx)
    assert rel_err(sparse, dense) < 1e-5


def _verification_state(device="cpu", **overrides):
    target, draft = (m.to(device) for m in _pair(**overrides))
    target.setup_cache(2, 400)
    draft.setup_cache(2, 400)
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (2, 300)).to(device)
    lens = torch.tensor([300, 260], device=device)
    with torch.no_grad():
        target.prefill(ids, lens)
        draft.prefill(ids, lens)
    tokens = torch.randint(0, 64, (2, 5)).to(device)
    return target, draft, ids, lens, tokens


def test_oracle_recovery_bounds_every_policy():
    target, draft, ids, lens, tokens = _verification_state()
    rates = {}
    with torch.no_grad():
        for name in ["oracle", "dustin", "history", "lookahead", "streaming", "snapkv", "quest"]:
            sel = SelectionConfig(policy=name, budget=64, m=20, n_recent=8, **HEADS)
            pol = make_policy(sel)
            pol.reset(target, draft, ids, lens)
            if name in ("dustin", "history", "lookahead"):  # give the signals one observation each
                cap = pol.draft_capture()
                draft.decode(tokens[:, :1], capture=cap)
                pol.observe_draft(draft, cap, torch.zeros(2, 1, dtype=torch.long))
                cap = pol.target_capture()
                target.decode(tokens, capture=cap)
                pol.needs_full(target, cap)
                pol.observe_target(target, cap, torch.tensor([1, 3]), torch.ones(2, dtype=torch.long))
            indices = pol.select(target, tokens)
            assert indices is not None, name
            rates[name], per_layer = recovery(target, tokens, indices)
            assert per_layer.shape == (2, 2)
    for name, r in rates.items():
        assert bool((rates["oracle"] >= r - 1e-6).all()), (name, r, rates["oracle"])
    assert bool((rates["oracle"] < 1).all()) and bool((rates["streaming"] > 0).all())


def test_shared_oracle_bounds_shared_policies():
    target, draft, ids, lens, tokens = _verification_state()
    with torch.no_grad():
        shared = make_policy(SelectionConfig(policy="oracle", budget=64, oracle_shared=True))
        best, _ = recovery(target, tokens, shared.select(target, tokens))
        stream = make_policy(SelectionConfig(policy="streaming", budget=64))
        other, _ = recovery(target, tokens, stream.select(target, tokens))
    assert bool((best >= other).all())


def test_kl_and_top1():
    a = torch.randn(3, 10)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(3), atol=1e-6)
    assert bool((kl_divergence(a, torch.randn(3, 10)) > 0).all())
    assert top1_agreement(a, a * 2).all()


def test_adaptive_split_and_guard_run_and_stay_in_range():
    target, draft = _pair()
    sel = SelectionConfig(policy="dustin", budget=64, m=20, adaptive=True, guard=0.99, **HEADS)
    pol = make_policy(sel)
    res = Generator(target, draft, SpecConfig(method="dustin", max_new_tokens=20, stop_tokens=()),
                    policy=pol).generate(PROMPTS)
    ar = Generator(target, None, SpecConfig(method="ar", max_new_tokens=20, stop_tokens=())).generate(PROMPTS)
    assert res.stats.guarded > 0 and pol.m_trace
    assert all(0 <= m <= 64 - 20 for m in pol.m_trace)
    # a guard that re-verifies every (sparse) step in full makes the output exact
    assert res.stats.guarded == res.stats.steps and res.tokens == ar.tokens


def test_selection_config_round_trip_and_errors():
    sel = SelectionConfig(policy="dustin", budget=256, m=31, adaptive=True, **HEADS)
    assert SelectionConfig.from_dict(sel.to_dict()) == sel
    with pytest.raises(DustinError, match="budget"):
        SelectionConfig(budget=10).validate()
    with pytest.raises(DustinError, match="needs target_heads"):
        SelectionConfig(policy="dustin").validate()
    with pytest.raises(DustinError, match="unknown selection settings"):
        SelectionConfig.from_dict({"budgett": 3})
    with pytest.raises(DustinError, match="unknown selection policy"):
        SelectionConfig(policy="magic").validate()


def test_profiles_and_tuned_configs_round_trip_and_refuse_other_models(tmp_path):
    from dustin.selection.heads import HeadProfile, fingerprint
    from dustin.selection.tuning import TunedConfig

    target, draft = _pair()
    other = tiny_model(seed=5)
    prof = HeadProfile(model=fingerprint(target), scores=torch.rand(2, 4).tolist(), samples=3, successful=2,
                       seconds=1.5, settings={"context": 128})
    prof.save(tmp_path / "p.json")
    again = HeadProfile.load(tmp_path / "p.json", target)
    assert again == prof and again.top_heads(2) == prof.top_heads(2)
    with pytest.raises(DustinError, match="made for another model"):
        HeadProfile.load(tmp_path / "p.json", other)
    sel = SelectionConfig(policy="dustin", budget=64, m=22, **HEADS)
    tuned = TunedConfig(fingerprint(target), fingerprint(draft), sel.to_dict(), 0.5, {"seconds": 3.0})
    tuned.save(tmp_path / "t.json")
    loaded = TunedConfig.load(tmp_path / "t.json")
    assert loaded.selection_config(target, draft) == sel
    assert loaded.selection_config(target, draft, budget=128).m == 54  # m scales with the budget
    with pytest.raises(DustinError, match="made for another model"):
        loaded.selection_config(other, draft)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DustinError, match="not a tuned dustin config"):
        TunedConfig.load(tmp_path / "bad.json")


def test_a_profile_made_at_one_dtype_fits_the_same_model_loaded_at_another():
    """`dustin tune` loads float32 on the CPU, `dustin eval` bf16: the same checkpoint must pass, another
    must not. Files from before the bf16 hash still match a model loaded as they were made."""
    import copy

    from dustin.selection.heads import check_fingerprint, fingerprint

    target, _ = _pair()
    as_bf16 = copy.deepcopy(target).to(torch.bfloat16)
    check_fingerprint(fingerprint(target), as_bf16, "profile")
    check_fingerprint(fingerprint(as_bf16), target, "profile")
    old = {k: v for k, v in fingerprint(as_bf16).items() if k != "embedding_bf16_sha256"}
    check_fingerprint(old, target, "profile")  # made from a bf16 load, checked against a float32 one
    check_fingerprint(old, as_bf16, "profile")
    with pytest.raises(DustinError, match="made for another model"):
        check_fingerprint(fingerprint(tiny_model(seed=5)), as_bf16, "profile")
    with pytest.raises(DustinError, match="made for another model"):
        check_fingerprint([1, 2], target, "tuned config's target")


def test_hand_edited_profiles_and_tuned_configs_are_refused_with_the_reason(tmp_path):
    import dataclasses
    import json

    from dustin.selection.heads import HeadProfile, fingerprint
    from dustin.selection.tuning import TunedConfig

    target, draft = _pair()
    with pytest.raises(DustinError, match="cannot read the tuned config"):
        TunedConfig.load(tmp_path)  # a folder
    sel = SelectionConfig(policy="dustin", budget=64, m=22, **HEADS).to_dict()
    good = dataclasses.asdict(TunedConfig(fingerprint(target), fingerprint(draft), sel, 0.5, {}))
    for edit, match in [({"selection": None}, "its selection must be a mapping"),
                        ({"selection": {**sel, "budget": "64"}}, "selection is malformed"),
                        ({"selection": {**sel, "target_heads": {"abc": [0]}}}, "selection is malformed"),
                        ({"selection": {**sel, "draft_heads": {"0": [0, 99]}}},
                         r"scores draft layer 0, heads \[0, 99\]"),
                        ({"selection": {**sel, "target_heads": {"13": [0]}}}, "scores target layer 13")]:
        (tmp_path / "t.json").write_text(json.dumps({**good, **edit}))
        with pytest.raises(DustinError, match=match):
            TunedConfig.load(tmp_path / "t.json").selection_config(target, draft)
    (tmp_path / "t.json").write_text(json.dumps(good))
    with pytest.raises(DustinError, match=r"^budget \(0\) must exceed"):  # the caller's budget, not the file's fault
        TunedConfig.load(tmp_path / "t.json").selection_config(target, draft, budget=0)
    prof = dataclasses.asdict(HeadProfile(model=fingerprint(target), scores=torch.rand(2, 4).tolist(), samples=3,
                                          successful=2, seconds=1.5))
    for edit, match in [({"scores": [[0.1, 0.2], [0.3]]}, "not a layers x heads table"),
                        ({"scores": []}, "layers x heads table"), ({"model": []}, "needs a model fingerprint"),
                        ({"scores": [[0.5]]}, "scores 1 x 1 heads, but the model has 2 layers of 4")]:
        (tmp_path / "p.json").write_text(json.dumps({**prof, **edit}))
        with pytest.raises(DustinError, match=match):
            HeadProfile.load(tmp_path / "p.json", target)


def test_trace_recorder_and_search_pick_layers_and_m():
    pytest.importorskip("optuna")  # the tests extra installs it; a bare GPU box may lack it
    from dustin.selection.tuning import TraceRecorder, search

    target, draft = _pair()
    rec = TraceRecorder({0: [0, 1], 1: [2, 3]}, {0: [0, 1], 1: [1, 2]})
    Generator(target, draft, SpecConfig(method="dustin", max_new_tokens=16, stop_tokens=()),
              policy=rec).generate(PROMPTS[:2])
    traces = rec.traces()
    assert traces.history.shape[0] == 2 and traces.lookahead.shape[0] == 2 and traces.lens.shape[0] > 4
    result = search(traces, budget=64, n_recent=8, trials=5)
    assert result["target_layer"] in (0, 1) and 0 <= result["m"] <= 64 - 12
    assert 0 < result["recovery_history_only"] <= result["recovery"] + 1e-6 <= 1 + 1e-6


def test_step_scoring_equals_scoring_each_pass():
    """s_D from one scoring call over a step's draft queries equals the sum of one call per pass, and
    s_T from the last committed query alone equals the weighted all-queries scoring it replaced."""
    from dustin.model import QueryCapture
    from dustin.selection.policies import score_heads

    target, draft, ids, lens, tokens = _verification_state()
    pol = make_policy(SelectionConfig(policy="dustin", budget=64, m=20, n_recent=8, **HEADS))
    pol.reset(target, draft, ids, lens)
    expect = torch.zeros_like(pol.s_D)
    at = torch.tensor([[1], [0]])  # one sequence catches up on a token, the other feeds padding
    with torch.no_grad():
        x = tokens[:, :2]
        for i in range(4):
            cap = pol.draft_capture()
            draft.decode(x, capture=cap)
            per_pass = score_heads(draft, QueryCapture(cap.heads, dict(cap.q)))  # [B, T, S]
            if i == 0:
                per_pass = per_pass.gather(1, at[:, :, None].expand(-1, -1, per_pass.shape[2]))
            expect[:, : per_pass.shape[2]] += per_pass.sum(1)
            pol.observe_draft(draft, cap, at if i == 0 else None)
            draft.commit(at[:, 0] + 1 if i == 0 else 1)
            x = tokens[:, 2 + i: 3 + i]
        pol.score_lookahead()
        assert torch.allclose(pol.s_D, expect, atol=1e-5) and float(expect.sum()) > 0

        n_acc = torch.tensor([3, 1])
        cap = pol.target_capture()
        target.decode(tokens, capture=cap)
        all_q = score_heads(target, cap)  # [B, T, S]
        assert not pol.needs_full(target, cap)
        pol.observe_target(target, cap, n_acc, torch.ones(2, dtype=torch.long))
        assert torch.allclose(pol.s_T, all_q[torch.arange(2), n_acc], atol=1e-5)
