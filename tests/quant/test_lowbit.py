"""qvla's 2/4/8-bit CPU kernel: its block layout, its integer products at every token count and activation
width, its threads, the bytes it holds, which 8-bit buckets it takes, and the fallback to torch's int4 kernel."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qvla.quant import lowbit
from qvla.quant.kernels import (INT8_GEMMS, SMALL_INT8_WEIGHTS, Int4Kernel, Int8Kernel, LowBitKernel,
                                build_kernel, int8_gemm, int8_gemms_here)


def random_codes(bits: int, n: int, k: int, g: torch.Generator):
    """-> (codes, scale, zero) of a random bucket as qvla stores it: 8 bits signed in [-127, 127] with
    zero 0, 4 and 2 bits unsigned with a zero point."""
    scale = torch.rand(n, generator=g) + 0.05
    if bits == 8:
        return torch.randint(-127, 128, (n, k), generator=g), scale, torch.zeros(n)
    return torch.randint(0, 2**bits, (n, k), generator=g), scale, torch.randint(0, 2**bits, (n,), generator=g).float()


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
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n, k", [(5, 33), (17, 64), (64, 300), (600, 64), (300, 1024)])  # last: 3 row blocks
@pytest.mark.parametrize("tokens", [1, 2, 3, 9, 17, 276])
def test_kernel_computes_the_dequantized_product(bits, n, k, tokens):
    g = torch.Generator().manual_seed(n * k + tokens)
    codes, scale, zero = random_codes(bits, n, k, g)
    x = torch.randn(tokens, k, generator=g)
    ref = x @ ((codes.float() - zero[:, None]) * scale[:, None]).t()
    out = LowBitKernel(codes, scale, zero, bits)(x)
    assert out.shape == (tokens, n)
    # A16: ~14-bit activations (two int8 passes) at every token count
    assert ((out - ref).norm() / ref.norm()).item() < 2e-4


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
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_8bit_products_do_not_saturate_at_the_extremes(sign):
    """8-bit products are formed as |q| * (code * sign q): with codes and activations at +-127 a product
    pair is 2 * 127 * 127, just below the int16 limit, and must come out exact over a long K."""
    n, k = 3, 4096 + 32
    codes = torch.full((n, k), 127)
    codes[1] = -127
    codes[2, ::2] = -127  # alternating extremes
    x = torch.full((2, k), sign)
    x[1, ::3] = -sign
    ref = x.double() @ codes.double().t()
    out = LowBitKernel(codes, torch.ones(n), torch.zeros(n), 8)(x)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-2)


@needs_kernel
def test_build_kernel_takes_small_8bit_buckets_onto_qvlas_kernel():
    """Small 8-bit buckets (fbgemm's fixed cost per call would dominate) run on qvla's kernel; large
    ones, and codes at -128 (outside qvla's symmetric grid, which the kernel's sign trick needs), on
    fbgemm's."""
    from qvla.quant.storage import to_storage

    def kernel_for(codes):
        n, k = codes.shape
        return build_kernel(8, to_storage(codes, torch.ones(n), torch.zeros(n), torch.full((n,), 8),
                                          torch.zeros(0, k)), k)

    assert isinstance(kernel_for(torch.randint(-127, 128, (384, 128))), LowBitKernel)
    big = SMALL_INT8_WEIGHTS // 1024 + 1
    assert isinstance(kernel_for(torch.zeros(big, 1024, dtype=torch.long)), Int8Kernel)
    edge = torch.zeros(4, 64, dtype=torch.long)
    edge[0, 0] = -128
    assert isinstance(kernel_for(edge), Int8Kernel)


@needs_kernel
def test_kernel_holds_its_own_bit_width():
    k2 = LowBitKernel(torch.zeros(16, 256, dtype=torch.uint8), torch.ones(16), torch.zeros(16), 2)
    k4 = LowBitKernel(torch.zeros(16, 256, dtype=torch.uint8), torch.ones(16), torch.zeros(16), 4)
    k8 = LowBitKernel(torch.zeros(16, 256, dtype=torch.long), torch.ones(16), torch.zeros(16), 8)
    assert k2.nbytes == 16 * 64 + 16 * 8 and k4.nbytes == 16 * 128 + 16 * 8  # codes + fp32 scale, zero
    assert k8.nbytes == 16 * 256 + 16 * 8


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


@needs_kernel
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores")
def test_kernel_runs_on_torchs_threads():
    """The extension's loops must run on torch's thread pool: built without OpenMP, at::parallel_for is
    inlined as a serial loop and the kernel silently uses one core."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert lowbit.extension().threads_used() == 2
    finally:
        torch.set_num_threads(before)


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kernel_gives_the_same_result_on_any_number_of_threads(bits):
    """The rows are split across threads (the extension is built with OpenMP): each output is computed by
    one thread in one order, so the thread count must not change a single bit."""
    g = torch.Generator().manual_seed(bits)
    n, k = 1000, 512
    kern = LowBitKernel(*random_codes(bits, n, k, g), bits)
    x = torch.randn(40, k, generator=g)  # > 16 tokens: the rounding of tokens is split across threads too
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kern(x)
        torch.set_num_threads(2)
        two = kern(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
def test_kernel_rounds_activations_in_two_int8_passes():
    """With every weight code 1 and zero 0 (so w = scale), the kernel's output is scale * sum of the
    activations as it rounded them: s1 * sum(q1) + s2 * sum(q2), q_p = round(residual_p / s_p),
    s_p = max|residual_p| / 127. Reproduced here in float64 from the definition."""
    g = torch.Generator().manual_seed(1)
    k = 256
    x = torch.randn(2, k, generator=g) * torch.rand(1, k, generator=g) * 4
    out = LowBitKernel(torch.ones(1, k, dtype=torch.long), torch.ones(1), torch.zeros(1), 4)(x)[:, 0]
    for t in range(2):
        r, total = x[t].clone(), 0.0
        for _ in range(2):
            step = r.abs().max() / 127
            q = torch.round(r / step).clamp(-127, 127)
            total += step.double().item() * q.double().sum().item()
            r = r - q * step
        assert out[t].item() == pytest.approx(total, rel=1e-6)


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("a_bits", [4, 8])
@pytest.mark.parametrize("tokens", [1, 3, 7, 40])
def test_kernel_rounds_activations_on_the_plans_grid(bits, a_bits, tokens):
    """At A8 and A4 the kernel's one activation pass is the plan's own per-token rounding: its output is
    the simulated layer's (fake-quantized activations times the dequantized weights) up to float sums."""
    from qvla.quant.primitives import fake_quant_activation

    g = torch.Generator().manual_seed(bits * a_bits + tokens)
    n, k = 70, 512
    codes, scale, zero = random_codes(bits, n, k, g)
    x = torch.randn(tokens, k, generator=g) * torch.rand(1, k, generator=g) * 3
    w = (codes.double() - zero[:, None].double()) * scale[:, None].double()
    ref = fake_quant_activation(x.double(), a_bits) @ w.t()
    out = LowBitKernel(codes, scale, zero, bits, a_bits)(x)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6
    unrounded = x.double() @ w.t()  # and the rounding really happened: the A16 product is further away
    assert ((out.double() - unrounded).norm() / unrounded.norm()).item() > 1e-4


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_a4_grid_on_skewed_padded_inputs(bits):
    """The asymmetric A4 grid on what it is for, all-positive (post-GELU-like) tokens, with K padded to the
    kernel's block (the padding zeros must not move a token's range: 0 is always inside it)."""
    from qvla.quant.primitives import fake_quant_activation

    g = torch.Generator().manual_seed(7)
    n, k = 24, 200
    codes, scale, zero = random_codes(bits, n, k, g)
    x = torch.relu(torch.randn(5, k, generator=g)) + 0.3
    x[1] = -x[1]  # and an all-negative one
    w = (codes.double() - zero[:, None].double()) * scale[:, None].double()
    ref = fake_quant_activation(x.double(), 4) @ w.t()
    out = LowBitKernel(codes, scale, zero, bits, 4)(x)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6


@needs_kernel
@pytest.mark.parametrize("a_bits, token, expected", [
    (8, [127.0, 0.5, 1.5, 2.5, -0.5], [127.0, 0.0, 2.0, 2.0, -0.0]),  # symmetric, step 1
    (4, [14.5, 0.5, 1.5, 2.5, -0.5], [14.0, 0.0, 2.0, 2.0, 0.0]),  # asymmetric: range 15, step 1, z = round(0.5) = 0
])
def test_kernel_rounds_ties_to_even_and_zero_tokens_to_zero(a_bits, token, expected):
    """Ties round half to even, as torch.round in the simulated layer (the A4 zero point too); an all-zero
    token gives 0."""
    from qvla.quant.primitives import fake_quant_activation

    k = 64
    x = torch.zeros(2, k)
    x[0, :5] = torch.tensor(token)
    kern = LowBitKernel(torch.eye(5, k, dtype=torch.long), torch.ones(5), torch.zeros(5), 4, a_bits)
    out = kern(x)  # row i picks activation i
    assert out[0].tolist() == expected
    assert torch.equal(out[0], fake_quant_activation(x, a_bits)[0, :5])
    assert torch.equal(out[1], torch.zeros(5))


@needs_kernel
def test_kernel_returns_nan_for_a_token_with_nan_or_inf():
    """A non-finite activation makes its token's outputs NaN (as the float layer's would be), not finite
    garbage from rounding NaN to an integer; the other tokens are untouched."""
    k = 64
    kern = LowBitKernel(torch.randint(0, 16, (3, k)), torch.ones(3), torch.full((3,), 8.0), 4)
    x = torch.randn(3, k)
    ref = kern(x)
    x[0, 7], x[1, 9] = float("nan"), float("inf")
    out = kern(x)
    assert torch.isnan(out[:2]).all()
    assert torch.equal(out[2], ref[2])


needs_vnni = pytest.mark.skipif(not lowbit.available() or lowbit.extension().best_isa() != 512,
                                reason="no AVX-512 VNNI on this CPU")


@needs_vnni
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("a_bits", [16, 8, 4])
@pytest.mark.parametrize("n, k", [(5, 256), (7, 320), (9, 384), (13, 450), (6, 128), (66, 1024)])
@pytest.mark.parametrize("tokens", [2, 8, 9, 10, 11, 17])
def test_vnni_path_gives_the_avx2_paths_bits(bits, a_bits, n, k, tokens):
    """The AVX-512 VNNI tiles (4 rows x 4 rows of rounded activations, a last odd 32-byte block read
    masked, row and token tails of 1-3; from lowbit.cpp's VNNI_MIN_ROWS = 8 rows of activations and
    VNNI_MIN_K = 256 on, below them the AVX2 path runs) form the same integer sums as the AVX2 path: the
    outputs are equal, bit for bit. The shapes cover one pair of blocks, an odd number of blocks, padded
    rows, and rows that are not a multiple of 4. 8-bit rows (signed codes read with their top bit flipped,
    128 * sum(q) taken off after) included."""
    g = torch.Generator().manual_seed(bits * 1000 + n * k + tokens + a_bits)
    codes, scale, zero = random_codes(bits, n, k, g)
    x = torch.randn(tokens, k, generator=g) * 3
    vnni = LowBitKernel(codes, scale, zero, bits, a_bits, isa="avx512-vnni")(x)
    avx2 = LowBitKernel(codes, scale, zero, bits, a_bits, isa="avx2")(x)
    assert torch.equal(vnni, avx2)


@needs_vnni
@pytest.mark.parametrize("bits", [2, 4])
def test_vnni_sums_are_exact_at_the_extremes(bits):
    """Codes at their maximum (and a row of alternating extremes) times activations at +-127 over a long K
    with an odd number of blocks: the int32 lanes and the masked last block must come out exact."""
    n, k = 6, 4096 + lowbit.block_codes(bits)
    codes = torch.full((n, k), 2**bits - 1)
    codes[1, ::2] = 0
    x = torch.full((9, k), 1.0)  # 9 tokens, two passes each: 18 rows of activations, VNNI tiles
    x[1::2] = -1.0
    scale, zero = torch.ones(n), torch.zeros(n)
    ref = x.double() @ codes.double().t()
    out = LowBitKernel(codes, scale, zero, bits, isa="avx512-vnni")(x)
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-2)


