// Low-bit weight GEMM for x86 CPUs with AVX2 + FMA: 4-bit and 2-bit weights stay packed in memory and
// are expanded to fp32 in registers, next to the activations that use them.
//
// Layout (made by qvla.quant.lowbit.block_pack): each row of K codes is cut into blocks of 32 bytes
// (64 codes at 4 bits, 128 at 2 bits; K is padded to a whole block). A block is read as eight 32-bit
// lanes; lane j holds codes 8i + j of the block in its bit field i (bits [i*Bits, (i+1)*Bits)). So a
// shift by i*Bits and a mask give codes 8i .. 8i+7 in order, one per lane, with no cross-lane shuffles.
// A row's weights are w[k] = (code[k] - zero) * scale, so  y = scale * (x . code) - scale * zero * sum(x).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int Bits>
constexpr int64_t codes_per_block() { return 256 / Bits; }

// TM tokens share one pass over the rows; C independent accumulators per token hide the FMA latency.
template <int Bits, int TM>
void gemm_rows(const float* x, int64_t k, const uint8_t* packed, const float* scale, const float* zero,
               const float* xsum, float* y, int64_t n, int64_t t0, int64_t r0, int64_t r1) {
  constexpr int fields = 32 / Bits;
  constexpr int C = TM == 1 ? 8 : (TM == 2 ? 4 : 2);
  constexpr int64_t cpb = codes_per_block<Bits>();
  const int64_t blocks = k / cpb;
  const __m256i mask = _mm256_set1_epi32((1 << Bits) - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* p = packed + r * blocks * 32;
    __m256 acc[TM][C];
    for (int t = 0; t < TM; ++t)
      for (int c = 0; c < C; ++c) acc[t][c] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + b * 32));
#pragma GCC unroll 16
      for (int i = 0; i < fields; ++i) {
        const __m256 w = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, Bits * i), mask));
#pragma GCC unroll 4
        for (int t = 0; t < TM; ++t)
          acc[t][i % C] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + (t0 + t) * k + b * cpb + 8 * i), acc[t][i % C]);
      }
    }
    for (int t = 0; t < TM; ++t) {
      __m256 sum = acc[t][0];
      for (int c = 1; c < C; ++c) sum = _mm256_add_ps(sum, acc[t][c]);
      y[(t0 + t) * n + r] = scale[r] * (hsum(sum) - zero[r] * xsum[t0 + t]);
    }
  }
}

template <int Bits>
void gemm_tokens(const float* x, int64_t m, int64_t k, const uint8_t* packed, const float* scale,
                 const float* zero, const float* xsum, float* y, int64_t n, int64_t r0, int64_t r1) {
  int64_t t0 = 0;
  for (; t0 + 4 <= m; t0 += 4) gemm_rows<Bits, 4>(x, k, packed, scale, zero, xsum, y, n, t0, r0, r1);
  if (m - t0 == 3) gemm_rows<Bits, 3>(x, k, packed, scale, zero, xsum, y, n, t0, r0, r1);
  if (m - t0 == 2) gemm_rows<Bits, 2>(x, k, packed, scale, zero, xsum, y, n, t0, r0, r1);
  if (m - t0 == 1) gemm_rows<Bits, 1>(x, k, packed, scale, zero, xsum, y, n, t0, r0, r1);
}

template <int Bits>
void dequant_rows(const uint8_t* packed, const float* scale, const float* zero, int64_t k, float* w_out,
                  int64_t r0, int64_t r1) {
  constexpr int fields = 32 / Bits;
  constexpr int64_t cpb = codes_per_block<Bits>();
  const int64_t blocks = k / cpb;
  const __m256i mask = _mm256_set1_epi32((1 << Bits) - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const __m256 s = _mm256_set1_ps(scale[r]), z = _mm256_set1_ps(zero[r]);
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + (r * blocks + b) * 32));
      float* o = w_out + r * k + b * cpb;
      for (int i = 0; i < fields; ++i) {
        const __m256 w = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, Bits * i), mask));
        _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(_mm256_sub_ps(w, z), s));
      }
    }
  }
}

void check(const torch::Tensor& packed, const torch::Tensor& scale, const torch::Tensor& zero, int64_t bits,
           int64_t k) {
  TORCH_CHECK(bits == 2 || bits == 4, "lowbit: bits must be 2 or 4, got ", bits);
  TORCH_CHECK(k % (256 / bits) == 0, "lowbit: K must be a multiple of ", 256 / bits, " at ", bits, " bits, got ", k);
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous(),
              "lowbit: packed must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(packed.size(1) == k * bits / 8, "lowbit: packed rows hold ", packed.size(1), " bytes, expected ",
              k * bits / 8);
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && zero.dtype() == torch::kFloat32 &&
              scale.numel() == packed.size(0) && zero.numel() == packed.size(0) && scale.is_contiguous() &&
              zero.is_contiguous(), "lowbit: scale and zero must be contiguous fp32 of one value per row");
}

}  // namespace

// x (M, K) fp32 -> (M, N) fp32, streaming the packed weights once per 4 tokens.
torch::Tensor lowbit_mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero,
                        int64_t bits) {
  const int64_t k = x.size(1), m = x.size(0), n = packed.size(0);
  check(packed, scale, zero, bits, k);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "lowbit: x must be 2-D fp32");
  x = x.contiguous();
  auto xsum = x.sum(1).contiguous();
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    auto fn = bits == 4 ? gemm_tokens<4> : gemm_tokens<2>;
    fn(xp, m, k, packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(),
       xsum.data_ptr<float>(), y.data_ptr<float>(), n, r0, r1);
  });
  return y;
}

// The fp32 weight (N, K) the packed rows encode.
torch::Tensor lowbit_dequant(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t bits,
                             int64_t k) {
  check(packed, scale, zero, bits, k);
  const int64_t n = packed.size(0);
  auto w = torch::empty({n, k}, scale.options());
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    auto fn = bits == 4 ? dequant_rows<4> : dequant_rows<2>;
    fn(packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(), k, w.data_ptr<float>(), r0,
       r1);
  });
  return w;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mm", &lowbit_mm, "x (M, K) fp32 times packed 2/4-bit rows (N, K) transposed -> (M, N)");
  m.def("dequant", &lowbit_dequant, "packed 2/4-bit rows -> fp32 (N, K)");
}
