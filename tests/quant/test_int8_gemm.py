"""qvla's int8 GEMM (csrc/int8_gemm.cpp): exact integer products on every tile shape, the epilogue's
arithmetic, its input on the plan's own grid, and loud refusals."""
from __future__ import annotations

import pytest
import torch

from qvla.quant import lowbit
from qvla.quant.kernels import Int8Kernel, LowBitKernel, int8_gemms_here
from qvla.quant.primitives import fake_quant_activation

pytestmark = pytest.mark.skipif("qvla" not in int8_gemms_here(), reason="needs AVX-512 VNNI and the extension")


def mm(u, codes, scale=None, step=None, bsum=None, passes=1, zero=0):
    ext = lowbit.extension()
    n = codes.shape[0]
    scale = torch.ones(n) if scale is None else scale
    step = torch.ones(u.shape[0]) if step is None else step
    return ext.int8_mm(u, ext.int8_pack(codes), scale, codes.sum(1, dtype=torch.int32), step,
                       torch.empty(0) if bsum is None else bsum, passes, zero)


@pytest.mark.parametrize("n, k", [(1, 4), (15, 7), (16, 64), (17, 130), (63, 256), (64, 255), (65, 4), (200, 1001)])
@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13])
def test_integer_products_are_exact_on_every_tail(n, k, m):
    """Rows not a multiple of 16 or of a 64-row panel, inputs not a multiple of 4, and token counts that end
    a tile early: codes over the whole int8 range times uint8 activations over the whole uint8 range, with
    a zero point, give the integer dot products exactly (as floats)."""
    g = torch.Generator().manual_seed(n * 1000 + k + m)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    u = torch.randint(0, 256, (m, k), generator=g, dtype=torch.uint8)
    want = u.long() @ codes.long().t() - 64 * codes.long().sum(1)
    assert torch.equal(mm(u, codes, zero=64), want.float())


