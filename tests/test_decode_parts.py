"""bench/decode_parts.py: every linear and the attention of a decode step are timed once per call, the rest is
what they leave of the step, and the block is given back untouched (no hooks, its own attention)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import decode_parts  # noqa: E402
import scale  # noqa: E402


@pytest.fixture
def small_decoder():
    d, hidden = 64, 128  # 32 heads of 2, as the 7B layer's 32 heads of 128
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (hidden, d), "up": (hidden, d),
              "down": (d, hidden)}
    lin = {}
    for name, (n, k) in shapes.items():
        lin[name] = nn.Linear(k, n, bias=False)
        nn.init.normal_(lin[name].weight, generator=g)
    block = scale.Block("decoder", lin)
    cache = scale.KVCache(size=9)
    block(torch.randn(1, 8, d), cache)
    one = torch.randn(1, 1, d)
    return block, (lambda: block(one, cache.fork()))


@torch.no_grad()
def test_the_parts_are_timed_and_the_block_given_back(small_decoder):
    block, fn = small_decoder
    before = fn()
    r = decode_parts.one_round(fn, block)
    assert set(r) == {*block.lin, "linears", "attention", "rest", "step"}
    assert all(r[p] > 0 for p in (*block.lin, "attention", "step"))
    assert r["linears"] == pytest.approx(sum(r[n] for n in block.lin))
    assert r["rest"] == pytest.approx(r["step"] - r["linears"] - r["attention"])
    assert block.attend is torch.nn.functional.scaled_dot_product_attention
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in block.lin.values())
    assert torch.equal(fn(), before)


@torch.no_grad()
def test_every_call_of_each_part_is_counted(small_decoder):
    block, fn = small_decoder
    into = {p: [] for p in (*block.lin, "attention")}
    with decode_parts.part_timers(block, into):
        for _ in range(4):
            fn()
    assert {p: len(v) for p, v in into.items()} == {p: 4 for p in into}
