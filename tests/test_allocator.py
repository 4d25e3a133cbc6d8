"""The allocator setting the latency benchmarks run under (qvla.allocator)."""
import platform
import subprocess
import sys

import pytest

from qvla import allocator

# Allocates, touches and frees 36 MB in four blocks of 4-12 MB (the sizes of a 7B decoder layer's fp32
# prefill activations) 20 times, after one warm-up round, and prints the page faults per round.
ROUNDS = """
import ctypes, resource
from qvla import allocator
print(allocator.keep_freed_memory()["malloc"])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def one_round():
    blocks = [(libc.malloc(n << 20), n << 20) for n in (12, 4, 12, 8)]
    for p, n in blocks:
        libc.memset(p, 1, n)
    for p, _ in blocks:
        libc.free(p)
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    one_round()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _run(keep: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", ROUNDS], env={"QVLA_KEEP_FREED": keep, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return out[0], float(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_freed_memory_is_reused_without_page_faults():
    """With glibc's defaults every round faults its blocks' pages in again (~9,000 of 9,216); after
    keep_freed_memory() the freed blocks are reused and (almost) no page is faulted."""
    state, faults = _run("0")
    assert state == "default (QVLA_KEEP_FREED=0)" and faults > 4000
    state, faults = _run("1")
    assert state == "glibc, freed memory kept" and faults < 100


def test_keep_freed_memory_sets_once_and_reports(monkeypatch):
    monkeypatch.setattr(allocator, "_state", {"malloc": "default"})
    monkeypatch.setenv("QVLA_KEEP_FREED", "0")
    assert allocator.keep_freed_memory() == {"malloc": "default (QVLA_KEEP_FREED=0)"} == allocator.state()
    monkeypatch.delenv("QVLA_KEEP_FREED")
    assert allocator.keep_freed_memory()["malloc"] == "default (QVLA_KEEP_FREED=0)"  # once per process