@needs_vnni
@pytest.mark.parametrize("k", [4096 + 32, 2**16 - 32, 2**16, 2**17])
def test_vnni_8bit_sums_are_exact_up_to_the_longest_rows(k):
    """8-bit rows on the VNNI tiles sum (code + 128) * q, up to 255 * 127 * K, and take 128 * sum(q) off
    after: exact at the extremes up to K = 2^16 - 32 (from 2^16 on the AVX2 rows run, exact too)."""
    n = 5
    codes = torch.full((n, k), 127)
    codes[1] = -127
    codes[2, ::2] = -127
    x = torch.ones(9, k)  # 9 tokens at A8: rows of activations at q = 127 (VNNI tiles)
    x[1::2] = -1.0
    x[4, ::3] = 0.0
    scale, zero = torch.ones(n), torch.zeros(n)
    ref = (x.double() * 127).round() @ codes.double().t() / 127
    out = LowBitKernel(codes, scale, zero, 8, a_bits=8, isa="avx512-vnni")(x)
    assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-3)
    assert torch.equal(out, LowBitKernel(codes, scale, zero, 8, a_bits=8, isa="avx2")(x))


def test_isa_refuses_an_unknown_or_missing_instruction_set(monkeypatch):
    if not lowbit.available():
        pytest.skip("no low-bit kernel on this CPU")
    monkeypatch.setenv("QVLA_LOWBIT_ISA", "sse2")
    with pytest.raises(ValueError, match="QVLA_LOWBIT_ISA must be one of"):
        lowbit.isa()
    monkeypatch.setenv("QVLA_LOWBIT_ISA", "avx2")
    assert lowbit.isa() == "avx2"
    monkeypatch.setenv("QVLA_LOWBIT_ISA", "avx512-vnni")
    if lowbit.extension().best_isa() == 512:
        assert lowbit.isa() == "avx512-vnni"
    else:
        with pytest.raises(RuntimeError, match="no AVX-512 VNNI"):
            lowbit.isa()
    with pytest.raises(RuntimeError, match="isa must be"):  # and the extension itself checks its argument
        lowbit.extension().mm(torch.zeros(1, 64), torch.zeros(1, 32, dtype=torch.uint8), torch.ones(1),
                              torch.zeros(1), 4, 127, 2, False, 7)


