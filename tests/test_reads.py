"""`dustin bench reads`: its streaming kernel reads exactly each program's share, and its record renders."""
import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"

pytest.importorskip("triton")
from dustin import DustinError  # noqa: E402
from dustin.bench import reads  # noqa: E402


@pytest.mark.parametrize("n,programs", [(0, 3), (1, 1), (100, 5), (reads.BLOCK + 7, 2), (5 * reads.BLOCK + 3, 2),
                                        (7 * reads.BLOCK + 1, 3)])
@pytest.mark.parametrize("use_pdl", [False, True])
def test_stream_read_sums_each_programs_share(n, programs, use_pdl):
    """Shares of several blocks with a ragged last one, programs left with no share (five programs over
    two 64-element grains), an empty buffer."""
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(n + 1, device=DEV, generator=g).to(torch.bfloat16)[:n]  # empty: a view, as the bench launches
    got = reads.stream_read(x, programs=programs, use_pdl=use_pdl)
    want = reads.stream_read_reference(x, programs=programs)
    assert got.shape == (programs,)
    assert torch.allclose(got, want, atol=1e-2, rtol=1e-3)
    assert abs(float(got.sum()) - float(x.float().sum())) < 1e-2 + 1e-3 * float(x.float().abs().sum())


def test_stream_read_refuses_what_it_would_misread():
    x = torch.ones(64, 2, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(DustinError, match="contiguous 1-D"):
        reads.stream_read(x[:, 0], programs=2)  # a strided view would be summed wrongly
    with pytest.raises(DustinError, match="programs >= 1"):
        reads.stream_read(x.flatten(), programs=0)


def test_table_and_plot_render_a_record(tmp_path):
    cases = [{"bytes": b, "s": s, "floor_s": b / 4e12, "bw_frac": (b / s / 4e12) if b else 0.0, "best_config": "2-per-sm"}
             for b, s in ((0, 1.1e-6), (2**20, 2.4e-6), (2**30, 2.6e-4))]
    record = {"copy_bandwidth_Bps": 4e12, "cases": cases}
    md = reads.table(record)
    assert md.splitlines()[3].startswith("| 1 | 2.40 | 0.26 | 11% |") and "| 1024 | 260.00 |" in md
    reads.plot(record, tmp_path / "reads.png")
    assert (tmp_path / "reads.png").stat().st_size > 0
