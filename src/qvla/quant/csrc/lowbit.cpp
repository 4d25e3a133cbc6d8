// Low-bit weight GEMM for x86 CPUs with AVX2: 8-, 4- and 2-bit weights stay packed in memory; tokens are
// multiplied with them in integers, 32 codes at a time (vpmaddubsw: unsigned codes x signed int8
// activations), as the int8 GEMMs of fbgemm and llama.cpp do. 8-bit rows are plain signed int8 (K padded
// to 32); the layout below is that of 4 and 2 bits. On CPUs with AVX-512 VNNI (chosen at run time; the
// file is built for AVX2, the VNNI functions carry their own target) rows are multiplied with many tokens
// in tiles of 4 rows x 4 tokens, 64 codes at a time with vpdpbusd (four u8 x s8 products summed straight
// into int32): the same integer sums, so both paths give the same bits.
//
// Layout at 4 and 2 bits (made by qvla.quant.lowbit.block_pack): each row of K codes is cut into blocks
// of 32 bytes (64 codes at 4 bits, 128 at 2 bits; K is padded to a whole block). Byte j of a block holds
// codes j, j + 32, j + 64, ... in its bit fields 0, 1, ... (Bits wide each). So a shift by i*Bits and a
// mask give the block's codes 32i .. 32i+31 in order, as 32 bytes.
//
// Activations are rounded per token to an integer grid, q = round(x / s): symmetric, s = max|x| / 127, in
// one or two passes (the second carries the first one's rounding residual: ~14-bit in all, for A16), or
// the plan's asymmetric 4-bit grid (s = (max - min) / 15, codes in [-z, 15 - z]: the rounding is the
// plan's own).
// A row's weights are w[k] = (code[k] - zero) * scale, so with x[m] as rounded, sum_p s_p[m] * q_p[m],
//   y[m, n] = scale[n] * (sum_p s_p[m] * (code . q_p[m])) - scale[n] * zero[n] * sum(x[m]).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

namespace {

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int Bits>
constexpr int64_t codes_per_block() { return 256 / Bits; }

// Blocks whose code . q products are summed in int16 before they are widened to int32. A vpmaddubsw lane
// is at most 2 * (2^Bits - 1) * 127 in size (3810 at 4 bits, 762 at 2); each token keeps two int16 sums
// (even and odd fields), each taking fields / 2 products per block, so 8 blocks at 4 bits (8 * 3810) or
// 16 at 2 bits (32 * 762) stay below 2^15. Widening (vpmaddwd) once per group instead of once per product
// halves the work on the multiply port, which is what bounds a single token.
template <int Bits>
constexpr int64_t blocks_per_group() { return Bits == 4 ? 8 : 16; }

// 8-bit rows are signed codes in [-127, 127], one per byte (w = code * scale, zero 0). vpmaddubsw takes
// one unsigned operand, so each product is formed as |q| * (code * sign(q)): a lane is at most
// 2 * 127 * 127 < 2^15, and it is widened to int32 at once.
// The AVX2 rows ask for the weights PREFETCH_BYTES ahead while the first group of tokens streams a block of
// rows (the later groups find it in cache, where a prefetch only costs). On 12 distinct 4096x4096 layers
// streamed from memory (AMD EPYC, AVX2, 2 threads; bench/prefetch_ab.py) 2 KB ahead took a 4-bit layer at A16
// from 0.97 to 0.74 ms at one token and 1.59 to 1.31 at four (level at 64), an 8-bit one at A8 from 1.44 to
// 1.19, 1.99 to 1.30 and 17.2 to 15.1 ms at 1, 4 and 64 tokens.
// -DQVLA_PREFETCH=0 builds the kernel without it (bench/prefetch_ab.py compares the two).
#ifndef QVLA_PREFETCH
#define QVLA_PREFETCH 2048
#endif
constexpr int64_t PREFETCH_BYTES = QVLA_PREFETCH;

template <int TM>
void dot_rows8(const int8_t* q, int64_t k, const uint8_t* packed, int32_t* d, int64_t n, int64_t t0, int64_t r0,
               int64_t r1) {
  const int64_t blocks = k / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  const bool first = t0 == 0;  // the first tokens over a block of rows stream it from memory (see PREFETCH_BYTES)
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* p = packed + r * k;
    __m256i acc[TM];
    for (int t = 0; t < TM; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t b = 0; b < blocks; ++b) {
      if (PREFETCH_BYTES > 0 && first) _mm_prefetch(reinterpret_cast<const char*>(p + b * 32 + PREFETCH_BYTES), _MM_HINT_T0);
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + b * 32));
#pragma GCC unroll 4
      for (int t = 0; t < TM; ++t) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (t0 + t) * k + b * 32));
        const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(w, a));
        acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(prod, ones));
      }
    }
    for (int t = 0; t < TM; ++t) d[(t0 + t) * n + r] = hsum_epi32(acc[t]);
  }
}

// D[t, r] = code[r] . q[t] (int32) for TM tokens (rows of q, each K int8) sharing one pass over the rows.
template <int Bits, int TM>
void dot_rows(const int8_t* q, int64_t k, const uint8_t* packed, int32_t* d, int64_t n, int64_t t0, int64_t r0,
              int64_t r1) {
  constexpr int fields = 8 / Bits;
  constexpr int64_t cpb = codes_per_block<Bits>(), group = blocks_per_group<Bits>();
  static_assert(group * (fields / 2) * 2 * ((1 << Bits) - 1) * 127 < 32768, "int16 group sums would overflow");
  const int64_t blocks = k / cpb;
  const __m256i mask = _mm256_set1_epi8((1 << Bits) - 1), ones = _mm256_set1_epi16(1);
  const bool first = t0 == 0;  // the first tokens over a block of rows stream it from memory (see PREFETCH_BYTES)
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* p = packed + r * blocks * 32;
    __m256i acc[TM];
    for (int t = 0; t < TM; ++t) acc[t] = _mm256_setzero_si256();
    for (int64_t g0 = 0; g0 < blocks; g0 += group) {
      const int64_t g1 = std::min(blocks, g0 + group);
      __m256i sum[TM][2];  // two int16 chains per token, so consecutive fields do not wait on each other
      for (int t = 0; t < TM; ++t) sum[t][0] = sum[t][1] = _mm256_setzero_si256();
      for (int64_t b = g0; b < g1; ++b) {
        if (PREFETCH_BYTES > 0 && first) _mm_prefetch(reinterpret_cast<const char*>(p + b * 32 + PREFETCH_BYTES), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + b * 32));
#pragma GCC unroll 4
        for (int i = 0; i < fields; ++i) {
          const __m256i c = _mm256_and_si256(_mm256_srli_epi16(v, Bits * i), mask);  // 32 codes, in order
#pragma GCC unroll 4
          for (int t = 0; t < TM; ++t) {
            const __m256i a =
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (t0 + t) * k + b * cpb + 32 * i));
            sum[t][i & 1] = _mm256_add_epi16(sum[t][i & 1], _mm256_maddubs_epi16(c, a));  // code * q pairs
          }
        }
      }
      for (int t = 0; t < TM; ++t)
        acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(_mm256_madd_epi16(sum[t][0], ones),
                                                           _mm256_madd_epi16(sum[t][1], ones)));
    }
    for (int t = 0; t < TM; ++t) d[(t0 + t) * n + r] = hsum_epi32(acc[t]);
  }
}