@needs_kernel
@pytest.mark.parametrize("gemm", ["onednn", "fbgemm"])
@pytest.mark.parametrize("passes", [1, 2])
def test_int8_gemm_inputs_rounded_by_the_extension_match_the_torch_fallback(passes, gemm, monkeypatch):
    """Int8Kernel rounds its GEMM's per-token 7-bit input with the extension (one sweep per pass) where it is
    built and with torch ops elsewhere: the same arithmetic, so the same codes on the first pass and the
    same output up to float rounding of the residual (the compiler may fuse its multiply-add)."""
    if gemm not in int8_gemms_here():
        pytest.skip(f"this machine cannot run the {gemm} int8 GEMM")
    g = torch.Generator().manual_seed(passes)
    codes, scale = torch.randint(-127, 128, (40, 300), generator=g), torch.rand(40, generator=g) * 0.01
    kern = Int8Kernel(codes, scale, passes=passes, gemm=gemm)
    x = torch.randn(9, 300, generator=g) * torch.rand(1, 300, generator=g) * 3
    t_ext, step_ext, _ = kern._rounded(x)
    y_ext = kern(x)
    monkeypatch.setattr(lowbit, "available", lambda: False)
    t_torch, step_torch, _ = kern._rounded(x)
    y_torch = kern(x)
    u8 = INT8_GEMMS[gemm].u8
    assert t_ext.dtype == t_torch.dtype == (torch.uint8 if u8 else torch.float32)
    assert torch.equal(t_ext[:9], t_torch[:9]) and torch.equal(step_ext[:9], step_torch[:9])
    t = t_ext.float() - (64 if u8 else 0)
    assert t.min() >= -64 and t.max() <= 63 and t.shape == (passes * 9, 300)
    assert ((y_ext - y_torch).norm() / y_torch.norm()).item() < 1e-5


