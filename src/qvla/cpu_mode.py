"""The CPU mode a stage runs in, and giving the caller's mode back after it.

Every stage (calibrate, sensitivity, quantize, evaluate, bench, train) runs with denormal floats flushed to zero:
they made CPU training steps ~2.5x slower, and one mode for every stage keeps observations, plans and
evaluations bit for bit the same wherever a stage runs. The mode is the process's, so a stage called from
Python (a notebook, a test, another tool) would otherwise leave every later computation in it flushing
denormals too, and with the thread count the stage chose.
"""
from __future__ import annotations

import contextlib

import torch

_DENORMAL = 1e-40  # below float32's smallest normal (1.2e-38), above its smallest denormal (1.4e-45)


def flushing_denormals() -> bool:
    """Whether the CPU flushes denormal floats to zero now (torch sets this mode but cannot report it)."""
    return torch.tensor(_DENORMAL, dtype=torch.float32).mul(1.0).item() == 0.0


@contextlib.contextmanager
def stage_mode():
    """Flushes denormals for the length of a stage; afterwards restores the caller's denormal mode and its
    thread count, whatever the stage set. Usable as a decorator."""
    threads, flushing = torch.get_num_threads(), flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(flushing)
        torch.set_num_threads(threads)