// Rows are taken ROW_BLOCK_BYTES of weights at a time, and every group of 4 tokens runs over that block
// while it sits in cache: with many tokens the weights come from memory once, not once per 4 tokens.
constexpr int64_t ROW_BLOCK_BYTES = 64 * 1024;

template <int Bits, int TM>
void dot_rows_of(const int8_t* q, int64_t k, const uint8_t* packed, int32_t* d, int64_t n, int64_t t0, int64_t r0,
                 int64_t r1) {
  if constexpr (Bits == 8)
    dot_rows8<TM>(q, k, packed, d, n, t0, r0, r1);
  else
    dot_rows<Bits, TM>(q, k, packed, d, n, t0, r0, r1);
}

// The kernel for TM = 1..4 tokens over rows r0 .. r1 (index TM; the AVX2 rows or the VNNI tiles).
using RowsFn = void (*)(const int8_t*, int64_t, const uint8_t*, int32_t*, int64_t, int64_t, int64_t, int64_t);

template <int Bits>
void over_row_blocks(const RowsFn (&by_tokens)[5], int64_t align, const int8_t* q, int64_t m, int64_t k,
                     const uint8_t* packed, int32_t* d, int64_t n, int64_t r0, int64_t r1) {
  const int64_t rows = std::max<int64_t>(align, ROW_BLOCK_BYTES / (k * Bits / 8) / align * align);
  for (int64_t b0 = r0; b0 < r1; b0 += rows) {
    const int64_t b1 = std::min(r1, b0 + rows);
    int64_t t0 = 0;
    for (; t0 + 4 <= m; t0 += 4) by_tokens[4](q, k, packed, d, n, t0, b0, b1);
    if (m > t0) by_tokens[m - t0](q, k, packed, d, n, t0, b0, b1);
  }
}

template <int Bits>
void dot_tokens(const int8_t* q, int64_t m, int64_t k, const uint8_t* packed, int32_t* d, int64_t n, int64_t r0,
                int64_t r1) {
  static constexpr RowsFn by_tokens[5] = {nullptr, dot_rows_of<Bits, 1>, dot_rows_of<Bits, 2>,
                                          dot_rows_of<Bits, 3>, dot_rows_of<Bits, 4>};
  over_row_blocks<Bits>(by_tokens, 1, q, m, k, packed, d, n, r0, r1);
}


// ---- AVX-512 VNNI path ---------------------------------------------------------------------------------
#define QVLA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// The activations of a token in the order of a 64-byte load of two consecutive 32-byte weight blocks: for
// blocks 2p and 2p+1 and field i, the activations of codes 32i .. 32i+31 of block 2p, then those of block
// 2p+1. A last, odd block keeps its order (it is read with a 32-byte masked load).
template <int Bits>
void pair_layout(const int8_t* q, int8_t* out, int64_t k) {
  constexpr int fields = 8 / Bits;
  constexpr int64_t cpb = codes_per_block<Bits>();
  const int64_t blocks = k / cpb, pairs = blocks / 2;
  for (int64_t p = 0; p < pairs; ++p)
    for (int i = 0; i < fields; ++i)
      for (int h = 0; h < 2; ++h) std::memcpy(out + p * 2 * cpb + i * 64 + h * 32, q + (2 * p + h) * cpb + 32 * i, 32);
  if (blocks % 2) std::memcpy(out + pairs * 2 * cpb, q + pairs * 2 * cpb, cpb);
}

// The fields of one load of codes per row (v[r]: a pair of 32-byte blocks, or, Half, the last, odd block
// in the low half with zeros above, whose products are 0), each times TM tokens' activations: field i of
// token t at a + t * k + 64 i (a pair, in pair_layout) or + 32 i (the odd block, its low 32 bytes read).
template <int Bits, int RM, int TM, bool Half>
QVLA_AVX512 inline __attribute__((always_inline)) void fields_vnni(const __m512i (&v)[RM], const int8_t* a,
                                                                   int64_t k, __m512i (&acc)[RM][TM]) {
  const __m512i mask = _mm512_set1_epi8((1 << Bits) - 1);
#pragma GCC unroll 4
  for (int i = 0; i < 8 / Bits; ++i) {
    __m512i c[RM];
    for (int r = 0; r < RM; ++r) c[r] = _mm512_and_si512(_mm512_srli_epi16(v[r], Bits * i), mask);
    for (int t = 0; t < TM; ++t) {
      const __m512i x = Half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, a + t * k + 32 * i)
                             : _mm512_loadu_si512(a + t * k + 64 * i);
      for (int r = 0; r < RM; ++r) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], c[r], x);
    }
  }
}

// D[t, r] for RM rows x TM tokens at 4 and 2 bits: codes are the unsigned operand, activations (in
// pair_layout) the signed one. A lane sums at most K/16 products of (2^Bits - 1) * 127: no overflow for
// K < 2^20.
template <int Bits, int RM, int TM>
QVLA_AVX512 void tile_vnni(const int8_t* qa, int64_t k, const uint8_t* packed, int32_t* d, int64_t n, int64_t t0,
                           int64_t r0) {
  constexpr int64_t cpb = codes_per_block<Bits>();
  const int64_t blocks = k / cpb, pairs = blocks / 2, row_bytes = blocks * 32;
  __m512i acc[RM][TM], v[RM];
  for (int r = 0; r < RM; ++r)
    for (int t = 0; t < TM; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int64_t p = 0; p < pairs; ++p) {
    for (int r = 0; r < RM; ++r) v[r] = _mm512_loadu_si512(packed + (r0 + r) * row_bytes + p * 64);
    fields_vnni<Bits, RM, TM, false>(v, qa + t0 * k + p * 2 * cpb, k, acc);
  }
  if (blocks % 2) {  // the last block: 32 bytes of codes, read masked
    for (int r = 0; r < RM; ++r)
      v[r] = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, packed + (r0 + r) * row_bytes + pairs * 64);
    fields_vnni<Bits, RM, TM, true>(v, qa + t0 * k + pairs * 2 * cpb, k, acc);
  }
  for (int r = 0; r < RM; ++r)
    for (int t = 0; t < TM; ++t) d[(t0 + t) * n + r0 + r] = _mm512_reduce_add_epi32(acc[r][t]);
}

