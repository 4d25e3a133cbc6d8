// qvla's int8 GEMM for CPUs with AVX-512 VNNI (kernels.Int8Kernel's "qvla" GEMM; lowbit.cpp registers it):
// uint8 activations u (a token's codes on the plan's symmetric 8-bit grid + 128, as round_sym8 makes them; at A4
// the grid's codes + 64, round_a4's; any uint8 with a zero point) times int8 weight codes,
// four u8 x s8 products summed straight into int32 per vpdpbusd, with Int8Kernel's float epilogue in the
// same pass, so that no (M, N) int32 or float intermediate is written.
//
// Layout (int8_pack): rows in blocks of 16, blocks in panels of 4 (64 rows); within a panel, for each group
// of 4 inputs, the panel's blocks one after another, each 16 rows x 4 codes (64 bytes). A step of the tile
// reads 256 contiguous bytes, so one token streams a panel as one run of memory, and many tokens find it in
// L2 while they pass. The last block holds the rows left over (N mod 16, 4 bytes each per step: no padding
// rows, so a bucket of any size holds one byte per weight) and is read with a masked load. The input
// dimension is padded to a multiple of 4 with zero codes. A tile is 4 blocks x 6 rows of activations: 24 zmm
// accumulators, 4 weight loads and 6 broadcasts per 24 vpdpbusd.
//
// On the 7B decoder's layers streamed from memory (AMD EPYC Zen 5, 2 threads, bench/int8_gemm.py, four runs)
// oneDNN's int8 GEMM took 1.03-1.30x its time at one token, 1.14-1.53x at two and 0.96-1.05x at the prefill's
// 276 tokens; on the W8A8 decoder layer's decode step 1.10x (median of 150 back-to-back pairs).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// The epilogue rounds as Int8Kernel's torch ops over oneDNN's GEMM do: products on their own, torch's addcmul_
// as a fused multiply-add, and nothing else fused, so that on the same input (A4's codes) its floats are those.
#pragma GCC optimize("fp-contract=off")

namespace {

#define QVLA_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

constexpr int64_t ROWS = 16;   // rows per block: one zmm of int32 sums
constexpr int64_t PANEL = 4;   // blocks per panel
constexpr int64_t TOKENS = 6;  // rows of activations per tile (tokens x passes)

// acc[t][j] += u[t][4i .. 4i+3] . block j's rows' codes 4i .. 4i+3 (rows[t] already at 4i); with Tail, the
// last block holds fewer than 16 rows and is read under `tail` (its bytes).
template <int TM, int NB, bool Tail>
QVLA_VNNI inline __attribute__((always_inline)) void step(const uint8_t* const (&rows)[TM], int64_t i,
                                                          const int8_t* w, __mmask64 tail, __m512i (&acc)[TM][NB]) {
  __m512i v[NB];
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j)
    v[j] = Tail && j == NB - 1 ? _mm512_maskz_loadu_epi8(tail, w + j * 64) : _mm512_loadu_si512(w + j * 64);
#pragma GCC unroll 16
  for (int t = 0; t < TM; ++t) {
    int32_t four;
    std::memcpy(&four, rows[t] + 4 * i, 4);
    const __m512i b = _mm512_set1_epi32(four);
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_dpbusd_epi32(acc[t][j], b, v[j]);
  }
}

// d[t][j * 16 + r] = codes of row 16j + r of the panel . u[t], for TM rows of activations and NB blocks;
// `stride` bytes of the panel per group of 4 inputs. The loops over the accumulators must unroll completely:
// GCC 12 otherwise keeps them on the stack, which ran at less than half oneDNN's speed at the prefill.
template <int TM, int NB, bool Tail>
QVLA_VNNI void tile(const uint8_t* const* u, const int8_t* w, int64_t k4, int64_t stride, __mmask64 tail, int32_t* d) {
  const uint8_t* rows[TM];
#pragma GCC unroll 16
  for (int t = 0; t < TM; ++t) rows[t] = u[t];
  __m512i acc[TM][NB];
#pragma GCC unroll 16
  for (int t = 0; t < TM; ++t)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) acc[t][j] = _mm512_setzero_si512();
  for (int64_t i = 0; i < k4; ++i) step<TM, NB, Tail>(rows, i, w + i * stride, tail, acc);
