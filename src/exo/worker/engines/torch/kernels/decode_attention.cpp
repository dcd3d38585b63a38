// exo::decode_attention: one decode step's attention for a batch of requests in one call.
// Request b's query (one position, every head) attends to the first lengths[b] positions of
// its own cache (keys[b], values[b]: float32 [n_kv, capacity, d]); query heads share key
// and value heads in groups (GQA). SDPA per request and layer costs ~27 us, most of it
// dispatch, and a batch of 4 makes that 120 calls a step; this is one call a layer,
// parallel over (request, head). Softmax in float32 with the running maximum subtracted.
// AVX-512 where the CPU has it, else AVX2 (exo::decode_attention_avx2 forces it, for
// tests). Built with qmm.cpp by exo/worker/engines/torch/cpu_ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#define EXO_AVX2 __attribute__((target("avx2,fma,f16c")))
#define EXO_AVX512 __attribute__((target("avx512f,avx2,fma")))

namespace {

// e^x for x <= 0 (x - max of the scores), 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by
// a degree-6 polynomial (relative error ~2e-7), 2^n by scalef. Below -87 the result is 0.
EXO_AVX512 inline __m512 exp_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// out[0:d] = softmax(scale * K q) V over `length` positions; d a multiple of 16.
EXO_AVX512 void attend_head_avx512(const float* q, const float* k, const float* v, int64_t length, int64_t d,
                 float scale, float* scores, float* out) {
  const int64_t chunks = d / 16;
  __m512 qv[8];
  for (int64_t c = 0; c < chunks; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
  float best = -INFINITY;
  for (int64_t t = 0; t < length; t++) {
    const float* kt = k + t * d;
    __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kt));
    for (int64_t c = 1; c < chunks; c++) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(kt + 16 * c), acc);
    const float score = _mm512_reduce_add_ps(acc) * scale;
    scores[t] = score;
    best = score > best ? score : best;
  }
  __m512 total = _mm512_setzero_ps();
  const __m512 top = _mm512_set1_ps(best);
  int64_t t = 0;
  for (; t + 16 <= length; t += 16) {
    __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(scores + t), top));
    _mm512_storeu_ps(scores + t, e);
    total = _mm512_add_ps(total, e);
  }
  if (t < length) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (length - t)) - 1);
    __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + t), top));
    e = _mm512_maskz_mov_ps(tail, e);
    _mm512_mask_storeu_ps(scores + t, tail, e);
    total = _mm512_add_ps(total, e);
  }
  const float inv = 1.f / _mm512_reduce_add_ps(total);
  __m512 o[8];
  for (int64_t c = 0; c < chunks; c++) o[c] = _mm512_setzero_ps();
  for (t = 0; t < length; t++) {
    const __m512 p = _mm512_set1_ps(scores[t]);
    const float* vt = v + t * d;
    for (int64_t c = 0; c < chunks; c++) o[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vt + 16 * c), o[c]);
  }
  const __m512 norm = _mm512_set1_ps(inv);
  for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], norm));
}

// The same in 8 lanes: 2^n by building the float's exponent bits.
EXO_AVX2 inline __m256 exp_neg8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

EXO_AVX2 inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

EXO_AVX2 void attend_head_avx2(const float* q, const float* k, const float* v, int64_t length,
                               int64_t d, float scale, float* scores, float* out) {
  const int64_t chunks = d / 8;
  __m256 qv[16];
  for (int64_t c = 0; c < chunks; c++) qv[c] = _mm256_loadu_ps(q + 8 * c);
  float best = -INFINITY;
  for (int64_t t = 0; t < length; t++) {
    const float* kt = k + t * d;
    __m256 acc = _mm256_mul_ps(qv[0], _mm256_loadu_ps(kt));
    for (int64_t c = 1; c < chunks; c++) acc = _mm256_fmadd_ps(qv[c], _mm256_loadu_ps(kt + 8 * c), acc);
    const float score = hsum8(acc) * scale;
    scores[t] = score;
    best = score > best ? score : best;
  }
  // Pad to whole vectors with scores whose exp is 0 (the buffer has room).
  const int64_t padded = (length + 7) / 8 * 8;
  for (int64_t t = length; t < padded; t++) scores[t] = -INFINITY;
  __m256 total = _mm256_setzero_ps();
  const __m256 top = _mm256_set1_ps(best);
  for (int64_t t = 0; t < padded; t += 8) {
    __m256 e = exp_neg8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), top));
    _mm256_storeu_ps(scores + t, e);
    total = _mm256_add_ps(total, e);
  }
  const float inv = 1.f / hsum8(total);
  __m256 o[16];
  for (int64_t c = 0; c < chunks; c++) o[c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < length; t++) {
    const __m256 p = _mm256_set1_ps(scores[t]);
    const float* vt = v + t * d;
    for (int64_t c = 0; c < chunks; c++) o[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * c), o[c]);
  }
  const __m256 norm = _mm256_set1_ps(inv);
  for (int64_t c = 0; c < chunks; c++) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(o[c], norm));
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
}