template <int Bits, int TM>
QVLA_AVX512 void rows_vnni(const int8_t* qa, int64_t k, const uint8_t* packed, int32_t* d, int64_t n, int64_t t0,
                           int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) tile_vnni<Bits, 4, TM>(qa, k, packed, d, n, t0, r);
  if (r1 - r == 3) tile_vnni<Bits, 3, TM>(qa, k, packed, d, n, t0, r);
  if (r1 - r == 2) tile_vnni<Bits, 2, TM>(qa, k, packed, d, n, t0, r);
  if (r1 - r == 1) tile_vnni<Bits, 1, TM>(qa, k, packed, d, n, t0, r);
}

// tile_vnni8: D[t, r] + 128 * sum(q[t]) (mod 2^32) for RM 8-bit rows x TM tokens: vpdpbusd wants one unsigned operand, so
// each signed code is read as code + 128 (its top bit flipped) and the caller takes 128 * sum(q[t]) off again
// (lowbit_mm's epilogue). Below K = 2^16 even the biased sums (255 * 127 * K at most) stay inside int32, so
// the reduction cannot overflow. The activations are q as rounded: an 8-bit row is one code per byte, in order.
// step_vnni8: 64 codes of RM rows times TM tokens' activations; Half: the last 32 codes of a row, both loads
// masked (the weights' masked bytes become 0x80 after the flip, but the activations' are 0, so the products are). The main loop must read unmasked: with a run-time mask in it GCC 12 kept the 16 accumulators
// on the stack, and the tile ran at half the speed.
template <int RM, int TM, bool Half>
QVLA_AVX512 inline __attribute__((always_inline)) void step_vnni8(const uint8_t* w, const int8_t* a, int64_t k,
                                                                  __m512i (&acc)[RM][TM]) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i v[RM];
  for (int r = 0; r < RM; ++r)
    v[r] = _mm512_xor_si512(Half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, w + r * k) : _mm512_loadu_si512(w + r * k),
                            flip);
  for (int t = 0; t < TM; ++t) {
    const __m512i x = Half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, a + t * k) : _mm512_loadu_si512(a + t * k);
    for (int r = 0; r < RM; ++r) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], v[r], x);
  }
}

template <int RM, int TM>
QVLA_AVX512 void tile_vnni8(const int8_t* q, int64_t k, const uint8_t* packed, int32_t* d, int64_t n, int64_t t0,
                            int64_t r0) {
  const int64_t full = k / 64 * 64;
  const uint8_t* w = packed + r0 * k;
  const int8_t* a = q + t0 * k;
  __m512i acc[RM][TM];
  for (int r = 0; r < RM; ++r)
    for (int t = 0; t < TM; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int64_t j = 0; j < full; j += 64) step_vnni8<RM, TM, false>(w + j, a + j, k, acc);
  if (full < k) step_vnni8<RM, TM, true>(w + full, a + full, k, acc);  // K is a multiple of 32: the last 32 codes
  for (int r = 0; r < RM; ++r)
    for (int t = 0; t < TM; ++t) d[(t0 + t) * n + r0 + r] = _mm512_reduce_add_epi32(acc[r][t]);
}

template <int TM>
QVLA_AVX512 void rows_vnni8(const int8_t* q, int64_t k, const uint8_t* packed, int32_t* d, int64_t n, int64_t t0,
                            int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) tile_vnni8<4, TM>(q, k, packed, d, n, t0, r);
  if (r1 - r == 3) tile_vnni8<3, TM>(q, k, packed, d, n, t0, r);
  if (r1 - r == 2) tile_vnni8<2, TM>(q, k, packed, d, n, t0, r);
  if (r1 - r == 1) tile_vnni8<1, TM>(q, k, packed, d, n, t0, r);
}

void dot_tokens_vnni8(const int8_t* q, int64_t m, int64_t k, const uint8_t* packed, int32_t* d, int64_t n, int64_t r0,
                      int64_t r1) {
  static constexpr RowsFn by_tokens[5] = {nullptr, rows_vnni8<1>, rows_vnni8<2>, rows_vnni8<3>, rows_vnni8<4>};
  over_row_blocks<8>(by_tokens, 4, q, m, k, packed, d, n, r0, r1);
}

// As dot_tokens, on whole tiles of 4 rows where the block allows.
template <int Bits>
void dot_tokens_vnni(const int8_t* qa, int64_t m, int64_t k, const uint8_t* packed, int32_t* d, int64_t n, int64_t r0,
                     int64_t r1) {
  static constexpr RowsFn by_tokens[5] = {nullptr, rows_vnni<Bits, 1>, rows_vnni<Bits, 2>, rows_vnni<Bits, 3>,
                                          rows_vnni<Bits, 4>};
  over_row_blocks<Bits>(by_tokens, 4, qa, m, k, packed, d, n, r0, r1);
}

// The rounded activations as the VNNI tiles read them (pair_layout), one row of q per token and pass.
void vnni_layout(const int8_t* q, int8_t* qa, int64_t rows, int64_t k, int64_t bits) {
  at::parallel_for(0, rows, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) (bits == 4 ? pair_layout<4> : pair_layout<2>)(q + t * k, qa + t * k, k);
  });
}

void dequant_rows8(const uint8_t* packed, const float* scale, int64_t k, float* w_out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* p = reinterpret_cast<const int8_t*>(packed) + r * k;
    for (int64_t j = 0; j < k; ++j) w_out[r * k + j] = static_cast<float>(p[j]) * scale[r];
  }
}

