// exo::qmm: y = x W^T for 4-bit or 8-bit groupwise weights and float32 activations.
// Activations are quantized per row and per group of 32 inputs to two int8 parts (see
// quantize_row); unsigned weight x signed activation products are summed in int32, four
// at a time: by vpdpbusd on AVX512-VNNI, by vpmaddubsw + vpmaddwd on AVX2 (chosen at run
// time; exo::qmm_avx2 forces the second, for tests; AVX2 takes 8-bit weights as q - 128).
// Each block of 16 output rows is read once for up to 4 rows of x, so a batch of 4 costs
// little more than one row (torch's int4 kernel dequantizes per row). Both variants do the
// same integer sums and the same float operations in the same order per output: their
// results are bitwise equal.
// Built at first use by exo/worker/engines/torch/cpu_ops.py; docs/torch_engine.md has
// the measurements and the accuracy.
//
// Weights, per group g of 32 inputs: w = d * q + m with q in 0..2^bits - 1.
//   w: uint8 [N / 16, G, L, 64], L = 4 for 4 bits, 8 for 8 bits: for one block of 16
//      output rows and group g, load i's lane j holds 4 bytes (one int32 word) for output
//      row 16 nb + j. 8 bits: byte b is q[., 32 g + 4 i + b]. 4 bits: byte b has
//      q[., 32 g + 4 i + b] in its low nibble and q[., 32 g + 16 + 4 i + b] in its high one.
//   d, m: float16 [N / 16, G, 16].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#define EXO_AVX2 __attribute__((target("avx2,fma,f16c")))
#define EXO_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kBlockRows = 16;
constexpr int kMaxRows = 4;

EXO_AVX2 inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

EXO_AVX2 inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

// 32 int32 (four vectors of 8) -> 32 int8 with saturation, in order.
EXO_AVX2 inline void store_int8(int8_t* out, __m256i a, __m256i b, __m256i c, __m256i d) {
  __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);  // per 128-bit lane
  __m256i abcd = _mm256_packs_epi16(ab, cd);
  // Lanes came out as a0 b0 c0 d0 | a1 b1 c1 d1 (4 values each): put them back in order.
  abcd = _mm256_permutevar8x32_epi32(abcd, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), abcd);
}

// One row, per group g of 32 inputs: x ~= s_g * (a1 + a2 / 128) with s_g = max|x| / 127,
// a1 = round(x / s_g) and a2 the rounded remainder in 1/128ths (|a2| <= 64): two int8
// parts give ~15 bits per activation, finer than bf16's 8 (one int8 part, llama.cpp's
// Q8_1, moved this model's logits ~3x more than bf16 did). sum_g is the float sum of the
// group's inputs (it multiplies the minimum m). AVX2 for both variants, so every CPU
// quantizes identically.
EXO_AVX2 void quantize_row(const float* x, int64_t groups, int8_t* a1, int8_t* a2, float* s,
                           float* sum, int32_t* isum) {
  const __m256 frac = _mm256_set1_ps(128.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t g = 0; g < groups; g++) {
    const float* v = x + g * kGroup;
    __m256 xs[4];
    for (int k = 0; k < 4; k++) xs[k] = _mm256_loadu_ps(v + 8 * k);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, xs[0]), _mm256_andnot_ps(sign, xs[1])),
                              _mm256_max_ps(_mm256_andnot_ps(sign, xs[2]), _mm256_andnot_ps(sign, xs[3])));
    float scale = hmax8(mx) / 127.f;
    __m256 inv = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
    __m256i whole[4], part[4];
    for (int k = 0; k < 4; k++) {
      __m256 t = _mm256_mul_ps(xs[k], inv);
      __m256 r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      whole[k] = _mm256_cvtps_epi32(r);
      part[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(t, r), frac));
    }
    store_int8(a1 + g * kGroup, whole[0], whole[1], whole[2], whole[3]);
    store_int8(a2 + g * kGroup, part[0], part[1], part[2], part[3]);
    // The group's activations as one integer, 128 * a1 + a2, summed (the clamped values
    // the products use): 8-bit weights on AVX2 multiply q - 128 and add 128 times this.
    // Only they read it (isum is null for every other call).
    if (isum) {
      int32_t total = 0;
      for (int64_t i = 0; i < kGroup; i++)
        total += 128 * a1[g * kGroup + i] + a2[g * kGroup + i];
      isum[g] = total;
    }
    s[g] = scale / 128.f;
    sum[g] = hsum8(_mm256_add_ps(_mm256_add_ps(xs[0], xs[1]), _mm256_add_ps(xs[2], xs[3])));
  }
}