at::Tensor attention_impl(const at::Tensor& q, at::TensorList keys, at::TensorList values,
                          c10::SymIntArrayRef lengths, double scale, bool avx512) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kFloat,
              "exo::decode_attention: q must be float32 [B, heads, 1, d]");
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3);
  TORCH_CHECK(d % 16 == 0 && d <= 128, "exo::decode_attention: head size ", d,
              " is not a multiple of 16 up to 128");
  TORCH_CHECK(static_cast<int64_t>(keys.size()) == B && static_cast<int64_t>(values.size()) == B &&
                  static_cast<int64_t>(lengths.size()) == B,
              "exo::decode_attention: one cache and length per request");
  const int64_t kv_heads = keys[0].size(0);
  TORCH_CHECK(kv_heads > 0 && H % kv_heads == 0, "exo::decode_attention: ", H,
              " query heads do not group over ", kv_heads, " key heads");
  std::vector<int64_t> lens(B);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; b++) {
    const at::Tensor& k = keys[b];
    const at::Tensor& v = values[b];
    lens[b] = lengths[b].expect_int();
    TORCH_CHECK(k.dim() == 3 && k.scalar_type() == at::kFloat && k.is_contiguous() &&
                    k.size(0) == kv_heads && k.size(2) == d && v.sizes() == k.sizes() &&
                    v.scalar_type() == at::kFloat && v.is_contiguous(),
                "exo::decode_attention: caches must be contiguous float32 [n_kv, capacity, d]");
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= k.size(1), "exo::decode_attention: length ",
                lens[b], " outside the cache's ", k.size(1), " positions");
    longest = std::max(longest, lens[b]);
  }
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({B, H, 1, d}, q.options());
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / kv_heads;
  const float s = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(longest + 16);
    for (int64_t i = i0; i < i1; i++) {
      const int64_t b = i / H, h = i % H, g = h / group;
      const int64_t capacity = keys[b].size(1);
      const float* k = keys[b].data_ptr<float>() + g * capacity * d;
      const float* v = values[b].data_ptr<float>() + g * capacity * d;
      if (avx512)
        attend_head_avx512(qp + i * d, k, v, lens[b], d, s, scores.data(), op + i * d);
      else
        attend_head_avx2(qp + i * d, k, v, lens[b], d, s, scores.data(), op + i * d);
    }
  });
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, at::TensorList keys, at::TensorList values,
                            c10::SymIntArrayRef lengths, double scale) {
  return attention_impl(q, keys, values, lengths, scale, has_avx512());
}

at::Tensor decode_attention_avx2(const at::Tensor& q, at::TensorList keys,
                                 at::TensorList values, c10::SymIntArrayRef lengths,
                                 double scale) {
  return attention_impl(q, keys, values, lengths, scale, false);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exo, lib) {
  lib.def(
      "decode_attention(Tensor q, Tensor[] keys, Tensor[] values, SymInt[] lengths, float scale)"
      " -> Tensor");
  lib.def(
      "decode_attention_avx2(Tensor q, Tensor[] keys, Tensor[] values, SymInt[] lengths, "
      "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(exo, CPU, lib) {
  lib.impl("decode_attention", &decode_attention);
  lib.impl("decode_attention_avx2", &decode_attention_avx2);
}
