"""The speculative engine: acceptance rules, exactness against autoregressive decoding, stops, errors."""
import copy

import pytest
import torch

from conftest import perturbed_copy, tiny_model
from dustin import DustinError
from dustin.config import SpecConfig
from dustin.sampling import greedy_accept, speculative_accept
from dustin.speculative import Generator

V = 64


def one_hot_logits(choices):
    """Logits whose argmax at each position is the given token."""
    t = torch.tensor(choices)
    return torch.nn.functional.one_hot(t, V).float() * 5


# --- exact greedy cases --------------------------------------------------------------------------
def test_greedy_all_accepted_plus_bonus():
    n, nxt = greedy_accept(torch.tensor([[1, 2, 3]]), one_hot_logits([[1, 2, 3, 4]]))
    assert n.tolist() == [3] and nxt.tolist() == [4]


def test_greedy_first_token_mismatch():
    n, nxt = greedy_accept(torch.tensor([[1, 2, 3]]), one_hot_logits([[5, 2, 3, 4]]))
    assert n.tolist() == [0] and nxt.tolist() == [5]


def test_greedy_mismatch_in_the_middle():
    n, nxt = greedy_accept(torch.tensor([[1, 2, 3]]), one_hot_logits([[1, 7, 3, 4]]))
    assert n.tolist() == [1] and nxt.tolist() == [7]


def test_greedy_mixed_batch():
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [9, 9, 9], [4, 5, 6]])
    target = one_hot_logits([[1, 2, 3, 8], [1, 2, 0, 1], [1, 9, 9, 9], [4, 5, 6, 7]])
    n, nxt = greedy_accept(draft, target)
    assert n.tolist() == [3, 2, 0, 3] and nxt.tolist() == [8, 0, 1, 7]


def test_greedy_forced_takes_the_target_token_after_the_forced_count():
    draft = torch.tensor([[1, 2, 3], [9, 9, 9]])
    target = one_hot_logits([[1, 2, 3, 8], [1, 9, 9, 9]])
    n, nxt = greedy_accept(draft, target, forced=torch.tensor([1, 3]))
    assert n.tolist() == [1, 3] and nxt.tolist() == [2, 9]


# --- speculative sampling reproduces the target distribution --------------------------------------
@pytest.mark.parametrize("gamma", [1, 3])
def test_speculative_sampling_matches_target_distribution(gamma):
    torch.manual_seed(0)
    vocab, rows = 12, 200_000
    p = torch.softmax(torch.randn(gamma + 1, vocab) * 1.5, -1)
    q = torch.softmax(torch.randn(gamma, vocab) * 1.5, -1)
    gen = torch.Generator().manual_seed(1)
    draft = torch.stack([torch.multinomial(q[i], rows, replacement=True, generator=gen) for i in range(gamma)], 1)
    n, nxt = speculative_accept(draft, q.expand(rows, -1, -1), p.expand(rows, -1, -1), gen)
    first = torch.where(n > 0, draft[:, 0], nxt)
    empirical = torch.bincount(first, minlength=vocab).float() / rows
    tv_target = 0.5 * (empirical - p[0]).abs().sum()
    tv_draft = 0.5 * (empirical - q[0]).abs().sum()
    assert tv_target < 0.01
    assert tv_draft > 10 * tv_target


def test_engine_sampling_matches_target_two_token_distribution():
    """The engine's first two sampled tokens follow the target's joint distribution, not the draft's."""
    vocab = 8
    target = tiny_model(seed=3, vocab_size=vocab)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.15)  # soften: every token gets real mass
    draft = perturbed_copy(target, 1.0)
    prompt = [1, 2, 3]
    rows = 6000
    gen = Generator(target, draft, SpecConfig(gamma=2, temperature=1.0, seed=7, max_new_tokens=2, stop_tokens=()))
    out = torch.tensor(gen.generate([prompt] * rows).tokens)
    assert out.shape == (rows, 2)

    def joint(model):
        with torch.no_grad():
            first = model(torch.tensor([prompt]))[0, -1].softmax(-1)
            seconds = model(torch.tensor([prompt + [x] for x in range(vocab)]))[:, -1].softmax(-1)
        return first[:, None] * seconds  # [x, y]

    emp = torch.bincount(out[:, 0] * vocab + out[:, 1], minlength=vocab * vocab).float().view(vocab, vocab) / rows
    tv_target = 0.5 * (emp - joint(target)).abs().sum()
    tv_draft = 0.5 * (emp - joint(draft)).abs().sum()
    assert tv_target < 0.06
    assert tv_draft > 2 * tv_target


def test_seeded_sampling_is_deterministic():
    target, draft = tiny_model(seed=3), tiny_model(seed=4)
    cfg = SpecConfig(gamma=3, temperature=0.8, top_p=0.9, seed=11, max_new_tokens=20, stop_tokens=())
    prompts = [[1, 2, 3, 4], [5, 6]]
    a = Generator(target, draft, cfg).generate(prompts).tokens
    b = Generator(target, draft, cfg).generate(prompts).tokens
    cfg.seed = 12
    c = Generator(target, draft, cfg).generate(prompts).tokens
    assert a == b and a != c