@pytest.mark.parametrize("passes", [1, 2])
def test_the_torch_int8_gemms_give_the_same_int8_output(passes):
    """oneDNN's and fbgemm's GEMMs get the same 7-bit integers and compute W t exactly: one output, whichever
    runs (also for a batch in which no token spans the range, where fbgemm needs a padding row)."""
    g = torch.Generator().manual_seed(10 + passes)
    codes, scale = torch.randint(-127, 128, (70, 520), generator=g), torch.rand(70, generator=g) * 0.01
    gemms = [gemm for gemm in int8_gemms_here() if gemm in ("onednn", "fbgemm")]
    for x in (torch.randn(13, 520, generator=g) * 4, torch.full((2, 520), 0.5)):
        y = {gemm: Int8Kernel(codes, scale, passes=passes, gemm=gemm)(x) for gemm in gemms}
        for gemm in gemms:
            assert torch.equal(y[gemm], y["fbgemm"]), gemm
        ref = x @ (codes.float() * scale[:, None]).t()
        assert (y["fbgemm"] - ref).norm() / ref.norm() < (0.03 if passes == 1 else 1e-3)  # 7 / ~14 bits


def test_int8_gemm_choice_is_checked(monkeypatch):
    monkeypatch.setenv("QVLA_INT8_GEMM", "cublas")
    with pytest.raises(ValueError, match="QVLA_INT8_GEMM must be one of"):
        int8_gemm()
    monkeypatch.setenv("QVLA_INT8_GEMM", "fbgemm")
    assert int8_gemm() == "fbgemm" and Int8Kernel(torch.ones(2, 8), torch.ones(2)).name == "fbgemm-int8"