def test_two_passes_and_the_base_follow_the_epilogue():
    """With two passes each output is step_0 z_0 + step_1 z_1 + bsum * scale * rowsum, z_p the scaled
    integer products of pass p's rows (rows m..2m-1 of u), for every token of a tile holding 3 tokens."""
    g = torch.Generator().manual_seed(1)
    n, k, m = 70, 96, 7
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    u = torch.randint(0, 128, (2 * m, k), generator=g, dtype=torch.uint8)
    scale, step, bsum = torch.rand(n, generator=g), torch.rand(2 * m, generator=g), torch.randn(m, generator=g)
    z = (u.double() - 64) @ codes.double().t() * scale.double()
    want = z[:m] * step[:m, None].double() + z[m:] * step[m:, None].double()
    want += bsum.double()[:, None] * (codes.double().sum(1) * scale.double())
    y = mm(u, codes, scale, step, bsum, passes=2, zero=64)
    assert y.shape == (m, n) and torch.allclose(y.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_kernel_holds_the_packed_codes_and_two_words_a_row():
    """Int8Kernel on qvla's GEMM holds the codes at one byte each (inputs padded to 4, no padding rows) plus
    an fp32 scale and an int32 row sum per row."""
    kern = Int8Kernel(torch.randint(-127, 128, (40, 30)), torch.ones(40), gemm="qvla")
    assert kern.nbytes == 40 * 32 + 8 * 40
    assert kern.mm.packed.numel() == 40 * 32


def test_wrong_inputs_are_refused():
    ext = lowbit.extension()
    codes = torch.zeros(20, 8, dtype=torch.int8)
    packed, ones, wsum = ext.int8_pack(codes), torch.ones(20), torch.zeros(20, dtype=torch.int32)
    u = torch.zeros(3, 8, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="packed holds"):
        ext.int8_mm(u, packed[:-4], ones, wsum, torch.ones(3), torch.empty(0), 1, 64)
    with pytest.raises(RuntimeError, match="u must be 2-D uint8"):
        ext.int8_mm(u.float(), packed, ones, wsum, torch.ones(3), torch.empty(0), 1, 64)
    with pytest.raises(RuntimeError, match="passes x M rows"):
        ext.int8_mm(u, packed, ones, wsum, torch.ones(3), torch.empty(0), 2, 64)
    with pytest.raises(RuntimeError, match="step must be"):
        ext.int8_mm(u, packed, ones, wsum, torch.ones(2), torch.empty(0), 1, 64)
    with pytest.raises(RuntimeError, match="K must be at most 65536"):
        wide = torch.zeros(1, 65540, dtype=torch.int8)
        ext.int8_mm(torch.zeros(1, 65540, dtype=torch.uint8), ext.int8_pack(wide), torch.ones(1),
                    torch.zeros(1, dtype=torch.int32), torch.ones(1), torch.empty(0), 1, 64)


def hard_tokens(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 5
    x[1] = 0.0  # silent: the grid's floor
    x[2, 0] = 300.0  # one outlier channel
    return x


@pytest.mark.parametrize("k", [37, 256, 4096])
def test_a8_input_is_the_plans_own_rounding(k):
    """At A8 each token goes in on the plan's symmetric 8-bit grid itself (code + 128, zero point 128): the
    output is the exact product of the fake-quantized input with the dequantized rows, to fp32 rounding, where
    the 7-bit input of the torch GEMMs is ~1-2% away from it."""
    g = torch.Generator().manual_seed(k)
    codes, scale = torch.randint(-127, 128, (70, k), generator=g), torch.rand(70, generator=g) * 0.01
    x = hard_tokens(9, k, k)
    u, step = lowbit.extension().round_sym8(x, 1)
    assert torch.equal((u.float() - 128) * step, fake_quant_activation(x, 8))
    want = fake_quant_activation(x, 8).double() @ (codes.double() * scale.double()[:, None]).t()
    y = Int8Kernel(codes, scale, gemm="qvla", a_bits=8)(x)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("a_bits", [8, 16])
def test_every_8bit_row_sees_the_same_activations(a_bits):
    """Large 8-bit buckets (this GEMM) and small ones (the low-bit kernel's 8-bit rows) round a token alike: one
    pass on the plan's grid at A8, two at A16 (~15-bit), so their outputs agree to fp32 rounding."""
    g = torch.Generator().manual_seed(a_bits)
    codes, scale = torch.randint(-127, 128, (50, 512), generator=g), torch.rand(50, generator=g) * 0.01
    x = hard_tokens(7, 512, a_bits)
    big = Int8Kernel(codes, scale, passes=2 if a_bits == 16 else 1, gemm="qvla", a_bits=a_bits)(x)
    small = LowBitKernel(codes, scale, torch.zeros(50), 8, a_bits)(x)
    assert torch.allclose(big, small, rtol=1e-5, atol=1e-6 * float(small.abs().max()))
    ref = x.double() @ (codes.double() * scale.double()[:, None]).t()
    if a_bits == 16:  # two passes: ~15-bit activations (255 x 127 steps), here with a 300x outlier channel
        assert ((big.double() - ref).norm() / ref.norm()).item() < 1e-3


def test_a_token_holding_nan_or_inf_comes_out_nan():
    codes, scale = torch.randint(-127, 128, (20, 64)), torch.ones(20)
    x = torch.randn(4, 64)
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    for a_bits, passes in ((8, 1), (16, 2)):
        y = Int8Kernel(codes, scale, passes=passes, gemm="qvla", a_bits=a_bits)(x)
        assert torch.isnan(y[1:3]).all() and torch.isfinite(y[[0, 3]]).all()


@pytest.mark.parametrize("a_bits", [8, 16])
def test_a_large_8bit_bucket_acts_like_the_fake_quant_layer(a_bits, monkeypatch):
    """A layer whose 8-bit rows all run on this GEMM (every bucket counted large) gives the simulated layer's
    output: to fp32 rounding at A8 (the same rounding of the input), within ~15-bit activations at A16."""
    import torch.nn as nn

    from qvla.quant import kernels
    from qvla.quant.apply import QuantLinear
    from qvla.quant.packed import PackedLinear

    monkeypatch.setattr(kernels, "SMALL_INT8_WEIGHTS", 0)
    g = torch.Generator().manual_seed(a_bits)
    mod = nn.Linear(320, 90)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(90, 320, generator=g) * 0.1)
    sim = QuantLinear.from_linear(mod, torch.full((90,), 8), a_bits)
    real = PackedLinear(sim.storage(), mod.weight.shape, mod.bias, a_bits)
    assert all(isinstance(k, Int8Kernel) and k.gemm == "qvla" for _, k in real.buckets)
    x = torch.randn(3, 11, 320, generator=g) * torch.rand(320, generator=g) * 4
    with torch.no_grad():
        ref, out = sim(x), real(x)
    tol = 1e-5 if a_bits == 8 else 1e-3
    assert ((out - ref).norm() / ref.norm()).item() < tol
