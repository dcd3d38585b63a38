// Prototype, not wired into the engine: an int4-weight x int8-activation matmul on
// AVX512-VNNI (vpdpbusd), the scheme llama.cpp uses for Q4_1 x Q8_1. Measured against
// torch's int4 CPU kernel by bench/bench_vnni_kernel.py; findings in docs/torch_engine.md.
//
// Weights: per group of 32 inputs, w = d * q + m with q in 0..15. Block layout for 16
// output rows and one group: 4 x 64 bytes; in load i, lane j's 4 bytes hold, for
// b = 0..3, q[n_j, 4i + b] in the low nibble and q[n_j, 16 + 4i + b] in the high one.
// Activations: per row and group, a = round(x / s), s = max|x| / 127, and the exact
// float sum of x (for the m term). Up to 4 rows.
#include <torch/extension.h>
#include <immintrin.h>
#include <ATen/Parallel.h>

// x: [M, K] float32; returns a8 [M, K] int8, s [M, K/32] float, asum [M, K/32] float
std::vector<torch::Tensor> quant_act(torch::Tensor x) {
  int64_t M = x.size(0), K = x.size(1), G = K / 32;
  auto a = torch::empty({M, K}, torch::kInt8);
  auto s = torch::empty({M, G}, torch::kFloat32);
  auto sum = torch::empty({M, G}, torch::kFloat32);
  const float* xp = x.data_ptr<float>();
  int8_t* ap = a.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>(); float* up = sum.data_ptr<float>();
  for (int64_t m = 0; m < M; m++) for (int64_t g = 0; g < G; g++) {
    const float* v = xp + m * K + g * 32;
    __m512 x0 = _mm512_loadu_ps(v), x1 = _mm512_loadu_ps(v + 16);
    __m512 mx = _mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1));
    float amax = _mm512_reduce_max_ps(mx);
    float sc = amax / 127.f; float inv = sc > 0 ? 1.f / sc : 0.f;
    __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(inv)));
    __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(inv)));
    _mm_storeu_si128((__m128i*)(ap + m * K + g * 32), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128((__m128i*)(ap + m * K + g * 32 + 16), _mm512_cvtsepi32_epi8(i1));
    sp[m * G + g] = sc;
    up[m * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
  }
  return {a, s, sum};
}

// w: [N/16, G, 4, 64] uint8 packed (see layout), d, mn: [N/16, G, 16] float
torch::Tensor vnni_mm(torch::Tensor x, torch::Tensor w, torch::Tensor d, torch::Tensor mn) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= 4 && x.size(1) % 32 == 0, "x: [M <= 4, K % 32 == 0]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32");
  TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous(), "w: packed uint8");
  TORCH_CHECK(w.size(1) * 32 == x.size(1), "w: groups do not match x");
  auto q = quant_act(x);
  auto a = q[0]; auto s = q[1]; auto asum = q[2];
  int64_t M = x.size(0), K = x.size(1), G = K / 32, NB = w.size(0);
  auto y = torch::empty({M, NB * 16}, torch::kFloat32);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* dp = d.data_ptr<float>(); const float* mp = mn.data_ptr<float>();
  const int32_t* a32 = (const int32_t*)a.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>(); const float* up = asum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, NB, 8, [&](int64_t b0, int64_t b1) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t nb = b0; nb < b1; nb++) {
      __m512 acc[4];
      for (int r = 0; r < 4; r++) acc[r] = _mm512_setzero_ps();
      for (int64_t g = 0; g < G; g++) {
        const uint8_t* blk = wp + ((nb * G + g) * 256);
        __m512i ai[4];
        for (int r = 0; r < 4; r++) ai[r] = _mm512_setzero_si512();
        for (int i = 0; i < 4; i++) {
          __m512i v = _mm512_loadu_si512(blk + 64 * i);
          __m512i lo = _mm512_and_si512(v, low);
          __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          for (int r = 0; r < M && r < 4; r++) {
            const int32_t* ar = a32 + r * (K / 4) + g * 8;
            ai[r] = _mm512_dpbusd_epi32(ai[r], lo, _mm512_set1_epi32(ar[i]));
            ai[r] = _mm512_dpbusd_epi32(ai[r], hi, _mm512_set1_epi32(ar[4 + i]));
          }
        }
        __m512 dv = _mm512_loadu_ps(dp + (nb * G + g) * 16);
        __m512 mv = _mm512_loadu_ps(mp + (nb * G + g) * 16);
        for (int r = 0; r < M && r < 4; r++) {
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r]), _mm512_mul_ps(dv, _mm512_set1_ps(sp[r * G + g])), acc[r]);
          acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(up[r * G + g]), acc[r]);
        }
      }
      for (int r = 0; r < M && r < 4; r++) _mm512_storeu_ps(yp + r * NB * 16 + nb * 16, acc[r]);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_act", &quant_act, "per-32 int8 quantization of float32 rows");
  m.def("vnni_mm", &vnni_mm, "x [M<=4, K] @ int4 weights^T, int8 activations, VNNI");
}