template <int Bits>
void dequant_rows(const uint8_t* packed, const float* scale, const float* zero, int64_t k, float* w_out,
                  int64_t r0, int64_t r1) {
  constexpr int fields = 8 / Bits;
  constexpr int64_t cpb = codes_per_block<Bits>();
  const int64_t blocks = k / cpb;
  const __m256i mask = _mm256_set1_epi8((1 << Bits) - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const __m256 s = _mm256_set1_ps(scale[r]), z = _mm256_set1_ps(zero[r]);
    for (int64_t b = 0; b < blocks; ++b) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + (r * blocks + b) * 32));
      float* o = w_out + r * k + b * cpb;
      for (int i = 0; i < fields; ++i) {
        const __m256i c = _mm256_and_si256(_mm256_srli_epi16(v, Bits * i), mask);
        const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int j = 0; j < 4; ++j) {
          const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]));
          _mm256_storeu_ps(o + 32 * i + 8 * j, _mm256_mul_ps(_mm256_sub_ps(w, z), s));
        }
      }
    }
  }
}


// One activation pass: q = round(r / step) with step = max(max|r|, floor) / qmax (qmax <= 127), and
// r -= q * step (the residual the next pass carries). k a multiple of 32. Returns step (NaN, with q = 0,
// when r holds a NaN or an infinity, so that the output is NaN as the float layer's would be);
// *qsum = sum of q. asym: the grid spans [min(r, 0), max(r, 0)] in qmax steps instead, with the zero point
// z folded into the bounds, q in [-z, qmax - z] (primitives.activation_grid's A4 grid).
float round_to_int8(float* r, int64_t k, float qmax, float floor, bool asym, int8_t* q, int64_t* qsum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 mx = _mm256_setzero_ps(), mn = _mm256_setzero_ps(), bad = _mm256_setzero_ps();  // bad: NaN iff r has NaN/inf
  for (int64_t j = 0; j < k; j += 8) {
    const __m256 v = _mm256_loadu_ps(r + j);
    mx = _mm256_max_ps(mx, asym ? v : _mm256_andnot_ps(sign, v));
    mn = _mm256_min_ps(mn, v);
    bad = _mm256_add_ps(bad, _mm256_mul_ps(v, _mm256_setzero_ps()));
  }
  alignas(32) float lanes[8], low[8], flags[8];
  _mm256_store_ps(lanes, mx);
  _mm256_store_ps(low, mn);
  _mm256_store_ps(flags, bad);
  const float amax = *std::max_element(lanes, lanes + 8);
  const float amin = *std::min_element(low, low + 8);  // <= 0: the lanes start at 0
  if (std::any_of(flags, flags + 8, [](float f) { return std::isnan(f); }) || !std::isfinite(amax) ||
      !std::isfinite(amin)) {
    std::fill(q, q + k, 0);
    *qsum = 0;
    return NAN;
  }
  const float step = std::max(asym ? amax - amin : amax, floor) / qmax;
  const float z = asym ? std::nearbyint(-amin / step) : 0.f;  // round half to even, as torch.round
  const __m256 st = _mm256_set1_ps(step), lim = _mm256_set1_ps(asym ? qmax - z : qmax),
               nlim = _mm256_set1_ps(asym ? -z : -qmax);
  __m256i csum = _mm256_setzero_si256();  // |q| <= 127 over k < 2^24 codes: no int32 overflow
  for (int64_t j = 0; j < k; j += 32) {
    __m256i c[4];
    for (int u = 0; u < 4; ++u) {
      const __m256 v = _mm256_loadu_ps(r + j + 8 * u);
      const __m256 f = _mm256_round_ps(_mm256_min_ps(lim, _mm256_max_ps(nlim, _mm256_div_ps(v, st))),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm256_storeu_ps(r + j + 8 * u, _mm256_fnmadd_ps(f, st, v));
      c[u] = _mm256_cvtps_epi32(f);
      csum = _mm256_add_epi32(csum, c[u]);
    }
    // packs interleave the 128-bit lanes: undo with one cross-lane permute
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  *qsum = hsum_epi32(csum);
  return step;
}

// round7's sweeps, in AVX2 with a scalar tail: the same operations in the same order as the scalar loops they
// replace, so the same floats (bench/extension_ab.py checks; the compiler may fuse the residual's multiply-add,
// which the test against torch's arithmetic allows for). A NaN or infinite input gives NaN codes' rows here where
// the scalar loops clamped it; neither matches torch, and the plans' activations are finite. Scalar loops (std::nearbyint is a library call) had taken 1.35 ms on
// a 276 x 4096 input at A8, 0.30 now (2 threads, bench/extension_ab.py): ~8 ms of a 7B decoder layer's W8A8
// prefill over its seven linears.
inline float round_even(float v) { return std::nearbyint(v); }
inline __m256 round_even(__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }

// r on the plan's symmetric 8-bit grid: s = max(max|r|, 1e-8) / 127, clamp(round(r / s), -127, 127) * s.
void on_a8_grid(float* r, int64_t k) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 mx = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(r + j)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float a = *std::max_element(lanes, lanes + 8);
  for (; j < k; ++j) a = std::max(a, std::fabs(r[j]));
  const float s = std::max(a, 1e-8f) / 127.0f;
  const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  for (j = 0; j + 8 <= k; j += 8) {
    const __m256 q = round_even(_mm256_div_ps(_mm256_loadu_ps(r + j), vs));
    _mm256_storeu_ps(r + j, _mm256_mul_ps(_mm256_min_ps(hi, _mm256_max_ps(lo, q)), vs));
  }
  for (; j < k; ++j) r[j] = std::min(127.0f, std::max(-127.0f, round_even(r[j] / s))) * s;
}

void min_max(const float* r, int64_t k, float* lo, float* hi) {
  __m256 mn = _mm256_set1_ps(r[0]), mx = mn;
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256 v = _mm256_loadu_ps(r + j);
    mn = _mm256_min_ps(mn, v), mx = _mm256_max_ps(mx, v);
  }
  alignas(32) float a[8], b[8];
  _mm256_store_ps(a, mn), _mm256_store_ps(b, mx);
  *lo = *std::min_element(a, a + 8), *hi = *std::max_element(b, b + 8);
  for (; j < k; ++j) *lo = std::min(*lo, r[j]), *hi = std::max(*hi, r[j]);
}