// R rows of x against one block of 16 output rows, LOADS = 4 (4-bit) or 8 (8-bit) vectors
// a group. Row r's int8 parts are at a[r * a_stride] (whole units) and a[r * a_stride + K
// / 4] (1/128ths), as int32 words of 4 inputs.
template <int R, int LOADS>
EXO_AVX512 inline void block_avx512(const uint8_t* w, const uint16_t* d, const uint16_t* m, int64_t groups,
                  const int32_t* a, int64_t a_stride, const float* s, const float* sum,
                  const int32_t* /*isum: 8-bit weights are unsigned for vpdpbusd*/,
                  int64_t g_stride, float* y, int64_t y_stride) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const int64_t fine = groups * 8;  // K / 4 words
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    const uint8_t* blk = w + g * LOADS * 64;
    __m512i whole[R], part[R];
    for (int r = 0; r < R; r++) whole[r] = part[r] = _mm512_setzero_si512();
    for (int i = 0; i < LOADS; i++) {
      __m512i v = _mm512_loadu_si512(blk + 64 * i);
      if constexpr (LOADS == 8) {
        for (int r = 0; r < R; r++) {
          const int32_t* ar = a + r * a_stride + g * 8;
          whole[r] = _mm512_dpbusd_epi32(whole[r], v, _mm512_set1_epi32(ar[i]));
          part[r] = _mm512_dpbusd_epi32(part[r], v, _mm512_set1_epi32(ar[fine + i]));
        }
      } else {
        __m512i lo = _mm512_and_si512(v, low);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < R; r++) {
          const int32_t* ar = a + r * a_stride + g * 8;
          whole[r] = _mm512_dpbusd_epi32(whole[r], lo, _mm512_set1_epi32(ar[i]));
          whole[r] = _mm512_dpbusd_epi32(whole[r], hi, _mm512_set1_epi32(ar[4 + i]));
          part[r] = _mm512_dpbusd_epi32(part[r], lo, _mm512_set1_epi32(ar[fine + i]));
          part[r] = _mm512_dpbusd_epi32(part[r], hi, _mm512_set1_epi32(ar[fine + 4 + i]));
        }
      }
    }
    __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + g * 16)));
    __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + g * 16)));
    for (int r = 0; r < R; r++) {
      // 128 * whole + part: |whole| <= 32 * 255 * 127, so this stays inside int32.
      __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(whole[r], 7), part[r]);
      __m512 ds = _mm512_mul_ps(dv, _mm512_set1_ps(s[r * g_stride + g]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), ds, acc[r]);
      acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sum[r * g_stride + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * y_stride, acc[r]);
}

