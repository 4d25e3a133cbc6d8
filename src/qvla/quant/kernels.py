"""Real integer kernels, one per bucket of output channels that share a bit width.

Every kernel is built from packed storage (see storage.py), holds only the format its kernel reads,
reports the bytes it holds, and maps (M, K) float32 activations to (M, rows) float32 outputs.

| bucket  | kernel                                                  | held in memory        | activations |
|---------|---------------------------------------------------------|-----------------------|-------------|
| 8 bits  | qvla's AVX2/VNNI kernel (lowbit.py) for buckets of up to SMALL_INT8_WEIGHTS weights | int8 + fp32 scale | the plan's grid (A8, A4); int8 x 2 passes (A16) |
| 8 bits  | else qvla's int8 GEMM (AVX-512 VNNI; else fbgemm's, see int8_gemm()) | int8 + fp32 scale | qvla's: the plan's grid (A8, A4), two int8 passes (A16); torch's: 7-bit per token (see Int8Kernel); A4: the grid's codes |
| 4, 2    | qvla's AVX2/VNNI low-bit kernel (lowbit.py), where it builds | 4 or 2 bits + fp32 scale/zero | the plan's grid (A8, A4); int8 x 2 passes (A16) |
| 4, 2    | else torch's CPU int4 GEMM (_weight_int4pack_mm_for_cpu) | 4 bits + bf16 scale/zero per group | bf16 |
| 16      | fp16 rows widened in registers (lowbit.py half_mm) at <= 4 tokens and K >= 1024, else upcast per call for the float GEMM | fp16 | fp32 |

The low-bit kernel streams the packed rows at every token count: a block of rows stays in cache while
all the tokens pass over it, so a prefill reads the weights from memory once. With torch's kernel,
2-bit rows run as 4-bit codes with the same scale, so in memory they take 4 bits (on disk 2).
In the 8-bit buckets on the int8 GEMM, A4 activations go in as their 4-bit grid's codes, which the GEMM's
7-bit input holds exactly.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from qvla.quant import lowbit
from qvla.quant.primitives import activation_grid, fake_quant_activation

INT4_GROUPS = (256, 128, 64, 32)  # group sizes torch's CPU int4 kernel accepts
# 8-bit buckets up to this many weights run on qvla's low-bit kernel, whose activations are the plan's own grid
# (the int8 GEMMs' are 7-bit per token), larger ones on the int8 GEMM (int8_gemm()). fbgemm and oneDNN cost a
# fixed ~0.08-0.12 ms a call here (AMD EPYC, 2 threads), the low-bit kernel 0.005 ms on a 384x128 bucket at one
# token, and still less at 256 tokens; on a 4096x4096 layer they tie at one token (all stream the int8 rows at
# memory speed) and the GEMMs are ~1.4x faster from 48 tokens (bench/lowbit_tokens.py).
SMALL_INT8_WEIGHTS = 1 << 20


def round_up(n: int, m: int) -> int:
    """n rounded up to a multiple of m."""
    return (n + m - 1) // m * m


def _onednn_int8() -> bool:
    """torch's oneDNN int8 linear (the op behind its x86 quantization backend) is there to call."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def _qvla_int8() -> bool:
    """qvla's int8 GEMM can run: the CPU has AVX-512 VNNI and the extension builds."""
    return lowbit.cpu_has_vnni() and lowbit.available()


def int8_gemm() -> str:
    """The int8 GEMM Int8Kernel runs: qvla's own ("qvla", csrc/int8_gemm.cpp) where the extension builds and
    the CPU has AVX-512 VNNI, else "fbgemm"; QVLA_INT8_GEMM picks one ("onednn" too, torch's oneDNN int8
    linear). On the 7B decoder's layers (bench/int8_gemm.py, AMD EPYC Zen 5, 2 threads, five runs) oneDNN took
    1.03-1.30x qvla's time at one token and 0.96-1.05x at the prefill's 276 tokens; oneDNN in turn is faster
    than fbgemm at 276 tokens (12.6 / 29.3 ms against 14.4 / 38.6 ms on 4096x4096 / 4096x11008). On AVX2 alone oneDNN is level
    with fbgemm at 276 and 3-7x slower from 1 to 8 tokens (5.6 against 1.5 ms on 4096x4096 at one token)."""
    want = os.environ.get("QVLA_INT8_GEMM")
    if want is None:
        return "qvla" if _qvla_int8() else "fbgemm"
    if want not in INT8_GEMMS:
        raise ValueError(f"QVLA_INT8_GEMM must be one of {sorted(INT8_GEMMS)}, got {want!r}")
    if want == "onednn" and not _onednn_int8():
        raise RuntimeError("QVLA_INT8_GEMM=onednn, but this torch has no oneDNN int8 linear")
    if want == "qvla" and not _qvla_int8():
        raise RuntimeError("QVLA_INT8_GEMM=qvla needs AVX-512 VNNI and qvla's extension built")
    return want