// One pass: t = round((r - lo) / st) - 64 into f (float) or u (uint8 t + 64), and r -= t * st + b.
void sweep7(float* r, int64_t k, float lo, float st, float b, float* f, uint8_t* u) {
  const __m256 vlo = _mm256_set1_ps(lo), vst = _mm256_set1_ps(st), vb = _mm256_set1_ps(b),
               off = _mm256_set1_ps(64.0f);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256 v = _mm256_loadu_ps(r + j);
    const __m256 q = _mm256_sub_ps(round_even(_mm256_div_ps(_mm256_sub_ps(v, vlo), vst)), off);
    if (f) {
      _mm256_storeu_ps(f + j, q);
    } else {  // q + 64 in [0, 127]: to bytes
      const __m256i c = _mm256_cvtps_epi32(_mm256_add_ps(q, off));
      const __m128i c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(u + j), _mm_packus_epi16(c16, c16));
    }
    _mm256_storeu_ps(r + j, _mm256_sub_ps(v, _mm256_add_ps(_mm256_mul_ps(q, vst), vb)));
  }
  for (; j < k; ++j) {
    const float q = round_even((r[j] - lo) / st) - 64.0f;
    if (f) f[j] = q;
    else u[j] = static_cast<uint8_t>(q + 64.0f);
    r[j] = r[j] - (q * st + b);
  }
}

void check(const torch::Tensor& packed, const torch::Tensor& scale, const torch::Tensor& zero, int64_t bits,
           int64_t k) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "lowbit: bits must be 2, 4 or 8, got ", bits);
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

// The VNNI tiles take 4- and 2-bit rows from this many rows of rounded activations (tokens x passes) on:
// below it the AVX2 path, one row at a time, streams the weights faster (one token, 4096x4096 layers
// streamed from memory: 0.33 ms against 0.60 on the VNNI tiles; level at 4 rows, VNNI ahead from 8).
// Nor do rows shorter than VNNI_MIN_K (the micro-VLAs' 128-wide layers): there the tile's 16 horizontal
// sums cost about what its products do, and the AVX2 path was level or faster. 8-bit rows on the tiles
// (tile_vnni8) ran 2-3.4x faster than on the AVX2 rows from 8 to 276 tokens on buckets of 384x512 to
// 256x11008 (AMD EPYC, Zen 5, 2 threads; bench/lowbit_tokens.py --sections buckets); at 276 tokens they are
// 1.2-1.5x slower than oneDNN's int8 GEMM there (on a whole 4096x4096 layer 9.5 against 6.5 ms), which keeps
// the large 8-bit buckets.
constexpr int64_t VNNI_MIN_ROWS = 8;
constexpr int64_t VNNI_MIN_K = 256;
// 8-bit rows take the VNNI tiles from this many rows of activations on, and below VNNI_MAX_K8 inputs (there
// the biased sums, up to 255 * 127 * K, stay below 2^31).
constexpr int64_t VNNI_MIN_ROWS8 = 8;
constexpr int64_t VNNI_MAX_K8 = 1 << 16;

// The instruction set the integer products run on: 512 (AVX-512 VNNI) where the CPU has it, else 2 (AVX2).
int64_t best_isa() {
  static const int64_t isa = cpu_has_avx512_vnni() ? 512 : 2;
  return isa;
}

// x (M, K) fp32 -> (M, N) fp32: each token rounded to the grid of qmax in `passes` passes (the second
// carries the first one's residual), integer dot products with the rows, then the float epilogue.
// isa: 0 the best this CPU has, 2 AVX2, 512 AVX-512 VNNI (refused where the CPU lacks it).
// out, cols (optional): write row j's outputs into column cols[j] of out (M, >= N) fp32 instead of a new
// (M, N) tensor, so a layer split into buckets by bit width gets its channels in place without a scatter.
torch::Tensor lowbit_mm(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero,
                        int64_t bits, int64_t qmax, int64_t passes, bool asym, int64_t isa,
                        c10::optional<torch::Tensor> out, c10::optional<torch::Tensor> cols) {
  TORCH_CHECK(isa == 0 || isa == 2 || isa == 512, "lowbit: isa must be 0 (best), 2 (AVX2) or 512 (AVX-512 VNNI), got ", isa);
  TORCH_CHECK(isa != 512 || best_isa() == 512, "lowbit: this CPU has no AVX-512 VNNI");
  if (isa == 0) isa = best_isa();
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "lowbit: x must be 2-D fp32");
  TORCH_CHECK(x.size(1) < (1 << 20), "lowbit: K must be below 2^20 (int32 sums), got ", x.size(1));
  TORCH_CHECK(qmax >= 1 && qmax <= 127, "lowbit: qmax must be in [1, 127], got ", qmax);
  TORCH_CHECK(passes == 1 || passes == 2, "lowbit: passes must be 1 or 2, got ", passes);
  TORCH_CHECK(!asym || passes == 1, "lowbit: an asymmetric grid rounds in one pass");
  check(packed, scale, zero, bits, x.size(1));
  TORCH_CHECK(x.size(1) > 0, "lowbit: x must have at least one column");
  TORCH_CHECK(bits != 8 || x.size(1) < 133144, "lowbit: 8-bit rows need K below 133144 (127 * 127 * K < 2^31), got ",
              x.size(1));
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  TORCH_CHECK(out.has_value() == cols.has_value(), "lowbit: out and cols go together");
  torch::Tensor y = out.has_value() ? *out : torch::empty({m, n}, x.options());
  std::vector<int64_t> col;  // out's column of each row (only with out)
  if (out.has_value()) {
    TORCH_CHECK(y.device().is_cpu() && y.dtype() == torch::kFloat32 && y.dim() == 2 && y.size(0) == m &&
                y.stride(1) == 1 && (m <= 1 || y.stride(0) >= y.size(1)),
                "lowbit: out must be (M, columns) fp32 on the CPU, rows apart, with unit column stride");
    TORCH_CHECK(cols->dtype() == torch::kInt64 && cols->dim() == 1 && cols->numel() == n,
                "lowbit: cols must hold one int64 column per row of packed");
    const auto c = cols->contiguous();
    col.assign(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + n);
    for (int64_t j = 0; j < n; ++j)
      TORCH_CHECK(col[j] >= 0 && col[j] < y.size(1), "lowbit: column ", col[j], " is outside out");
  }
  const int64_t ldy = y.stride(0);
  auto q = torch::empty({passes * m, k}, x.options().dtype(torch::kInt8));
  // xsum: the sum of each token as rounded (the zero point's term), so that y is exactly rounded x . w
  std::vector<double> s(passes * m), xsum(m, 0.0);
  std::vector<int64_t> qsums(passes * m);  // sum(q) per row of rounded activations (the 8-bit VNNI tiles' term)
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  at::parallel_for(0, m, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> r(k);
    for (int64_t t = t0; t < t1; ++t) {
      std::copy(xp + t * k, xp + (t + 1) * k, r.data());
      for (int64_t pass = 0; pass < passes; ++pass) {
        // the first pass floors max|x| as the simulated rounding does (primitives.fake_quant_activation);
        // the residual's pass only keeps its step above underflow
        const float floor = pass == 0 ? 1e-8f : std::numeric_limits<float>::min() * qmax;
        int64_t qsum = 0;
        s[pass * m + t] =
            round_to_int8(r.data(), k, static_cast<float>(qmax), floor, asym, qp + (pass * m + t) * k, &qsum);
        xsum[t] += s[pass * m + t] * static_cast<double>(qsum);
        qsums[pass * m + t] = qsum;
      }
    }
  });
  auto d = torch::empty({passes * m, n}, x.options().dtype(torch::kInt32));
  // the VNNI tiles read the activations re-laid (vnni_layout); the AVX2 rows read q as rounded
  auto fn = bits == 8 ? dot_tokens<8> : bits == 4 ? dot_tokens<4> : dot_tokens<2>;
  const int8_t* qrows = qp;
  torch::Tensor qa;
  // the 8-bit tiles' sums carry 128 * sum(q) each, taken off below in modular int32 arithmetic
  std::vector<uint32_t> offset(passes * m, 0);
  if (isa == 512 && bits == 8 && passes * m >= VNNI_MIN_ROWS8 && k >= VNNI_MIN_K && k < VNNI_MAX_K8) {
    fn = dot_tokens_vnni8;
    for (int64_t i = 0; i < passes * m; ++i) offset[i] = static_cast<uint32_t>(128 * qsums[i]);
  } else if (isa == 512 && bits != 8 && passes * m >= VNNI_MIN_ROWS && k >= VNNI_MIN_K) {
    qa = torch::empty_like(q);
    vnni_layout(qp, qa.data_ptr<int8_t>(), passes * m, k, bits);
    fn = bits == 4 ? dot_tokens_vnni<4> : dot_tokens_vnni<2>;
    qrows = qa.data_ptr<int8_t>();
  }
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    fn(qrows, passes * m, k, packed.data_ptr<uint8_t>(), d.data_ptr<int32_t>(), n, r0, r1);
  });
  const int32_t* dp = d.data_ptr<int32_t>();
  const float *sc = scale.data_ptr<float>(), *zp = zero.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto dot = [&](int64_t row, int64_t j) {  // exact: both sums are below 2^31 in size
    return static_cast<int32_t>(static_cast<uint32_t>(dp[row * n + j]) - offset[row]);
  };
  at::parallel_for(0, m, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < n; ++j) {
        double acc = s[t] * dot(t, j);
        if (passes == 2) acc += s[m + t] * dot(m + t, j);
        yp[t * ldy + (col.empty() ? j : col[j])] = static_cast<float>(sc[j] * (acc - zp[j] * xsum[t]));
      }
  });
  return y;
}

