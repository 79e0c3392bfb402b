// CPU kernels for one-token decoding (x86-64, AVX2 + FMA + F16C), registered as the torch ops
// dsmr::half_linear and dsmr::decode_attention. Built on first use by dsmr/kernels.py.
//
// Why hand-written: a one-token step reads every weight and the whole key/value state once, and does
// little arithmetic on each byte. PyTorch's CPU float16 matrix-vector product converts and reads the
// weights at well under the core's bandwidth, and its attention kernels are made for many queries;
// these read float16 weights and keys/values once, widening them to float32 in registers.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

template <typename T>
inline float dot(const float* x, const T* w, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(w + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load8(w + i + 8), a1);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(w + i), a0);
  float s = hsum(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) s += x[i] * static_cast<float>(w[i]);
  return s;
}

// Weights are packed once (dsmr.kernels.pack_half): [out/8, in/8, 8, 8], block b, chunk c, row j holding
// w[8b + j, 8c : 8c + 8]. A block of eight output rows is then one sequential run of memory, which the
// hardware prefetcher streams at close to the core's read bandwidth; row by row it reached a third of that.
constexpr int kRows = 8;

// One block of eight rows against one lane: eight accumulators over the block's chunks.
template <typename T>
inline void block_dot(const float* x, const T* p, int64_t chunks, float* y) {
  __m256 a[kRows];
  for (int j = 0; j < kRows; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c, p += 8 * kRows) {
    const __m256 xv = _mm256_loadu_ps(x + 8 * c);
    for (int j = 0; j < kRows; ++j) a[j] = _mm256_fmadd_ps(xv, load8(p + 8 * j), a[j]);
  }
  for (int j = 0; j < kRows; ++j) y[j] = hsum(a[j]);
}

}  // namespace

// y = x @ w.T for float32 x [..., in] and packed float16 w (pack_half of [out, in]): float32 y [..., out].
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "dsmr::half_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.scalar_type() == at::kHalf,
              "dsmr::half_linear: float32 x and float16 weights, got ", x.scalar_type(), " and ", packed.scalar_type());
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kRows && packed.size(3) == 8 && packed.is_contiguous() &&
              out > 0 && out <= kRows * packed.size(0) && out > kRows * (packed.size(0) - 1),
              "dsmr::half_linear: weights not packed by pack_half for ", out, " outputs: ", packed.sizes());
  const int64_t chunks = packed.size(1), in = 8 * chunks, blocks = packed.size(0);
  TORCH_CHECK(x.size(-1) == in, "dsmr::half_linear: x [..., ", in, "] expected, got ", x.sizes());
  const at::Tensor xs = x.reshape({-1, in}).contiguous();
  const int64_t rows = xs.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  at::Tensor y = at::empty({rows, out}, x.options());
  const float* xp = xs.data_ptr<float>();
  const at::Half* wp = packed.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> wide(rows > 1 ? kRows * in : 0);
    float tmp[kRows];
    for (int64_t b = begin; b < end; ++b) {
      const at::Half* block = wp + b * kRows * in;
      const int64_t o = kRows * b, n = std::min<int64_t>(kRows, out - o);
      if (rows > 1) {  // several lanes: widen the block once, keep it in L1 for every lane
        for (int64_t i = 0; i < kRows * in; i += 8) _mm256_storeu_ps(wide.data() + i, load8(block + i));
      }
      for (int64_t r = 0; r < rows; ++r) {
        if (rows > 1) block_dot(xp + r * in, wide.data(), chunks, tmp);
        else block_dot(xp + r * in, block, chunks, tmp);
        for (int64_t j = 0; j < n; ++j) yp[r * out + o + j] = tmp[j];
      }
    }
  });
  return y.view(out_shape);
}