#pragma GCC unroll 16
  for (int t = 0; t < TM; ++t)
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) _mm512_storeu_si512(d + t * PANEL * ROWS + j * ROWS, acc[t][j]);
}

using TileFn = void (*)(const uint8_t* const*, const int8_t*, int64_t, int64_t, __mmask64, int32_t*);
template <int TM, bool Tail>
struct ByBlocks {
  static constexpr TileFn f[PANEL + 1] = {nullptr, tile<TM, 1, Tail>, tile<TM, 2, Tail>, tile<TM, 3, Tail>,
                                          tile<TM, 4, Tail>};
};
template <bool Tail>
struct ByTokens {
  static constexpr const TileFn* f[TOKENS + 1] = {nullptr,                 ByBlocks<1, Tail>::f, ByBlocks<2, Tail>::f,
                                                  ByBlocks<3, Tail>::f, ByBlocks<4, Tail>::f, ByBlocks<5, Tail>::f,
                                                  ByBlocks<6, Tail>::f};
};

// Where panel p's rows start in the layout, its blocks, and its bytes per group of 4 inputs.
struct Panel {
  int64_t offset, blocks, stride, tail_rows;
};
inline Panel panel_of(int64_t p, int64_t n, int64_t k4) {
  const int64_t r0 = p * PANEL * ROWS, rows = std::min(PANEL * ROWS, n - r0);
  const int64_t blocks = (rows + ROWS - 1) / ROWS, tail_rows = rows % ROWS;
  return {r0 * k4 * 4, blocks, rows * 4, tail_rows};
}

}  // namespace

int64_t best_isa();  // lowbit.cpp: 512 where the CPU has AVX-512 VNNI

// codes (N, K) int8 -> the layout above, flat: N * ceil(K / 4) * 4 int8.
torch::Tensor int8_pack(torch::Tensor codes) {
  TORCH_CHECK(codes.dtype() == torch::kInt8 && codes.dim() == 2, "int8_pack: codes must be 2-D int8");
  codes = codes.contiguous();
  const int64_t n = codes.size(0), k = codes.size(1), k4 = (k + 3) / 4;
  auto out = torch::zeros({n * k4 * 4}, codes.options());
  const int8_t* c = codes.data_ptr<int8_t>();
  int8_t* o = out.data_ptr<int8_t>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const Panel pa = panel_of(r / (PANEL * ROWS), n, k4);
      const int64_t within = r % (PANEL * ROWS);  // row within the panel: block within / 16, lane within % 16
      int8_t* base = o + pa.offset + within * 4;
      for (int64_t j = 0; j < k; ++j) base[(j / 4) * pa.stride + j % 4] = c[r * k + j];
    }
  });
  return out;
}