// fp16 rows (the plan's 16-bit channels, kernels.HalfKernel) times a few fp32 tokens: each row is read once
// as fp16 and widened in registers (F16C), where the float GEMM needed the rows upcast to a fp32 copy on every
// call (10 bytes of traffic per weight against 2). Sums in fp32, 4 x 8 lanes per token, then across lanes.
template <int TM>
__attribute__((target("avx2,fma,f16c"))) void half_rows(const float* x, int64_t k, const uint16_t* w, float* y,
                                                        int64_t n, int64_t t0, int64_t r0, int64_t r1) {
  const int64_t k32 = k / 32 * 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* row = w + r * k;
    __m256 acc[TM][4];
    for (int t = 0; t < TM; ++t)
      for (int u = 0; u < 4; ++u) acc[t][u] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k32; j += 32) {
      __m256 v[4];
      for (int u = 0; u < 4; ++u)
        v[u] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j + 8 * u)));
      for (int t = 0; t < TM; ++t)
        for (int u = 0; u < 4; ++u)
          acc[t][u] = _mm256_fmadd_ps(v[u], _mm256_loadu_ps(x + (t0 + t) * k + j + 8 * u), acc[t][u]);
    }
    for (int t = 0; t < TM; ++t) {
      const __m256 a = _mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3]));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, a);
      float sum = 0.0f;
      for (int l = 0; l < 8; ++l) sum += lanes[l];
      for (int64_t j = k32; j < k; ++j) sum += _cvtsh_ss(row[j]) * x[(t0 + t) * k + j];
      y[(t0 + t) * n + r] = sum;
    }
  }
}

// x (M, K) fp32 . w (N, K) fp16 -> (M, N) fp32, four tokens per pass over the rows.
torch::Tensor half_mm(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "half_mm: x must be 2-D fp32");
  TORCH_CHECK(w.dtype() == torch::kFloat16 && w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1),
              "half_mm: w must be contiguous 2-D fp16 with x's columns");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  auto y = torch::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::Half>());
  float* yp = y.data_ptr<float>();
  using HalfFn = void (*)(const float*, int64_t, const uint16_t*, float*, int64_t, int64_t, int64_t, int64_t);
  static constexpr HalfFn by_tokens[5] = {nullptr, half_rows<1>, half_rows<2>, half_rows<3>, half_rows<4>};
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    int64_t t0 = 0;
    for (; t0 + 4 <= m; t0 += 4) by_tokens[4](xp, k, wp, yp, n, t0, r0, r1);
    if (m > t0) by_tokens[m - t0](xp, k, wp, yp, n, t0, r0, r1);
  });
  return y;
}

// fbgemm's dynamic int8 input, rounded here (kernels.Int8Kernel): per token and pass, its [lo, hi] in 127
// steps, t = round((r - lo) / step) - 64 in [-64, 63] (fbgemm then picks scale 1, zero point 64 and its
// own rounding is exact), base = lo + 64 * step, and r -= t * step + base for the next pass. The same
// operations in the same order as Int8Kernel's torch fallback. -> (t (passes * M, K), step, base).
// codes: float t in [-64, 63] (fbgemm's input) or, with u8, uint8 t + 64 (oneDNN's, zero point 64).
// a8: each token is first rounded to the plan's symmetric 8-bit grid, as primitives.fake_quant_activation
// does (step = max(max|x|, 1e-8) / 127, clamp(round(x / step), -127, 127) * step: the same operations, so
// the same floats), which spares the caller a separate sweep of torch ops over the input.
std::vector<torch::Tensor> round7(torch::Tensor x, int64_t passes, bool u8, bool a8) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "round7: x must be 2-D fp32");
  TORCH_CHECK(passes >= 1 && passes <= 2, "round7: passes must be 1 or 2, got ", passes);
  TORCH_CHECK(x.size(1) > 0, "round7: x must have at least one column");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  auto t = torch::empty({passes * m, k}, u8 ? x.options().dtype(torch::kUInt8) : x.options());
  auto step = torch::empty({passes * m, 1}, x.options()), base = torch::empty({passes * m, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  float *tp = u8 ? nullptr : t.data_ptr<float>(), *sp = step.data_ptr<float>(), *bp = base.data_ptr<float>();
  uint8_t* up = u8 ? t.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, m, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> r(k);
    for (int64_t i = t0; i < t1; ++i) {
      std::copy(xp + i * k, xp + (i + 1) * k, r.data());
      if (a8) on_a8_grid(r.data(), k);
      for (int64_t pass = 0; pass < passes; ++pass) {
        float lo, hi;
        min_max(r.data(), k, &lo, &hi);
        const float st = std::max((hi - lo) / 127.0f, 1e-30f), b = lo + 64.0f * st;
        const int64_t row = (pass * m + i) * k;
        sweep7(r.data(), k, lo, st, b, u8 ? nullptr : tp + row, u8 ? up + row : nullptr);
        sp[pass * m + i] = st, bp[pass * m + i] = b;
      }
    }
  });
  return {t, step, base};
}

