// exo::decode_attention: one decode step's attention for a batch of requests in one call.
// Request b's query (one position, every head) attends to the first lengths[b] positions of
// its own cache (keys[b], values[b]: float32 [n_kv, capacity, d]); query heads share key
// and value heads in groups (GQA). SDPA per request and layer costs ~27 us, most of it
// dispatch, and a batch of 4 makes that 120 calls a step; this is one call a layer,
// parallel over (request, head). Softmax in float32 with the running maximum subtracted.
// Built with qmm_vnni.cpp by exo/worker/engines/torch/vnni.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// e^x for x <= 0 (x - max of the scores), 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by
// a degree-6 polynomial (relative error ~2e-7), 2^n by scalef. Below -87 the result is 0.
inline __m512 exp_neg(__m512 x) {
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
void attend_head(const float* q, const float* k, const float* v, int64_t length, int64_t d,
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

at::Tensor decode_attention(const at::Tensor& q, at::TensorList keys, at::TensorList values,
                            c10::SymIntArrayRef lengths, double scale) {
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
      attend_head(qp + i * d, k, v, lens[b], d, s, scores.data(), op + i * d);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exo, lib) {
  lib.def(
      "decode_attention(Tensor q, Tensor[] keys, Tensor[] values, SymInt[] lengths, float scale)"
      " -> Tensor");
}

TORCH_LIBRARY_IMPL(exo, CPU, lib) { lib.impl("decode_attention", &decode_attention); }
