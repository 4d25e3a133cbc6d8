"""qvla's 2/4-bit CPU kernel: its block layout, its products on both paths (integer dot products for few
tokens, expanded rows + float GEMM for many), the bytes it holds, and the fallback to torch's int4 kernel."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvla.quant import lowbit
from qvla.quant.kernels import LOWBIT_TOKENS, Int4Kernel, LowBitKernel, build_kernel


def test_the_kernel_builds_wherever_the_cpu_supports_it():
    """A machine with AVX2 + FMA and a compiler must get the kernel, not a silent fallback."""
    if not lowbit._cpu_has_avx2_fma():
        pytest.skip("CPU without AVX2/FMA: the int4 fallback is the documented path")
    assert lowbit.available()


needs_kernel = pytest.mark.skipif(not lowbit.available(), reason="no AVX2/FMA on this CPU")


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4]), rows=st.integers(1, 5), blocks=st.integers(1, 4), seed=st.integers(0, 99))
def test_block_pack_round_trip(bits, rows, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    k = lowbit.block_codes(bits) * blocks
    codes = torch.randint(0, 2**bits, (rows, k), generator=g)
    packed = lowbit.block_pack(codes, bits)
    assert packed.shape == (rows, k * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(lowbit.block_unpack(packed, bits, k).long(), codes)


def test_block_pack_refuses_a_ragged_row():
    with pytest.raises(ValueError, match="multiple of 64 at 4 bits"):
        lowbit.block_pack(torch.zeros(2, 96, dtype=torch.uint8), 4)


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n, k", [(5, 33), (17, 64), (64, 300), (600, 64)])
@pytest.mark.parametrize("tokens", [1, 2, 3, 9, LOWBIT_TOKENS + 1, 276])
def test_kernel_computes_the_dequantized_product(bits, n, k, tokens):
    g = torch.Generator().manual_seed(n * k + tokens)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scale, zero = torch.rand(n, generator=g) + 0.05, torch.randint(0, 2**bits, (n,), generator=g).float()
    x = torch.randn(tokens, k, generator=g)
    ref = x @ ((codes.float() - zero[:, None]) * scale[:, None]).t()
    out = LowBitKernel(codes, scale, zero, bits)(x)
    assert out.shape == (tokens, n)
    # few tokens: ~14-bit activations (two int8 passes); many: fp32
    tol = 2e-4 if tokens <= LOWBIT_TOKENS else 1e-5
    assert ((out - ref).norm() / ref.norm()).item() < tol


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_kernel_integer_sums_do_not_overflow_at_the_extremes(bits, sign):
    """Every code at its maximum times every activation at +-127, over K long enough to fill many int16
    groups (8 blocks at 4 bits, 16 at 2): the kernel's partial sums must neither saturate nor wrap."""
    n, k = 3, 4096 + 64
    codes = torch.full((n, k), 2**bits - 1)
    codes[1, ::2] = 0  # and a row of alternating extremes
    scale, zero = torch.ones(n), torch.tensor([0.0, 0.0, float(2**bits - 1)])
    x = torch.full((2, k), sign)
    ref = x.double() @ ((codes.double() - zero[:, None].double()) * scale[:, None].double()).t()
    out = LowBitKernel(codes, scale, zero, bits)(x)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-2)


@needs_kernel
def test_kernel_holds_its_own_bit_width():
    k2 = LowBitKernel(torch.zeros(16, 256, dtype=torch.uint8), torch.ones(16), torch.zeros(16), 2)
    k4 = LowBitKernel(torch.zeros(16, 256, dtype=torch.uint8), torch.ones(16), torch.zeros(16), 4)
    assert k2.nbytes == 16 * 64 + 16 * 8 and k4.nbytes == 16 * 128 + 16 * 8  # codes + fp32 scale, zero


@needs_kernel
def test_build_kernel_falls_back_to_torch_int4_when_disabled(monkeypatch):
    from qvla.quant.storage import to_storage

    codes = torch.randint(0, 16, (4, 64))
    storage = to_storage(codes, torch.ones(4), torch.zeros(4), torch.full((4,), 4), torch.zeros(0, 64))
    assert isinstance(build_kernel(4, storage, 64), LowBitKernel)
    monkeypatch.setenv("QVLA_LOWBIT", "0")
    lowbit.extension.cache_clear()
    try:
        assert isinstance(build_kernel(4, storage, 64), Int4Kernel)
    finally:
        monkeypatch.delenv("QVLA_LOWBIT")
        lowbit.extension.cache_clear()
    assert lowbit.available()