// The int8 GEMM's input at A4 (kernels.Int8Kernel): each token's codes on the plan's asymmetric 4-bit grid,
// as primitives.activation_grid lays it (lo = min(min x, 0), hi = max(max x, 0), step = max(hi - lo, 1e-8) / 15,
// z = round(-lo / step), codes clamp(round(x / step), -z, 15 - z): the same operations, so the same codes).
// The codes fit the GEMM's 7-bit input as they are, so it multiplies the plan's own rounding exactly and
// y = step * (W codes): one sweep, no second rounding. -> (t (M, K), step (M, 1)); t float codes (fbgemm)
// or, with u8, uint8 codes + 64 (oneDNN, zero point 64). A token holding a NaN or an infinity gets step NaN
// (codes 0), so its outputs are NaN as the float layer's would be.
std::vector<torch::Tensor> round_a4(torch::Tensor x, bool u8) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "round_a4: x must be 2-D fp32");
  TORCH_CHECK(x.size(1) > 0, "round_a4: x must have at least one column");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  auto t = torch::empty({m, k}, u8 ? x.options().dtype(torch::kUInt8) : x.options());
  auto step = torch::empty({m, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  float* sp = step.data_ptr<float>();
  at::parallel_for(0, m, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0; i < t1; ++i) {
      const float* r = xp + i * k;
      float* f = u8 ? nullptr : t.data_ptr<float>() + i * k;
      uint8_t* u = u8 ? t.data_ptr<uint8_t>() + i * k : nullptr;
      float lo, hi;
      min_max(r, k, &lo, &hi);
      lo = std::min(lo, 0.0f), hi = std::max(hi, 0.0f);
      const float st = std::max(hi - lo, 1e-8f) / 15.0f, z = round_even(-lo / st);
      const __m256 vst = _mm256_set1_ps(st), vlo = _mm256_set1_ps(-z), vhi = _mm256_set1_ps(15.0f - z),
                   off = _mm256_set1_ps(64.0f);
      __m256 bad = _mm256_setzero_ps();  // NaN iff the token holds a NaN or an infinity
      int64_t j = 0;
      for (; j + 8 <= k; j += 8) {
        const __m256 v = _mm256_loadu_ps(r + j);
        bad = _mm256_add_ps(bad, _mm256_mul_ps(v, _mm256_setzero_ps()));
        const __m256 q = _mm256_min_ps(vhi, _mm256_max_ps(vlo, round_even(_mm256_div_ps(v, vst))));
        if (f) {
          _mm256_storeu_ps(f + j, q);
        } else {  // q + 64 in [49, 79]: to bytes
          const __m256i c = _mm256_cvtps_epi32(_mm256_add_ps(q, off));
          const __m128i c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
          _mm_storel_epi64(reinterpret_cast<__m128i*>(u + j), _mm_packus_epi16(c16, c16));
        }
      }
      alignas(32) float flags[8];
      _mm256_store_ps(flags, bad);
      bool finite = std::none_of(flags, flags + 8, [](float v) { return std::isnan(v); });
      for (; j < k; ++j) {
        finite = finite && std::isfinite(r[j]);
        const float q = std::min(15.0f - z, std::max(-z, round_even(r[j] / st)));
        if (f) f[j] = q;
        else u[j] = static_cast<uint8_t>(q + 64.0f);
      }
      sp[i] = finite ? st : NAN;
      if (!finite) {  // codes 0: the outputs are step * 0 = NaN
        if (f) std::fill(f, f + k, 0.0f);
        else std::fill(u, u + k, uint8_t{64});
      }
    }
  });
  return {t, step};
}

// max |r| over k floats, or NaN where r holds a NaN or an infinity (round_to_int8's test).
float abs_max(const float* r, int64_t k) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256 v = _mm256_loadu_ps(r + j);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
    bad = _mm256_add_ps(bad, _mm256_mul_ps(v, _mm256_setzero_ps()));
  }
  alignas(32) float lanes[8], flags[8];
  _mm256_store_ps(lanes, mx), _mm256_store_ps(flags, bad);
  float amax = *std::max_element(lanes, lanes + 8), flag = std::accumulate(flags, flags + 8, 0.0f);
  for (; j < k; ++j) amax = std::max(amax, std::fabs(r[j])), flag += r[j] * 0.0f;
  return std::isnan(flag) || !std::isfinite(amax) ? NAN : amax;
}

// One symmetric pass at step st: u = clamp(round(r / st), -127, 127) + 128 as uint8 and, with residual,
// r -= code * st (a fused multiply-add): round_to_int8's operations, so the same codes and residual.
void sweep_sym8(float* r, int64_t k, float st, uint8_t* u, bool residual) {
  const __m256 vst = _mm256_set1_ps(st), lim = _mm256_set1_ps(127.0f), nlim = _mm256_set1_ps(-127.0f),
               off = _mm256_set1_ps(128.0f);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256 v = _mm256_loadu_ps(r + j);
    const __m256 f = round_even(_mm256_min_ps(lim, _mm256_max_ps(nlim, _mm256_div_ps(v, vst))));
    const __m256i c = _mm256_cvtps_epi32(_mm256_add_ps(f, off));  // in [1, 255]
    const __m128i c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(u + j), _mm_packus_epi16(c16, c16));
    if (residual) _mm256_storeu_ps(r + j, _mm256_fnmadd_ps(f, vst, v));
  }
  for (; j < k; ++j) {
    const float f = round_even(std::min(127.0f, std::max(-127.0f, r[j] / st)));
    u[j] = static_cast<uint8_t>(f + 128.0f);
    if (residual) r[j] = std::fma(-f, st, r[j]);
  }
}