def test_int8_gemm_default_is_qvlas_only_where_the_cpu_has_vnni_and_the_extension_builds(monkeypatch):
    """qvla's int8 GEMM is AVX-512 VNNI code; elsewhere fbgemm (oneDNN's int8 linear is 3-7x slower than
    fbgemm at 1-8 tokens without VNNI: bench/int8_gemm.py), and asking for qvla's there fails loudly."""
    monkeypatch.delenv("QVLA_INT8_GEMM", raising=False)
    for vnni, built, want in ((True, True, "qvla"), (False, True, "fbgemm"), (True, False, "fbgemm")):
        monkeypatch.setattr(lowbit, "cpu_has_vnni", lambda v=vnni: v)
        monkeypatch.setattr(lowbit, "available", lambda b=built: b)
        assert int8_gemm() == want
        assert ("qvla" in int8_gemms_here()) == (want == "qvla")
    monkeypatch.setenv("QVLA_INT8_GEMM", "qvla")
    with pytest.raises(RuntimeError, match="needs AVX-512 VNNI"):
        int8_gemm()


@needs_kernel
@pytest.mark.parametrize("gemm", ["onednn", "fbgemm"])
def test_int8_kernel_rounds_a8_inputs_on_the_plans_grid_itself(gemm, monkeypatch):
    """At A8 the extension puts each token on the plan's symmetric 8-bit grid in the sweep that makes the
    GEMM's input: the same floats as primitives.fake_quant_activation, so the same output as rounding first
    (with the extension and with the torch fallback)."""
    if gemm not in int8_gemms_here():
        pytest.skip(f"this machine cannot run the {gemm} int8 GEMM")
    from qvla.quant.primitives import fake_quant_activation

    g = torch.Generator().manual_seed(3)
    codes, scale = torch.randint(-127, 128, (50, 260), generator=g), torch.rand(50, generator=g) * 0.01
    x = torch.randn(11, 260, generator=g) * torch.rand(1, 260, generator=g) * 5
    x[3] = 0.0  # a silent token: the grid's floor
    a8 = Int8Kernel(codes, scale, gemm=gemm, a_bits=8)
    plain = Int8Kernel(codes, scale, gemm=gemm)
    assert a8.rounds_input and not plain.rounds_input
    want = plain(fake_quant_activation(x, 8))
    assert torch.equal(a8(x), want)
    monkeypatch.setattr(lowbit, "available", lambda: False)
    assert torch.equal(a8(x), want)
    with pytest.raises(ValueError, match="one pass"):
        Int8Kernel(codes, scale, passes=2, a_bits=8)


@pytest.mark.parametrize("gemm", sorted(INT8_GEMMS))
def test_int8_kernel_multiplies_the_a4_grids_codes_exactly(gemm, monkeypatch):
    """At A4 the int8 GEMM takes the codes of the plan's asymmetric 4-bit grid themselves: the output is the
    exact product of the fake-quantized input with the dequantized rows (up to fp32 rounding of the
    scales), with the extension's codes and with the torch fallback's, which are the same codes; a token
    holding a NaN or an infinity comes out NaN."""
    if gemm not in int8_gemms_here():
        pytest.skip(f"this machine cannot run the {gemm} int8 GEMM")
    from qvla.quant.primitives import fake_quant_activation

    g = torch.Generator().manual_seed(4)
    codes, scale = torch.randint(-127, 128, (50, 261), generator=g), torch.rand(50, generator=g) * 0.01
    x = torch.randn(13, 261, generator=g) * torch.rand(1, 261, generator=g) * 5
    x[3], x[4], x[5] = 0.0, 2.0, x[5].abs() + 1  # silent, constant, and all-positive (skewed) tokens
    k4 = Int8Kernel(codes, scale, gemm=gemm, a_bits=4)
    assert k4.rounds_input
    want = fake_quant_activation(x, 4).double() @ (codes.double() * scale.double()[:, None]).T
    y = k4(x)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    if lowbit.available():
        for u8 in (False, True):
            t, step = lowbit.extension().round_a4(x, u8)
            assert torch.equal((t.float() - (64 if u8 else 0)) * step, fake_quant_activation(x, 4))
    monkeypatch.setattr(lowbit, "available", lambda: False)
    assert torch.equal(k4(x), y)
    x[1, 7], x[2, 260] = float("nan"), float("inf")  # 260: the extension's scalar tail
    monkeypatch.undo()
    out = k4(x)
    assert out[1:3].isnan().all() and not out[[0, *range(3, 13)]].isnan().any()