// The same for AVX2: 8 output rows per vector (the block's two halves one after the
// other); vpmaddubsw multiplies unsigned by signed bytes into int16 pairs, vpmaddwd with
// ones adds the pairs into int32. 4-bit weights as they are: |pair| <= 2 * 15 * 127, no
// saturation. 8-bit weights as q - 128 (signed; its sign moved onto the activation, so
// |q - 128| <= 128 stays unsigned and |pair| <= 2 * 128 * 127 < 2^15), with 128 times the
// group's activation sum added back (isum): the same integers as q times the activations.
template <int R, int LOADS>
EXO_AVX2 inline void block_avx2(const uint8_t* w, const uint16_t* d, const uint16_t* m,
                                int64_t groups, const int32_t* a, int64_t a_stride,
                                const float* s, const float* sum, const int32_t* isum,
                                int64_t g_stride, float* y, int64_t y_stride) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t fine = groups * 8;
  for (int half = 0; half < 2; half++) {
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
      const uint8_t* blk = w + g * LOADS * 64 + 32 * half;
      __m256i whole[R], part[R];
      for (int r = 0; r < R; r++) whole[r] = part[r] = _mm256_setzero_si256();
      for (int i = 0; i < LOADS; i++) {
        __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * i));
        if constexpr (LOADS == 8) {
          const __m256i q = _mm256_xor_si256(v, flip);  // q - 128 as int8
          const __m256i size = _mm256_abs_epi8(q);      // 0..128, read as unsigned
          for (int r = 0; r < R; r++) {
            const int32_t* ar = a + r * a_stride + g * 8;
            const __m256i aw = _mm256_sign_epi8(_mm256_set1_epi32(ar[i]), q);
            const __m256i ap = _mm256_sign_epi8(_mm256_set1_epi32(ar[fine + i]), q);
            whole[r] = _mm256_add_epi32(whole[r], _mm256_madd_epi16(_mm256_maddubs_epi16(size, aw), ones));
            part[r] = _mm256_add_epi32(part[r], _mm256_madd_epi16(_mm256_maddubs_epi16(size, ap), ones));
          }
        } else {
          const __m256i lo = _mm256_and_si256(v, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
          for (int r = 0; r < R; r++) {
            const int32_t* ar = a + r * a_stride + g * 8;
            __m256i w16 = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ar[i])),
                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ar[4 + i])));
            __m256i p16 = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ar[fine + i])),
                _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ar[fine + 4 + i])));
            whole[r] = _mm256_add_epi32(whole[r], _mm256_madd_epi16(w16, ones));
            part[r] = _mm256_add_epi32(part[r], _mm256_madd_epi16(p16, ones));
          }
        }
      }
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + g * 16 + 8 * half)));
      const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + g * 16 + 8 * half)));
      for (int r = 0; r < R; r++) {
        __m256i dot = _mm256_add_epi32(_mm256_slli_epi32(whole[r], 7), part[r]);
        if constexpr (LOADS == 8)
          dot = _mm256_add_epi32(dot, _mm256_set1_epi32(128 * isum[r * g_stride + g]));
        __m256 ds = _mm256_mul_ps(dv, _mm256_set1_ps(s[r * g_stride + g]));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), ds, acc[r]);
        acc[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sum[r * g_stride + g]), acc[r]);
      }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(y + r * y_stride + 8 * half, acc[r]);
  }
}

// Every chunk of rows reads the block again, from cache. Rows are independent: a row's
// result never depends on the batch it came in.
#define EXO_ROWS(NAME, BLOCK, ATTR)                                                            \
  template <int LOADS>                                                                         \
  ATTR void NAME(const uint8_t* w, const uint16_t* d, const uint16_t* m, int64_t groups,       \
                 const int32_t* a, int64_t a_stride, const float* s, const float* sum,         \
                 const int32_t* isum, int64_t M, int64_t N, int64_t nb, float* y) {           \
    const uint8_t* wb = w + nb * groups * LOADS * 64;                                          \
    const uint16_t* db = d + nb * groups * 16;                                                 \
    const uint16_t* mb = m + nb * groups * 16;                                                 \
    for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {                                             \
      const int32_t* ar = a + r0 * a_stride;                                                   \
      const float* sr = s + r0 * groups;                                                       \
      const float* ur = sum + r0 * groups;                                                     \
      const int32_t* ir = isum + r0 * groups;                                                  \
      float* yr = y + r0 * N + nb * kBlockRows;                                                \
      switch (std::min<int64_t>(kMaxRows, M - r0)) {                                           \
        case 1: BLOCK<1, LOADS>(wb, db, mb, groups, ar, a_stride, sr, ur, ir, groups, yr, N); break; \
        case 2: BLOCK<2, LOADS>(wb, db, mb, groups, ar, a_stride, sr, ur, ir, groups, yr, N); break; \
        case 3: BLOCK<3, LOADS>(wb, db, mb, groups, ar, a_stride, sr, ur, ir, groups, yr, N); break; \
        default: BLOCK<4, LOADS>(wb, db, mb, groups, ar, a_stride, sr, ur, ir, groups, yr, N); break; \
      }                                                                                        \
    }                                                                                          \
  }