// qvla's int8 GEMM's input (kernels.Int8Kernel on int8_gemm.cpp): each token on the plan's symmetric 8-bit grid in
// one pass (A8: step = max(max|x|, 1e-8) / 127, codes clamp(round(x / step), -127, 127), the rounding of
// primitives.fake_quant_activation), or two (A16: the second rounds the first one's residual, as lowbit_mm's
// passes do: ~15-bit), in round_to_int8's operations (the low-bit kernel's own rounding). Codes go out as uint8 code + 128
// (the GEMM's unsigned operand, zero point 128). -> (u (passes * M, K), step (passes * M, 1)); a token holding
// a NaN or an infinity gets step NaN (codes 0), so its outputs are NaN.
std::vector<torch::Tensor> round_sym8(torch::Tensor x, int64_t passes) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2, "round_sym8: x must be 2-D fp32");
  TORCH_CHECK(passes == 1 || passes == 2, "round_sym8: passes must be 1 or 2, got ", passes);
  TORCH_CHECK(x.size(1) > 0, "round_sym8: x must have at least one column");
  x = x.contiguous();
  const int64_t m = x.size(0), k = x.size(1);
  auto u = torch::empty({passes * m, k}, x.options().dtype(torch::kUInt8));
  auto step = torch::empty({passes * m, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* up = u.data_ptr<uint8_t>();
  float* sp = step.data_ptr<float>();
  at::parallel_for(0, m, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> r(passes > 1 ? k : 0);
    for (int64_t t = t0; t < t1; ++t) {
      // one pass reads the token itself; two keep its residual in r
      float* row = passes > 1 ? r.data() : const_cast<float*>(xp + t * k);
      if (passes > 1) std::copy(xp + t * k, xp + (t + 1) * k, r.data());
      for (int64_t pass = 0; pass < passes; ++pass) {
        const float floor = pass == 0 ? 1e-8f : std::numeric_limits<float>::min() * 127.0f;  // as lowbit_mm's
        uint8_t* out = up + (pass * m + t) * k;
        const float amax = abs_max(row, k);
        if (std::isnan(amax)) {  // codes 0: the outputs are NaN * 0 = NaN
          std::fill(out, out + k, uint8_t{128});
          for (int64_t p = pass; p < passes; ++p) sp[p * m + t] = NAN;
          for (int64_t p = pass + 1; p < passes; ++p) std::fill(up + (p * m + t) * k, up + (p * m + t + 1) * k, uint8_t{128});
          break;
        }
        const float st = std::max(amax, floor) / 127.0f;
        sp[pass * m + t] = st;
        sweep_sym8(row, k, st, out, pass + 1 < passes);  // the token itself is never written
      }
    }
  });
  return {u, step};
}

// The fp32 weight (N, K) the packed rows encode.
torch::Tensor lowbit_dequant(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t bits,
                             int64_t k) {
  check(packed, scale, zero, bits, k);
  const int64_t n = packed.size(0);
  auto w = torch::empty({n, k}, scale.options());
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    if (bits == 8) {
      dequant_rows8(packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), k, w.data_ptr<float>(), r0, r1);
      return;
    }
    auto fn = bits == 4 ? dequant_rows<4> : dequant_rows<2>;
    fn(packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(), k, w.data_ptr<float>(), r0,
       r1);
  });
  return w;
}

// How many threads this extension's parallel loops run on (1 if it was built without OpenMP, whatever
// torch's own thread count is): the build check behind qvla's tests.
int64_t lowbit_threads_used() {
  const int64_t n = 64 * at::get_num_threads();
  std::vector<int> used(n, -1);
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) used[i] = at::get_thread_num();
  });
  std::sort(used.begin(), used.end());
  return std::unique(used.begin(), used.end()) - used.begin();
}

// int8_gemm.cpp, built into the same module
torch::Tensor int8_pack(torch::Tensor codes);
torch::Tensor int8_mm(torch::Tensor u, torch::Tensor packed, torch::Tensor scale, torch::Tensor wsum,
                      torch::Tensor step, torch::Tensor bsum, int64_t passes, int64_t zero);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mm", &lowbit_mm, "x (M, K) fp32 . packed 2/4/8-bit rows (N, K) -> (M, N) fp32 (integer activations, 1-2 passes)",
        py::arg("x"), py::arg("packed"), py::arg("scale"), py::arg("zero"), py::arg("bits"), py::arg("qmax") = 127,
        py::arg("passes") = 2, py::arg("asym") = false, py::arg("isa") = 0, py::arg("out") = py::none(),
        py::arg("cols") = py::none());
  m.def("best_isa", &best_isa, "the instruction set mm runs on by default: 512 (AVX-512 VNNI) or 2 (AVX2)");
  m.def("round7", &round7, "per-token 7-bit int8-GEMM input in 1-2 passes -> (t, step, base); u8: t + 64 as uint8; a8: on the A8 grid first",
        py::arg("x"), py::arg("passes"), py::arg("u8") = false, py::arg("a8") = false);
  m.def("round_sym8", &round_sym8, "per-token codes on the plan's symmetric 8-bit grid, 1-2 passes, as qvla's int8 GEMM's input -> (code + 128 as uint8, step)",
        py::arg("x"), py::arg("passes"));
  m.def("round_a4", &round_a4, "per-token codes on the plan's A4 grid as the int8 GEMM's input -> (t, step); u8: codes + 64 as uint8",
        py::arg("x"), py::arg("u8") = false);
  m.def("dequant", &lowbit_dequant, "packed 2/4/8-bit rows -> fp32 (N, K)");
  m.def("half_mm", &half_mm, "x (M, K) fp32 . fp16 rows (N, K) -> (M, N) fp32, the rows widened in registers");
  m.def("int8_pack", &int8_pack, "int8 codes (N, K) -> int8_mm's panel layout (flat int8)");
  m.def("int8_mm", &int8_mm, "uint8 activations (passes * M, K) . packed int8 rows, with Int8Kernel's epilogue -> (M, N) fp32 (AVX-512 VNNI)",
        py::arg("u"), py::arg("packed"), py::arg("scale"), py::arg("wsum"), py::arg("step"), py::arg("bsum"),
        py::arg("passes"), py::arg("zero") = 64);
  m.def("threads_used", &lowbit_threads_used, "threads the extension's parallel loops run on");
}
