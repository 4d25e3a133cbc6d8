"""A stage flushes denormals while it runs and gives the caller's CPU mode (denormals, threads) back."""
from __future__ import annotations

import pytest
import torch

from qvla.cpu_mode import flushing_denormals, stage_mode


@pytest.fixture
def caller_mode():
    """The caller keeps denormals and 2 threads; the mode is reset after each test whatever happened."""
    threads = torch.get_num_threads()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    torch.set_flush_denormal(False)
    torch.set_num_threads(2)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


def test_flushing_denormals_reports_the_mode(caller_mode):
    assert not flushing_denormals()
    torch.set_flush_denormal(True)
    assert flushing_denormals()


def test_stage_mode_flushes_inside_and_restores_after(caller_mode):
    with stage_mode():
        assert flushing_denormals()
        torch.set_num_threads(1)
    assert not flushing_denormals() and torch.get_num_threads() == 2
    assert torch.tensor(1e-40).mul(1.0).item() > 0  # denormal arithmetic works again


def test_stage_mode_restores_after_an_error(caller_mode):
    @stage_mode()
    def stage():
        torch.set_num_threads(1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        stage()
    assert not flushing_denormals() and torch.get_num_threads() == 2


def test_a_caller_that_flushes_keeps_flushing(caller_mode):
    torch.set_flush_denormal(True)
    with stage_mode():
        pass
    assert flushing_denormals()