@needs_kernel
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kernel_writes_its_rows_into_the_given_columns(bits):
    """With out and cols the kernel's epilogue writes row j's outputs into column cols[j] of the layer's output
    (what PackedLinear does for each bucket instead of a scatter): the same floats as the plain call, the other
    columns untouched; mismatched arguments fail loudly."""
    g = torch.Generator().manual_seed(bits)
    codes, scale, zero = random_codes(bits, 9, 256, g)
    kern = LowBitKernel(codes, scale, zero, bits)
    x = torch.randn(5, 256, generator=g)
    cols = torch.tensor([11, 0, 3, 7, 19, 2, 5, 13, 17])
    out = torch.full((5, 20), -1.0)
    assert kern(x, out=out, cols=cols) is out
    ref = torch.full((5, 20), -1.0).index_copy_(1, cols, kern(x))
    assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match="out and cols go together"):
        kern(x, out=out)
    with pytest.raises(RuntimeError, match="outside out"):
        kern(x, out=out, cols=cols + 5)
    with pytest.raises(RuntimeError, match="one int64 column per row"):
        kern(x, out=out, cols=cols[:4])
    with pytest.raises(RuntimeError, match="rows apart"):  # rows that overlap would race between threads
        kern(x, out=torch.zeros(1, 20).expand(5, 20), cols=cols)


@needs_kernel
def test_kernel_refuses_8bit_rows_too_long_for_int32_sums():
    k = 133144 + 32 - 133144 % 32
    with pytest.raises(RuntimeError, match="8-bit rows need K below 133144"):
        lowbit.extension().mm(torch.zeros(1, k), torch.zeros(1, k, dtype=torch.uint8), torch.ones(1),
                              torch.zeros(1), 8, 127, 1, False, 0)


@needs_kernel
@pytest.mark.parametrize("n, k", [(7, 37), (33, 1024), (5, 1100)])
@pytest.mark.parametrize("tokens", [1, 3, 4, 6])
def test_half_rows_match_the_float_gemm(n, k, tokens):
    """The fp16 rows' GEMV (half_mm: rows widened in registers, fp32 sums in another order) against the rows
    upcast for the float GEMM, and both against float64: as close as the float GEMM is."""
    g = torch.Generator().manual_seed(n * k + tokens)
    w, x = torch.randn(n, k, generator=g).half(), torch.randn(tokens, k, generator=g)
    ref = x.double() @ w.double().t()
    out = lowbit.extension().half_mm(x, w)
    gemm = F.linear(x, w.float())
    assert out.shape == (tokens, n) and out.dtype == torch.float32
    assert (out.double() - ref).norm() / ref.norm() < 1e-6
    assert (out.double() - ref).norm() <= 2 * (gemm.double() - ref).norm() + 1e-9


@needs_kernel
def test_half_kernel_takes_the_gemv_only_for_few_tokens_on_long_rows(monkeypatch):
    """HalfKernel runs half_mm at up to GEMV_MAX_TOKENS tokens on inputs of GEMV_MIN_K or more; shorter rows
    (the micro-VLAs') and more tokens keep the float GEMM on the upcast rows, bit for bit."""
    from qvla.quant.kernels import HalfKernel

    calls = []
    ext = lowbit.extension()

    class Spy:
        def half_mm(self, x, w):
            calls.append(x.shape[0])
            return ext.half_mm(x, w)

    g = torch.Generator().manual_seed(0)
    for k, want in ((512, False), (1024, True)):
        rows = torch.randn(6, k, generator=g)
        kern = HalfKernel(rows)
        assert (kern.ext is not None) == want
        if kern.ext is not None:
            kern.ext = Spy()
        for m in (1, 4, 5):
            x = torch.randn(m, k, generator=g)
            out = kern(x)
            if not (want and m <= HalfKernel.GEMV_MAX_TOKENS):
                assert torch.equal(out, F.linear(x, rows.half().float()))
    assert calls == [1, 4]