def int8_gemms_here() -> list[str]:
    """The int8 GEMMs this machine can run (QVLA_INT8_GEMM may name any of them)."""
    runs = {"qvla": _qvla_int8, "onednn": _onednn_int8, "fbgemm": lambda: True}
    return [g for g in INT8_GEMMS if runs[g]()]


class _TorchInt8:
    """A torch int8 GEMM computing z = scale_n * (W t) from exact integer input t; `linear` adds
    Int8Kernel's epilogue. Holds the GEMM's weights, the fp32 scales and the fp32 row sums of W."""

    grid = "7-bit"  # Int8Kernel hands it each token's 7-bit codes between its min and max (_rounded)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.rowsum = codes.float().sum(1) * scale
        self.nbytes = codes.numel() + 8 * codes.shape[0]  # codes + fp32 scale + fp32 row sum

    def linear(self, t: torch.Tensor, step: torch.Tensor, bsum: torch.Tensor | None, passes: int) -> torch.Tensor:
        """t (passes * M, K) stacked passes; step (passes * M, 1); bsum (M, 1), each token's bases summed
        over the passes (None: no base, A4) -> sum_p step_p * (W t_p) * scale + bsum * rowsum."""
        m = t.shape[0] // passes
        z = self(t, full=bsum is not None)
        y = z[:m].mul_(step[:m])  # in place: the epilogue is 2-3 sweeps over (M, N), not 4 per pass
        for p in range(1, passes):
            y.addcmul_(z[p * m:(p + 1) * m], step[p * m:(p + 1) * m])
        return y if bsum is None else y.addcmul_(bsum, self.rowsum)


class _Fbgemm(_TorchInt8):
    """fbgemm's dynamic int8 linear: quantizes its float input per tensor (uint8, reduced to 7 bits, which
    avoids int16 overflow in its multiply-add on AVX2); fed integers t in [-64, 63] it picks scale 1 and
    zero point 64, so its rounding is exact."""

    u8 = False  # takes float t

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__(codes, scale)
        n = codes.shape[0]
        qw = torch._make_per_channel_quantized_tensor(codes.to(torch.int8), scale.double(),
                                                      torch.zeros(n, dtype=torch.long), 0)
        self.packed = torch.ops.quantized.linear_prepack(qw, None)

    def __call__(self, t: torch.Tensor, full: bool = True) -> torch.Tensor:
        """full: some row of t spans [-64, 63] wherever one is not constant (round7's input; A4 codes do not)."""
        if not full or not bool((t.amax(-1) > t.amin(-1)).any()):  # no row spans the range: add one, so scale stays 1
            pad = torch.tensor([[-64.0, 63.0] + [0.0] * (t.shape[1] - 2)])[:, : t.shape[1]]
            return torch.ops.quantized.linear_dynamic(torch.cat([t, pad]), self.packed, True)[:-1]
        return torch.ops.quantized.linear_dynamic(t, self.packed, True)


class _OneDnn(_TorchInt8):
    """oneDNN's int8 linear on uint8 input with a given scale and zero point: fed u = t + 64 with scale 1
    and zero point 64 it computes scale_n * (W t) in integers. 7-bit u keeps a u8 x s8 pair sum inside int16
    (127 * 128 * 2 < 2^15), so the result is exact on CPUs without VNNI too."""

    u8 = True  # takes uint8 t + 64

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__(codes, scale)
        n = codes.shape[0]
        self.packed = torch.ops.onednn.qlinear_prepack(codes.to(torch.int8).contiguous(), None)
        self.scale, self.zero = scale.float().contiguous(), torch.zeros(n, dtype=torch.long)

    def __call__(self, u: torch.Tensor, full: bool = True) -> torch.Tensor:  # full: unused (zero point given)
        return torch.ops.onednn.qlinear_pointwise(u, 1.0, 64, self.packed, self.scale, self.zero, None, 1.0, 0,
                                                  torch.float32, "none", [], "")


