// exo::qmm: y = x W^T for 4-bit or 8-bit groupwise weights and float32 activations, on
// AVX512-VNNI. Activations are quantized per row and per group of 32 inputs to two int8
// parts (see quantize_row); unsigned weight x signed activation products are summed four
// at a time by vpdpbusd. Each block of 16 output rows is read once for up to 4 rows of x,
// so a batch of 4 costs little more than one row (torch's int4 kernel dequantizes per row).
// Built at first use by exo/worker/engines/torch/vnni.py; docs/torch_engine.md has the
// measurements and the accuracy.
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

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kBlockRows = 16;
constexpr int kMaxRows = 4;

// One row, per group g of 32 inputs: x ~= s_g * (a1 + a2 / 128) with s_g = max|x| / 127,
// a1 = round(x / s_g) and a2 the rounded remainder in 1/128ths (|a2| <= 64): two int8
// parts give ~15 bits per activation, finer than bf16's 8 (one int8 part, llama.cpp's
// Q8_1, moved this model's logits ~3x more than bf16 did). sum_g is the exact float sum
// of the group's inputs (it multiplies the minimum m).
void quantize_row(const float* x, int64_t groups, int8_t* a1, int8_t* a2, float* s, float* sum) {
  const __m512 frac = _mm512_set1_ps(128.f);
  for (int64_t g = 0; g < groups; g++) {
    const float* v = x + g * kGroup;
    __m512 x0 = _mm512_loadu_ps(v), x1 = _mm512_loadu_ps(v + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    float scale = amax / 127.f;
    __m512 inv = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
    __m512 t0 = _mm512_mul_ps(x0, inv), t1 = _mm512_mul_ps(x1, inv);
    __m512 r0 = _mm512_roundscale_ps(t0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r1 = _mm512_roundscale_ps(t1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i i0 = _mm512_cvtps_epi32(r0), i1 = _mm512_cvtps_epi32(r1);
    __m512i f0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(t0, r0), frac));
    __m512i f1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(t1, r1), frac));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a1 + g * kGroup), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a1 + g * kGroup + 16), _mm512_cvtsepi32_epi8(i1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a2 + g * kGroup), _mm512_cvtsepi32_epi8(f0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a2 + g * kGroup + 16), _mm512_cvtsepi32_epi8(f1));
    s[g] = scale / 128.f;
    sum[g] = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
  }
}

// R rows of x against one block of 16 output rows, LOADS = 4 (4-bit) or 8 (8-bit) vectors
// a group. Row r's int8 parts are at a[r * a_stride] (whole units) and a[r * a_stride + K
// / 4] (1/128ths), as int32 words of 4 inputs.
template <int R, int LOADS>
inline void block(const uint8_t* w, const uint16_t* d, const uint16_t* m, int64_t groups,
                  const int32_t* a, int64_t a_stride, const float* s, const float* sum,
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

template <int LOADS>
void rows(const uint8_t* w, const uint16_t* d, const uint16_t* m, int64_t groups,
          const int32_t* a, int64_t a_stride, const float* s, const float* sum, int64_t M,
          int64_t N, int64_t nb, float* y) {
  const uint8_t* wb = w + nb * groups * LOADS * 64;
  const uint16_t* db = d + nb * groups * 16;
  const uint16_t* mb = m + nb * groups * 16;
  // Every chunk of rows reads this block again, from cache. Rows are independent: a row's
  // result never depends on the batch it came in.
  for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
    const int32_t* ar = a + r0 * a_stride;
    const float* sr = s + r0 * groups;
    const float* ur = sum + r0 * groups;
    float* yr = y + r0 * N + nb * kBlockRows;
    switch (std::min<int64_t>(kMaxRows, M - r0)) {
      case 1: block<1, LOADS>(wb, db, mb, groups, ar, a_stride, sr, ur, groups, yr, N); break;
      case 2: block<2, LOADS>(wb, db, mb, groups, ar, a_stride, sr, ur, groups, yr, N); break;
      case 3: block<3, LOADS>(wb, db, mb, groups, ar, a_stride, sr, ur, groups, yr, N); break;
      default: block<4, LOADS>(wb, db, mb, groups, ar, a_stride, sr, ur, groups, yr, N); break;
    }
  }
}

at::Tensor qmm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& d,
               const at::Tensor& m) {
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
  const float* xp = x.data_ptr<float>();
  int8_t* ap = a.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  float* up = sp + M * groups;
  for (int64_t r = 0; r < M; r++)
    quantize_row(xp + r * K, groups, ap + r * 2 * K, ap + r * 2 * K + K, sp + r * groups,
                 up + r * groups);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* mp = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  const int32_t* a32 = reinterpret_cast<const int32_t*>(ap);
  float* yp = y.data_ptr<float>();
  const int64_t a_stride = 2 * K / 4;
  const bool eight = w.size(2) == 8;
  // Small grains: a 576 x 576 matrix has 36 blocks and should still use every thread.
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; nb++) {
      if (eight)
        rows<8>(wp, dp, mp, groups, a32, a_stride, sp, up, M, N, nb, yp);
      else
        rows<4>(wp, dp, mp, groups, a32, a_stride, sp, up, M, N, nb, yp);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(exo, lib) { lib.def("qmm(Tensor x, Tensor w, Tensor d, Tensor m) -> Tensor"); }

TORCH_LIBRARY_IMPL(exo, CPU, lib) { lib.impl("qmm", &qmm); }
