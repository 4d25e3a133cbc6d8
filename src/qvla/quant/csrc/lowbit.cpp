// Low-bit weight GEMM for x86 CPUs with AVX2 + FMA: 4-bit and 2-bit weights stay packed in memory and
// are expanded to fp32 in registers, 32 codes at a time, next to the activations that use them.
//
// Layout (made by qvla.quant.kernels.block_pack): each row of K codes (K a multiple of 32) is cut into
// blocks of 32 codes.
//   4 bits: a block is 16 bytes; byte j holds code j (low nibble) and code j + 16 (high nibble).
//   2 bits: a block is 8 bytes;  byte j holds codes j, j + 8, j + 16, j + 24 (bits 0-1, 2-3, 4-5, 6-7).
// So shifting and masking a block gives its codes in order, eight at a time.
// A row's weights are w[k] = (code[k] - zero) * scale, so  y = scale * (x . code) - scale * zero * sum(x).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int kMaxTokens = 8;  // tokens per pass over the weights (accumulators kept in registers)

inline __m256 widen(__m128i bytes8) {  // the low 8 bytes (codes 0..15) -> 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes8));
}

// The 32 codes of one block as 4 vectors of 8 floats, in order.
template <int Bits>
inline void expand(const uint8_t* p, __m256 w[4]) {
  if constexpr (Bits == 4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, m), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    w[0] = widen(lo); w[1] = widen(_mm_srli_si128(lo, 8));
    w[2] = widen(hi); w[3] = widen(_mm_srli_si128(hi, 8));
  } else {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x03);
    w[0] = widen(_mm_and_si128(v, m));
    w[1] = widen(_mm_and_si128(_mm_srli_epi16(v, 2), m));
    w[2] = widen(_mm_and_si128(_mm_srli_epi16(v, 4), m));
    w[3] = widen(_mm_and_si128(_mm_srli_epi16(v, 6), m));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int Bits>
void gemm_rows(const float* x, int64_t m, int64_t k, const uint8_t* packed, const float* scale,
               const float* zero, const float* xsum, float* y, int64_t n, int64_t r0, int64_t r1) {
  constexpr int64_t block_bytes = 32 * Bits / 8;
  const int64_t blocks = k / 32, row_bytes = blocks * block_bytes;
  for (int64_t t0 = 0; t0 < m; t0 += kMaxTokens) {
    const int64_t tm = std::min<int64_t>(kMaxTokens, m - t0);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* p = packed + r * row_bytes;
      __m256 acc[kMaxTokens];
      for (int64_t t = 0; t < tm; ++t) acc[t] = _mm256_setzero_ps();
      __m256 w[4];
      for (int64_t b = 0; b < blocks; ++b) {
        expand<Bits>(p + b * block_bytes, w);
        for (int64_t t = 0; t < tm; ++t) {
          const float* xb = x + (t0 + t) * k + b * 32;
          __m256 a = acc[t];
          a = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), a);
          a = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), a);
          a = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), a);
          a = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), a);
          acc[t] = a;
        }
      }
      for (int64_t t = 0; t < tm; ++t)
        y[(t0 + t) * n + r] = scale[r] * (hsum(acc[t]) - zero[r] * xsum[t0 + t]);
    }
  }
}

template <int Bits>
void dequant_rows(const uint8_t* packed, const float* scale, const float* zero, int64_t k, float* w_out,
                  int64_t r0, int64_t r1) {
  constexpr int64_t block_bytes = 32 * Bits / 8;
  const int64_t blocks = k / 32, row_bytes = blocks * block_bytes;
  for (int64_t r = r0; r < r1; ++r) {
    const __m256 s = _mm256_set1_ps(scale[r]), z = _mm256_set1_ps(zero[r]);
    __m256 w[4];
    for (int64_t b = 0; b < blocks; ++b) {
      expand<Bits>(packed + r * row_bytes + b * block_bytes, w);
      float* o = w_out + r * k + b * 32;
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(o + 8 * i, _mm256_mul_ps(_mm256_sub_ps(w[i], z), s));
    }
  }
}

void check(const torch::Tensor& packed, const torch::Tensor& scale, const torch::Tensor& zero, int64_t bits,
           int64_t k) {
  TORCH_CHECK(bits == 2 || bits == 4, "lowbit: bits must be 2 or 4, got ", bits);
  TORCH_CHECK(k % 32 == 0, "lowbit: K must be a multiple of 32, got ", k);
  TORCH_CHECK(packed.dtype() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous(),
              "lowbit: packed must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(packed.size(1) == k * bits / 8, "lowbit: packed rows hold ", packed.size(1), " bytes, expected ",
              k * bits / 8);
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && zero.dtype() == torch::kFloat32 &&
              scale.numel() == packed.size(0) && zero.numel() == packed.size(0) && scale.is_contiguous() &&
              zero.is_contiguous(), "lowbit: scale and zero must be contiguous fp32 of one value per row");
}

}  // namespace

// x (M, K) fp32 -> (M, N) fp32, streaming the packed weights once per 8 tokens.
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
    auto fn = bits == 4 ? gemm_rows<4> : gemm_rows<2>;
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