class _Qvla:
    """qvla's int8 GEMM (csrc/int8_gemm.cpp, AVX-512 VNNI) on uint8 codes + a zero point, with the epilogue in
    the same pass: no (M, N) intermediate. Its VNNI products take any uint8, so it is fed the plan's own
    symmetric 8-bit grid (codes + 128: `round`), exactly the simulated rounding at A8, ~15-bit in two passes at
    A16, and the A4 grid's codes + 64. Holds the codes in its panel layout (K padded to 4), the fp32 scales and
    the int32 row sums of the codes (the zero point's term)."""

    u8 = True
    grid = "symmetric"  # Int8Kernel hands it round()'s codes, not the 7-bit per-token input of the torch GEMMs

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.ext = lowbit.extension()
        codes = codes.to(torch.int8).contiguous()
        self.packed = self.ext.int8_pack(codes)
        self.scale = scale.float().contiguous()
        self.wsum = codes.sum(1, dtype=torch.int32)
        self.nbytes = self.packed.numel() + 8 * codes.shape[0]

    def round(self, x: torch.Tensor, passes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (u (passes * M, K) uint8 code + 128, step (passes * M, 1)): the plan's symmetric 8-bit grid."""
        return tuple(self.ext.round_sym8(x.contiguous(), passes))

    def linear(self, u: torch.Tensor, step: torch.Tensor, bsum: torch.Tensor | None, passes: int,
               zero: int = 64) -> torch.Tensor:
        """sum_p step_p * (W (u_p - zero)) * scale (+ bsum * rowsum), as _TorchInt8.linear."""
        none = torch.empty(0)
        return self.ext.int8_mm(u, self.packed, self.scale, self.wsum, step.reshape(-1),
                                none if bsum is None else bsum.reshape(-1), passes, zero)


INT8_GEMMS = {"qvla": _Qvla, "onednn": _OneDnn, "fbgemm": _Fbgemm}


class Int8Kernel:
    """An int8 GEMM (qvla's, oneDNN's or fbgemm's, see int8_gemm()) fed integers so that its rounding is exact.

    qvla's GEMM takes any uint8 input, so it gets each token on the plan's symmetric 8-bit grid (code + 128):
    at A8 the rounding the plan simulates, exactly; at A16 two passes, the second on the first one's residual
    (~15-bit), the rounding of the low-bit kernel's 8-bit rows, so every 8-bit row of a model sees the same
    activations whatever its bucket's size. The torch GEMMs take 7 bits (below), and so get their own rounding:

    fbgemm quantizes its input per tensor (uint8, reduced to 7 bits): used as is, it loses 10-15 dB of
    output SQNR on a transformer MLP here. We quantize each token ourselves to 128 levels between its own
    min and max, j = round((x - lo) / step), and hand the GEMM t = j - 64 (fbgemm, which then picks scale 1
    and zero point 64) or j itself with zero point 64 (oneDNN): either computes W t exactly; we map
    back with y = step * (W t) + (lo + 64 step) * rowsum(W). That is per-token asymmetric 7-bit quantization,
    about 6 dB short of the simulated symmetric 8-bit one, and the same numbers on either GEMM. With
    `passes=2` (A16 settings) the rounding residual takes a second pass:
    ~14-bit activations for twice the GEMM time. At A4 the GEMM takes the codes of the plan's asymmetric
    4-bit grid as they are (they fit its 7-bit input): y = step * (W codes), the rounding the plan
    simulates, exactly, in one sweep.
    """

    LEVELS = 127  # steps between a token's min and max: 128 codes, the kernel's reduced range
    writes_into = False

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, passes: int = 1, gemm: str | None = None,
                 a_bits: int = 16) -> None:
        if a_bits < 16 and passes != 1:
            raise ValueError(f"A{a_bits} inputs take one pass, got passes={passes}")
        self.passes = passes
        # at A8 the extension rounds each token on the plan's grid itself, in the sweep that makes the
        # GEMM's input (the same floats as primitives.fake_quant_activation; without it the caller rounds
        # first); at A4 the kernel makes the grid's codes itself, with or without the extension
        self.a8, self.a4 = a_bits == 8 and lowbit.available(), a_bits == 4
        self.rounds_input = self.a8 or self.a4
        self.gemm = gemm or int8_gemm()
        self.name = f"{self.gemm}-int8"
        self.mm = INT8_GEMMS[self.gemm](codes, scale)
        self.nbytes = self.mm.nbytes

    def _round(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One pass: -> (t, step, base) with x ~ t * step + base per token, t in [-64, 63]."""
        lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
        step = ((hi - lo) / self.LEVELS).clamp_min(1e-30)
        t = torch.round((x - lo) / step) - 64
        return t, step, lo + 64 * step

    def _rounded(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every pass, rows stacked: -> (t (passes * M, K), step, base), t as the GEMM takes it (float, or
        uint8 t + 64). A pass only needs the previous one's rounding, not its product, so all of them go
        through the GEMM as one batch of rows. The low-bit extension rounds in one sweep per pass (torch's
        per-row min/max alone took ~4 ms on a 276 x 11008 input here); the torch ops below are the same
        arithmetic, for machines without it."""
        if lowbit.available():
            return tuple(lowbit.extension().round7(x.contiguous(), self.passes, self.mm.u8, self.a8))
        if self.a8:
            x = fake_quant_activation(x, 8)
        ts, steps, bases = [], [], []
        for p in range(self.passes):
            t, step, base = self._round(x if p == 0 else x - (ts[-1] * steps[-1] + bases[-1]))
            ts.append(t), steps.append(step), bases.append(base)
        t = torch.cat(ts)
        return (t + 64).to(torch.uint8) if self.mm.u8 else t, torch.cat(steps), torch.cat(bases)

    def _codes4(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A4: -> (t (M, K), step) with the plan's 4-bit rounding of x = t * step; t as the GEMM takes it."""
        if lowbit.available():
            return tuple(lowbit.extension().round_a4(x.contiguous(), self.mm.u8))
        step, lo, hi = activation_grid(x, 4)
        t = torch.clamp(torch.round(x / step), lo, hi)
        return (t + 64).to(torch.uint8) if self.mm.u8 else t, step

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.a4:
            t, step = self._codes4(x)
            return self.mm.linear(t, step, None, 1)
        if self.mm.grid == "symmetric":
            u, step = self.mm.round(x, self.passes)
            return self.mm.linear(u, step, None, self.passes, zero=128)
        t, step, base = self._rounded(x)
        return self.mm.linear(t, step, base.view(self.passes, x.shape[0], 1).sum(0), self.passes)


class Int4Kernel:
    """torch's CPU int4 weight-only GEMM; rows padded to 16, columns to 32, one scale per group."""

    name = "cpu-int4"
    writes_into = False
    rounds_input = False  # takes activations already rounded to the plan's grid

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        n, k = codes.shape
        self.n, self.k = n, k
        # Shift rows whose codes allow it (every 2-bit row) so that the kernel's own offset of 8 is their
        # zero point: their zero term is then exactly 0 instead of a bf16-rounded (8 - z) * scale.
        shifted = codes.long() - zero.long()[:, None] + 8
        fits = (shifted.amin(1) >= 0) & (shifted.amax(1) <= 15)
        codes = torch.where(fits[:, None], shifted, codes.long())
        zero = torch.where(fits, torch.full_like(zero.float(), 8.0), zero.float())
        n16, k32 = round_up(n, 16), round_up(k, 32)
        q = torch.zeros(n16, k32, dtype=torch.int32)
        q[:n, :k] = codes.to(torch.int32)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        self.group = next(g for g in INT4_GROUPS if k32 % g == 0)
        sc, zp = torch.zeros(n16), torch.zeros(n16)
        sc[:n], zp[:n] = scale, (8 - zero.float()) * scale  # kernel: w = (q - 8) * scale + zero
        self.sz = torch.stack([sc, zp], -1)[None].expand(k32 // self.group, n16, 2).contiguous().bfloat16()
        self.pad = k32 - k
        self.nbytes = self.packed.numel() + self.sz.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (0, self.pad))
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group, self.sz)
        return y[:, : self.n].float()


class LowBitKernel:
    """qvla's 2/4-bit kernel (lowbit.py): rows stay at their own bit width in memory and every token is
    multiplied with them in integers. Activations are rounded per token on the plan's own grid: one pass
    at A8 (symmetric int8) and A4 (the asymmetric 4-bit grid, so the rounding the plan simulates is the
    kernel's, exactly); two passes at A16 (the second carries the first one's residual: ~14-bit)."""

    name = "qvla-lowbit"
    writes_into = True  # __call__(x, out, cols) writes into the layer's output (PackedLinear)
    # at A8 / A4 the kernel rounds each token on the plan's grid itself (the same per-token rounding as
    # primitives.fake_quant_activation), so the caller need not round it first

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 a_bits: int = 16, isa: str | None = None) -> None:
        self.ext, self.bits = lowbit.extension(), bits
        self.isa = isa or lowbit.isa()  # the same bits on either; "avx2" to time the AVX2 path on a VNNI CPU
        self._isa = lowbit.ISA_CODES[self.isa]
        self.qmax, self.passes = {8: (127, 1), 4: (15, 1), 16: (127, 2)}[a_bits]
        self.asym = a_bits == 4  # primitives.activation_grid
        self.rounds_input = a_bits <= 8
        k = codes.shape[1]
        self.pad = round_up(k, lowbit.block_codes(bits)) - k
        # 8-bit codes are signed (symmetric grid): the kernel reads their bytes as int8
        codes = codes.to(torch.int8).view(torch.uint8) if bits == 8 else codes.to(torch.uint8)
        self.packed = lowbit.block_pack(F.pad(codes, (0, self.pad)), bits)
        self.scale, self.zero = scale.float().contiguous(), zero.float().contiguous()
        self.nbytes = self.packed.numel() + 4 * (self.scale.numel() + self.zero.numel())

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> torch.Tensor:
        """-> (M, rows); with out and cols, row j's outputs go into column cols[j] of out (returned)."""
        xp = F.pad(x, (0, self.pad)) if self.pad else x
        return self.ext.mm(xp, self.packed, self.scale, self.zero, self.bits, self.qmax, self.passes, self.asym,
                           self._isa, out, cols)