# --- greedy speculative output equals greedy autoregressive output --------------------------------
RAGGED = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7], [1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2, 3, 5, 3], [42]]


def ar_tokens(target, prompts, n, stops=()):
    return Generator(target, None, SpecConfig(method="ar", max_new_tokens=n, stop_tokens=stops)).generate(prompts).tokens


@pytest.mark.parametrize("method,gamma", [("sd", 1), ("sd", 4), ("magicdec", 3), ("sd", 7)])
def test_greedy_speculative_equals_autoregressive(method, gamma):
    target = tiny_model(seed=0)
    draft = perturbed_copy(target, 0.4)
    n = 40
    cfg = SpecConfig(method=method, gamma=gamma, max_new_tokens=n, stop_tokens=(), draft_budget=8, draft_n_sink=2)
    res = Generator(target, draft, cfg).generate(RAGGED)
    assert res.tokens == ar_tokens(target, RAGGED, n)
    s = res.stats
    assert 0 < s.acceptance_rate < 1  # both acceptance paths were exercised
    assert set(s.per_step) <= set(range(1, gamma + 2)) and s.new_tokens == n * len(RAGGED)


def test_fp8_draft_changes_proposals_not_the_output():
    """A draft whose fused few-row kernels read fp8 weights still yields the target's greedy tokens."""
    pytest.importorskip("triton")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the fused kernels (under the interpreter on the CPU)
    target = tiny_model(seed=0, dim=64).to(dev)
    draft = perturbed_copy(target, 0.4).to(dev)
    draft.attn_backend = "triton"
    n = 12
    cfg = SpecConfig(method="sd", gamma=3, max_new_tokens=n, stop_tokens=(), draft_linear="triton",
                     draft_weights="fp8")
    res = Generator(target, draft, cfg).generate(RAGGED[:2])
    assert draft.few_row_weights == "fp8" and res.tokens == ar_tokens(target, RAGGED[:2], n)
    # the same proposals as a draft holding what the fp8 copies stand for as its own weights
    from torch import nn

    from dustin.linear import dequantize_fp8

    twin = copy.deepcopy(draft)
    for name, lin in draft.named_modules():
        if hasattr(lin, "weight_fp8"):
            twin.get_submodule(name).weight = nn.Parameter(dequantize_fp8(lin.weight_fp8, lin.weight_scale,
                                                                          lin.weight.dtype))
    cfg.draft_weights = "native"
    same = Generator(target, twin, cfg).generate(RAGGED[:2])
    assert same.stats.per_step == res.stats.per_step and same.stats.accepted == res.stats.accepted


def test_magicdec_draft_reads_only_its_window():
    """With a window far smaller than the context, the streaming draft must differ from the full one."""
    target = tiny_model(seed=0)
    draft = perturbed_copy(target, 0.4)
    long = [[(7 * i) % V for i in range(300)]]
    full = SpecConfig(method="sd", gamma=4, max_new_tokens=30, stop_tokens=())
    stream = SpecConfig(method="magicdec", gamma=4, max_new_tokens=30, stop_tokens=(), draft_budget=16, draft_n_sink=4)
    a = Generator(target, draft, full).generate(long)
    b = Generator(target, draft, stream).generate(long)
    assert a.tokens == b.tokens == ar_tokens(target, long, 30)
    assert a.stats.accepted != b.stats.accepted


# --- stops ----------------------------------------------------------------------------------------
def test_eos_at_different_steps_for_different_rows():
    target = tiny_model(seed=0)
    draft = perturbed_copy(target, 0.4)
    full = ar_tokens(target, RAGGED, 30)
    # a stop token that first occurs at different positions in different rows
    first_pos = {}
    for tok in range(V):
        pos = [row.index(tok) if tok in row else None for row in full]
        if sum(p is not None for p in pos) >= 2 and len({p for p in pos if p is not None}) >= 2:
            first_pos[tok] = pos
    stop = next(iter(first_pos))
    res = Generator(target, draft, SpecConfig(gamma=4, max_new_tokens=30, stop_tokens=(stop,))).generate(RAGGED)
    for row, ref, pos in zip(res.tokens, full, first_pos[stop]):
        assert row == (ref[: pos + 1] if pos is not None else ref)
    assert [r for r in res.finish_reasons] == ["stop" if p is not None else "length" for p in first_pos[stop]]


def test_max_new_tokens_inside_an_accepted_run():
    target = tiny_model(seed=0)
    draft = perturbed_copy(target, 0.0)  # identical: every draft is accepted
    res = Generator(target, draft, SpecConfig(gamma=4, max_new_tokens=7, stop_tokens=())).generate(RAGGED)
    assert res.tokens == ar_tokens(target, RAGGED, 7)
    assert all(len(t) == 7 for t in res.tokens) and res.stats.acceptance_rate == 1.0
    # two steps of 4 drafts + bonus each; the second is cut at 2 tokens when emitted
    assert res.stats.per_step == {5: 2 * len(RAGGED)} and res.stats.steps == 2


