"""Scratch buffers kept across launches: shared by name, grown when asked for more, never grown in a capture."""
import pytest
import torch

from dustin import DustinError, scratch


def test_scratch_buffers_are_shared_by_name_and_grow():
    a = scratch.zeros("test-a", torch.device("cpu"), 10, torch.int32)
    assert a.numel() >= 10 and a.dtype == torch.int32 and int(a.abs().sum()) == 0
    assert scratch.zeros("test-a", "cpu", 5, torch.int32) is a
    assert scratch.zeros("test-b", "cpu", 5, torch.int32) is not a
    assert scratch.zeros("test-a", "cpu", 5, torch.int8) is not a
    b = scratch.zeros("test-a", "cpu", a.numel() + 1, torch.int32)
    assert b.numel() > a.numel() and int(b.abs().sum()) == 0
    assert any(x is b for x in scratch.live("test-a"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")  # the refused growth is all the capture held
def test_scratch_buffer_cannot_grow_inside_a_capture():
    scratch.zeros("test-capture", torch.device("cuda"), 10, torch.int32)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(DustinError, match="before CUDA-graph capture"):
        with torch.cuda.graph(graph):
            scratch.zeros("test-capture", torch.device("cuda"), 1 << 20, torch.int32)