class HalfKernel:
    """Rows kept at 16 bits: stored fp16. At up to GEMV_MAX_TOKENS tokens on inputs of GEMV_MIN_K or more,
    qvla's extension reads each fp16 row once and widens it in registers (half_mm); otherwise the rows are
    upcast to fp32 per call for the float GEMM, which at one token moves 10 bytes per weight against 2
    (a budget-8 7B decoder layer's 16-bit rows: bench/layer_ab.py --toggle half-gemv). The micro-VLAs' layers
    (K <= 512) keep the float GEMM, so their closed-loop numbers stay the same bits."""

    name = "fp16-rows"
    writes_into = False
    rounds_input = False  # takes activations already rounded to the plan's grid
    GEMV_MAX_TOKENS = 4
    GEMV_MIN_K = 1024

    def __init__(self, rows: torch.Tensor) -> None:
        self.w = rows.to(torch.float16).contiguous()
        self.nbytes = self.w.numel() * 2
        self.ext = lowbit.extension() if rows.shape[1] >= self.GEMV_MIN_K else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.ext is not None and x.shape[0] <= self.GEMV_MAX_TOKENS:
            return self.ext.half_mm(x, self.w)
        return F.linear(x, self.w.float())


def build_kernel(bits: int, storage: dict[str, torch.Tensor], k: int, a_bits: int = 16):
    """The kernel for one bucket, from its unpacked codes (see storage.bucket_codes)."""
    from qvla.quant.storage import bucket_codes

    if bits == 16:
        return HalfKernel(storage["w16"])
    codes, scale, zero = bucket_codes(storage, bits, k)
    if bits == 8:
        # qvla's kernel forms |q| * (code * sign q), which needs codes in [-127, 127] (qvla's grid)
        on_grid = codes.numel() == 0 or int(codes.min()) >= -127
        if codes.numel() <= SMALL_INT8_WEIGHTS and on_grid and lowbit.available():
            return LowBitKernel(codes, scale, zero, 8, a_bits)
        return Int8Kernel(codes, scale, passes=2 if a_bits >= 16 else 1, a_bits=a_bits)
    if lowbit.available():
        return LowBitKernel(codes, scale, zero, bits, a_bits)
    return Int4Kernel(codes, scale, zero)