EXO_ROWS(rows_avx512, block_avx512, EXO_AVX512)
EXO_ROWS(rows_avx2, block_avx2, EXO_AVX2)

bool has_avx512_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vnni");
  return yes;
}

at::Tensor qmm_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d,
                    const at::Tensor& m, bool avx512) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "exo::qmm: x must be contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kByte && w.is_contiguous() &&
                  (w.size(2) == 4 || w.size(2) == 8) && w.size(3) == 64,
              "exo::qmm: w must be packed uint8 [N / 16, K / 32, 4 or 8, 64]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf &&
                  d.is_contiguous() && m.is_contiguous() &&
                  d.numel() == w.size(0) * w.size(1) * 16 && m.numel() == d.numel(),
              "exo::qmm: d and m must be contiguous float16 [N / 16, K / 32, 16]");
  const int64_t M = x.size(0), K = x.size(1), groups = w.size(1), blocks = w.size(0);
  TORCH_CHECK(K == groups * kGroup, "exo::qmm: x has ", K, " inputs, w ", groups * kGroup);
  const int64_t N = blocks * kBlockRows;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  // Per row: K int8 whole units, then K int8 1/128ths; then the scales and sums.
  at::Tensor a = at::empty({M, 2 * K}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({2, M, groups}, x.options());
  at::Tensor sums = at::empty({M, groups}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  int8_t* ap = a.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  float* up = sp + M * groups;
  int32_t* ip = sums.data_ptr<int32_t>();
  const bool eight = w.size(2) == 8;
  const bool integer_sums = eight && !avx512;  // read by rows_avx2<8> only
  for (int64_t r = 0; r < M; r++)
    quantize_row(xp + r * K, groups, ap + r * 2 * K, ap + r * 2 * K + K, sp + r * groups,
                 up + r * groups, integer_sums ? ip + r * groups : nullptr);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  const int32_t* a32 = reinterpret_cast<const int32_t*>(ap);
  float* yp = y.data_ptr<float>();
  const int64_t a_stride = 2 * K / 4;
  // Small grains: a 576 x 576 matrix has 36 blocks and should still use every thread.
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; nb++) {
      if (avx512 && eight)
        rows_avx512<8>(wp, dp, mp, groups, a32, a_stride, sp, up, ip, M, N, nb, yp);
      else if (avx512)
        rows_avx512<4>(wp, dp, mp, groups, a32, a_stride, sp, up, ip, M, N, nb, yp);
      else if (eight)
        rows_avx2<8>(wp, dp, mp, groups, a32, a_stride, sp, up, ip, M, N, nb, yp);
      else
        rows_avx2<4>(wp, dp, mp, groups, a32, a_stride, sp, up, ip, M, N, nb, yp);
    }
  });
  return y;
}

at::Tensor qmm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d,
               const at::Tensor& m) {
  return qmm_impl(x, w, d, m, has_avx512_vnni());
}

at::Tensor qmm_avx2(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d,
                    const at::Tensor& m) {
  return qmm_impl(x, w, d, m, false);
}

}  // namespace

TORCH_LIBRARY(exo, lib) {
  lib.def("qmm(Tensor x, Tensor w, Tensor d, Tensor m) -> Tensor");
  lib.def("qmm_avx2(Tensor x, Tensor w, Tensor d, Tensor m) -> Tensor");
}

TORCH_LIBRARY_IMPL(exo, CPU, lib) {
  lib.impl("qmm", &qmm);
  lib.impl("qmm_avx2", &qmm_avx2);
}