namespace {

// One query against n keys/values of one head: scores, softmax, weighted sum. DC = head dims / 8 is a
// compile-time constant so that the query and the output stay in registers; four keys are scored at once
// (independent sums). Keys whose mask is -inf (a decoder's unfilled slots) get no weight; groups of four
// such keys are not read at all.
template <typename T, int DC>
void attend_one(const float* q, const T* k, const T* v, const float* mask, int64_t n, float scale, float* out,
                float* scores) {
  constexpr int64_t d = 8 * DC;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  __m256 qv[DC];
  for (int c = 0; c < DC; ++c) qv[c] = _mm256_loadu_ps(q + 8 * c);
  float top = neg_inf;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    if (mask[j] == neg_inf && mask[j + 1] == neg_inf && mask[j + 2] == neg_inf && mask[j + 3] == neg_inf) {
      scores[j] = scores[j + 1] = scores[j + 2] = scores[j + 3] = neg_inf;
      continue;
    }
    const T* kj = k + j * d;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int c = 0; c < DC; ++c) {
      a0 = _mm256_fmadd_ps(qv[c], load8(kj + 8 * c), a0);
      a1 = _mm256_fmadd_ps(qv[c], load8(kj + d + 8 * c), a1);
      a2 = _mm256_fmadd_ps(qv[c], load8(kj + 2 * d + 8 * c), a2);
      a3 = _mm256_fmadd_ps(qv[c], load8(kj + 3 * d + 8 * c), a3);
    }
    const float s4[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (int u = 0; u < 4; ++u) {
      const float s = mask[j + u] == neg_inf ? neg_inf : s4[u] * scale + mask[j + u];
      scores[j + u] = s;
      top = s > top ? s : top;
    }
  }
  for (; j < n; ++j) {
    const float s = mask[j] == neg_inf ? neg_inf : dot(q, k + j * d, d) * scale + mask[j];
    scores[j] = s;
    top = s > top ? s : top;
  }
  if (top == neg_inf) {  // every key masked: zeros, as PyTorch's SDPA gives for such a row
    for (int64_t i = 0; i < d; ++i) out[i] = 0.0f;
    return;
  }
  __m256 acc[DC];
  for (int c = 0; c < DC; ++c) acc[c] = _mm256_setzero_ps();
  float total = 0.0f;
  for (j = 0; j < n; ++j) {
    if (scores[j] == neg_inf) continue;
    const float p = std::exp(scores[j] - top);
    total += p;
    const __m256 pv = _mm256_set1_ps(p);
    const T* vj = v + j * d;
    for (int c = 0; c < DC; ++c) acc[c] = _mm256_fmadd_ps(pv, load8(vj + 8 * c), acc[c]);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / total);
  for (int c = 0; c < DC; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], inv));
}

// Any other head size: the same computation, one key at a time, the output accumulated in memory.
template <typename T>
void attend_one_any(const float* q, const T* k, const T* v, const float* mask, int64_t n, int64_t d, float scale,
                    float* out, float* scores) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float top = neg_inf;
  for (int64_t j = 0; j < n; ++j) {
    const float s = mask[j] == neg_inf ? neg_inf : dot(q, k + j * d, d) * scale + mask[j];
    scores[j] = s;
    top = s > top ? s : top;
  }
  for (int64_t i = 0; i < d; ++i) out[i] = 0.0f;
  if (top == neg_inf) return;  // every key masked: zeros, as in attend_one
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    if (scores[j] == neg_inf) continue;
    const float p = std::exp(scores[j] - top);
    total += p;
    for (int64_t i = 0; i < d; ++i) out[i] += p * static_cast<float>(v[j * d + i]);
  }
  for (int64_t i = 0; i < d; ++i) out[i] /= total;
}

template <typename T>
void attend_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, float scale,
                at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), n = k.size(2), d = q.size(3);
  const float* qp = q.data_ptr<float>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const float* mp = mask.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t mb = mask.stride(0), mh = mask.stride(1);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(n);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float *qh = qp + bh * d, *mrow = mp + b * mb + h * mh;
      const T *kh = kp + bh * n * d, *vh = vp + bh * n * d;
      float* oh = op + bh * d;
      switch (d) {
        case 16: attend_one<T, 2>(qh, kh, vh, mrow, n, scale, oh, scores.data()); break;
        case 32: attend_one<T, 4>(qh, kh, vh, mrow, n, scale, oh, scores.data()); break;
        case 64: attend_one<T, 8>(qh, kh, vh, mrow, n, scale, oh, scores.data()); break;
        case 128: attend_one<T, 16>(qh, kh, vh, mrow, n, scale, oh, scores.data()); break;
        default: attend_one_any(qh, kh, vh, mrow, n, d, scale, oh, scores.data());
      }
    }
  });
}

}  // namespace

// softmax(q k^T * scale + mask) v for one query per lane and head: q [B, H, 1, D] float32, k/v [B, H, N, D]
// float16 or float32, mask additive float32 broadcastable to [B, H, 1, N]. Returns float32 [B, H, 1, D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && mask.device().is_cpu(),
              "dsmr::decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "dsmr::decode_attention: one query per lane and head, got q ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
              k.size(3) == q.size(3), "dsmr::decode_attention: k, v ", k.sizes(), " do not match q ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && mask.scalar_type() == at::kFloat && k.scalar_type() == v.scalar_type() &&
              (k.scalar_type() == at::kHalf || k.scalar_type() == at::kFloat),
              "dsmr::decode_attention: float32 q and mask, float16 or float32 k and v");
  const int64_t B = q.size(0), H = q.size(1), n = k.size(2);
  const at::Tensor qs = q.contiguous(), ks = k.contiguous(), vs = v.contiguous();
  at::Tensor ms = mask.expand({B, H, 1, n});
  if (ms.stride(3) != 1) ms = ms.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  if (k.scalar_type() == at::kHalf) {
    attend_all<at::Half>(qs, ks, vs, ms, static_cast<float>(scale), out);
  } else {
    attend_all<float>(qs, ks, vs, ms, static_cast<float>(scale), out);
  }
  return out;
}

TORCH_LIBRARY(dsmr, m) {
  m.def("half_linear(Tensor x, Tensor packed, int out) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsmr, CPU, m) {
  m.impl("half_linear", &half_linear);
  m.impl("decode_attention", &decode_attention);
}