// u (passes * M, K) uint8, pass-major (round_sym8's rows, or round_a4's); packed: int8_pack of the codes (N rows);
// scale (N) fp32; wsum (N) int32, each row's sum of codes; step (passes * M) fp32; bsum (M) fp32, each token's
// base summed over the passes, or empty (no base: Int8Kernel's grids are symmetric or A4's codes). -> y (M, N) fp32:
//   z_p = float(codes . u_p - zero * wsum) * scale,  y = z_0 * step_0 (+ z_1 * step_1) (+ bsum * float(wsum) * scale),
// the arithmetic of Int8Kernel's epilogue over a torch GEMM, in its order.
torch::Tensor int8_mm(torch::Tensor u, torch::Tensor packed, torch::Tensor scale, torch::Tensor wsum,
                      torch::Tensor step, torch::Tensor bsum, int64_t passes, int64_t zero) {
  TORCH_CHECK(best_isa() == 512, "int8_mm: this CPU has no AVX-512 VNNI");
  TORCH_CHECK(u.dtype() == torch::kUInt8 && u.dim() == 2, "int8_mm: u must be 2-D uint8");
  TORCH_CHECK(passes == 1 || passes == 2, "int8_mm: passes must be 1 or 2, got ", passes);
  TORCH_CHECK(u.size(0) % passes == 0, "int8_mm: u must hold passes x M rows");
  TORCH_CHECK(packed.dtype() == torch::kInt8 && packed.dim() == 1 && packed.is_contiguous(),
              "int8_mm: packed must be int8_pack's flat int8 tensor");
  const int64_t n = scale.numel(), m = u.size(0) / passes, k = u.size(1), k4 = (k + 3) / 4;
  const int64_t panels = (n + PANEL * ROWS - 1) / (PANEL * ROWS);
  TORCH_CHECK(k <= 65536, "int8_mm: K must be at most 65536 (int32 sums), got ", k);
  TORCH_CHECK(packed.numel() == n * k4 * 4, "int8_mm: packed holds ", packed.numel(), " codes, not the ",
              n * k4 * 4, " of ", n, " rows x ", k, " inputs");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && wsum.dtype() == torch::kInt32 &&
              wsum.is_contiguous() && wsum.numel() == n, "int8_mm: scale (N) fp32 and wsum (N) int32, contiguous");
  TORCH_CHECK(step.dtype() == torch::kFloat32 && step.numel() == passes * m, "int8_mm: step must be (passes * M) fp32");
  const bool has_base = bsum.numel() > 0;
  TORCH_CHECK(!has_base || (bsum.dtype() == torch::kFloat32 && bsum.numel() == m), "int8_mm: bsum must be (M) fp32 or empty");
  step = step.contiguous(), bsum = bsum.contiguous();
  u = u.contiguous();
  if (k % 4) {  // the last group of 4 inputs would read past a row: pad the rows with zeros
    auto padded = torch::zeros({u.size(0), k4 * 4}, u.options());
    padded.narrow(1, 0, k).copy_(u);
    u = padded;
  }
  const int64_t ldu = u.size(1);
  auto y = torch::empty({m, n}, scale.options());
  const uint8_t* up = u.data_ptr<uint8_t>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float *sc = scale.data_ptr<float>(), *st = step.data_ptr<float>(), *bs = has_base ? bsum.data_ptr<float>() : nullptr;
  const int32_t* ws = wsum.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  const int64_t per_tile = TOKENS / passes;  // tokens per tile: its rows are every pass of each
  // about 2^21 multiply-adds per task, so that a small layer is not split across threads
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(1, passes * m * PANEL * ROWS * k4 * 4));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    int32_t d[TOKENS * PANEL * ROWS];
    const uint8_t* rows[TOKENS];
    for (int64_t p = p0; p < p1; ++p) {
      const Panel pa = panel_of(p, n, k4);
      const int64_t r0 = p * PANEL * ROWS, r1 = std::min(n, r0 + PANEL * ROWS);
      const TileFn* const* tiles = pa.tail_rows ? ByTokens<true>::f : ByTokens<false>::f;
      const __mmask64 tail = pa.tail_rows ? (__mmask64{1} << (4 * pa.tail_rows)) - 1 : 0;
      for (int64_t t0 = 0; t0 < m; t0 += per_tile) {
        const int64_t tm = std::min(per_tile, m - t0);
        for (int64_t q = 0; q < passes; ++q)
          for (int64_t t = 0; t < tm; ++t) rows[q * tm + t] = up + (q * m + t0 + t) * ldu;
        tiles[passes * tm][pa.blocks](rows, wp + pa.offset, k4, pa.stride, tail, d);
        for (int64_t t = 0; t < tm; ++t) {
          float* out = yp + (t0 + t) * n;
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t c = r - r0;
            float v = static_cast<float>(d[t * PANEL * ROWS + c] - static_cast<int32_t>(zero) * ws[r]) * sc[r] * st[t0 + t];
            if (passes == 2)
              v = std::fma(static_cast<float>(d[(tm + t) * PANEL * ROWS + c] - static_cast<int32_t>(zero) * ws[r]) * sc[r],
                           st[m + t0 + t], v);
            if (has_base) v = std::fma(bs[t0 + t], static_cast<float>(ws[r]) * sc[r], v);
            out[r] = v;
          }
        }
      }
    }
  });
  return y;
}