def test_streaming_callback_sees_every_token():
    target = tiny_model(seed=0)
    draft = perturbed_copy(target, 0.4)
    seen = {0: [], 1: []}
    res = Generator(target, draft, SpecConfig(gamma=3, max_new_tokens=12, stop_tokens=())).generate(
        RAGGED[:2], on_tokens=lambda b, toks: seen[b].extend(toks))
    assert [seen[0], seen[1]] == res.tokens


# --- bad input ------------------------------------------------------------------------------------
def test_bad_input_is_refused():
    target, draft = tiny_model(seed=0), tiny_model(seed=1)
    gen = Generator(target, draft, SpecConfig(max_new_tokens=5))
    with pytest.raises(DustinError, match="empty"):
        gen.generate([[1, 2], []])
    with pytest.raises(DustinError, match="no prompts"):
        gen.generate([])
    with pytest.raises(DustinError, match="outside the vocabulary"):
        gen.generate([[1, 999]])
    with pytest.raises(DustinError, match="max_len"):
        Generator(target, draft, SpecConfig(max_new_tokens=5, max_len=16)).generate([list(range(20))])
    with pytest.raises(DustinError, match="positions"):
        gen.generate([[1] * 5000])
    with pytest.raises(DustinError, match="gamma"):
        Generator(target, draft, SpecConfig(gamma=0))
    with pytest.raises(DustinError, match="temperature"):
        Generator(target, draft, SpecConfig(temperature=-0.5))
    with pytest.raises(DustinError, match="draft_weights must be one of native, fp8"):
        Generator(target, draft, SpecConfig(draft_weights="int8"))
    with pytest.raises(DustinError, match="different vocabularies"):
        Generator(target, tiny_model(seed=1, vocab_size=80), SpecConfig())
    too_far = target.args.max_position_embeddings
    with pytest.raises(DustinError, match="or lower gamma"):  # the draft's lookahead needs positions too
        Generator(target, draft, SpecConfig(gamma=too_far, max_new_tokens=2)).generate([[1, 2, 3]])
    with pytest.raises(DustinError, match="needs a draft"):
        Generator(target, None, SpecConfig(method="sd"))
    with pytest.raises(DustinError, match="no tokenizer"):
        gen.generate(["text"])


def test_different_tokenizers_are_refused():
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

        def __len__(self):
            return len(self.vocab)

    target, draft = tiny_model(seed=0), tiny_model(seed=1)
    with pytest.raises(DustinError, match="tokenizers differ"):
        Generator(target, draft, SpecConfig(), tokenizer=Tok({"a": 0}), draft_tokenizer=Tok({"b": 0}))


def test_forced_acceptance_moves_caches_by_the_forced_count():
    """The benchmarks' forced mode goes through the real commit and rollback path."""
    from dustin.speculative import _NO_CLOCK, _State

    target = tiny_model(seed=0)
    draft = perturbed_copy(target, 0.4)
    gen = Generator(target, draft, SpecConfig(gamma=4, max_len=128))
    gen.stats = None
    for m in (target, draft):
        m.setup_cache(3, 128)
        m.prefill(torch.randint(0, V, (3, 40)))
    st = _State.start(torch.tensor([1, 2, 3]), 4)
    st.forced = torch.tensor([0, 2, 4])
    gen._step(st, None, _NO_CLOCK)
    assert target.seq_lens.tolist() == [41, 43, 45]
    assert draft.seq_lens.tolist() == [41, 43, 44]  # the draft has not seen d_4 of a full acceptance
    assert st.behind.tolist() == [False, False, True]
    gen._step(st, None, _NO_CLOCK)  # the draft catches up on d_4 in its first pass
    assert target.seq_lens.tolist() == [42, 46, 50] and draft.seq_lens.tolist() == [42, 46, 49]


def test_finished_sequences_stay_inside_the_cache():
    """A sequence that stops early keeps riding along; its cache is set back to what it kept, so the
    later steps of the others never write past the cache (the largest gamma makes that tightest)."""
    target = tiny_model(seed=0)
    draft = perturbed_copy(target, 0.0)  # every draft accepted: long committed runs
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]]
    n, gamma = 40, 15
    ref = ar_tokens(target, prompts, n)
    # stop row 0 at the start of a late step (then 15 committed drafts lie beyond its stop)
    late = [t for i, t in enumerate(ref[0]) if i >= n - 16 and i % (gamma + 1) == 0 and t not in ref[1]
            and t not in ref[0][:i]]
    stops = tuple(late[:1])
    res = Generator(target, draft, SpecConfig(gamma=gamma, max_new_tokens=n, stop_tokens=stops)).generate(prompts)
    assert res.tokens == ar_tokens(target, prompts, n, stops)
    for b, p in enumerate(prompts):
        assert int(target.seq_lens[b]) <= len(p) - 1 + len(res.tokens[b])
        assert int(draft.seq_lens[b]) <= len(p) - 1 + len(res.tokens[b])
