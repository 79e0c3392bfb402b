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
#include <type_traits>
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


// y = x @ w.T for `rows` float32 rows x [rows, in] and a weight packed by pack_half (`blocks` blocks of eight
// output rows, `out` of them real): y [rows, out]. Blocks are shared between threads.
void packed_linear(const float* xp, int64_t rows, const at::Half* wp, int64_t blocks, int64_t in, int64_t out,
                   float* yp) {
  const int64_t chunks = in / 8;
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
}

void check_packed(const at::Tensor& packed, int64_t out, const char* op) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kHalf && packed.dim() == 4 &&
              packed.size(2) == kRows && packed.size(3) == 8 && packed.is_contiguous() && out > 0 &&
              out <= kRows * packed.size(0) && out > kRows * (packed.size(0) - 1),
              op, ": float16 weights packed by pack_half for ", out, " outputs expected, got ", packed.scalar_type(),
              " ", packed.sizes());
}

}  // namespace

// y = x @ w.T for float32 x [..., in] and packed float16 w (pack_half of [out, in]): float32 y [..., out].
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "dsmr::half_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "dsmr::half_linear: float32 x expected, got ", x.scalar_type());
  check_packed(packed, out, "dsmr::half_linear");
  const int64_t in = 8 * packed.size(1);
  TORCH_CHECK(x.size(-1) == in, "dsmr::half_linear: x [..., ", in, "] expected, got ", x.sizes());
  const at::Tensor xs = x.reshape({-1, in}).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  at::Tensor y = at::empty({xs.size(0), out}, x.options());
  packed_linear(xs.data_ptr<float>(), xs.size(0), packed.data_ptr<at::Half>(), packed.size(0), in, out,
                y.data_ptr<float>());
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

namespace {

// exp of eight floats (Cephes' polynomial, as in the common AVX "mathfun" code): ~1 ulp; exactly 0 below
// -87.3, where float32's exp underflows anyway.
inline __m256 exp8(__m256 x) {
  const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), small);
}

// x * Phi(x), nn.GELU's exact form, with erf as PyTorch's AVX2 kernel computes it (Abramowitz-Stegun 7.1.26).
inline __m256 gelu8(__m256 x) {
  const __m256 neg_zero = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 sign = _mm256_and_ps(neg_zero, z), a = _mm256_xor_ps(sign, z);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
  __m256 r = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t, _mm256_set1_ps(-1.453152027f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(1.421413741f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(-0.284496736f));
  r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(0.254829592f));
  const __m256 e = exp8(_mm256_xor_ps(neg_zero, _mm256_mul_ps(z, z)));
  const __m256 erf = _mm256_xor_ps(sign, _mm256_fnmadd_ps(_mm256_mul_ps(e, t), r, one));
  return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(erf, one));
}

// LayerNorm (with `bias`) or RMSNorm (bias null) of one row of n values.
void norm_row(const float* x, const float* weight, const float* bias, int64_t n, bool rms, float eps, float* y) {
  double mean = 0.0, sq = 0.0;
  if (!rms) {
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= n;
  }
  for (int64_t i = 0; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
  const float inv = static_cast<float>(1.0 / std::sqrt(sq / n + eps)), m = static_cast<float>(mean);
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * inv * weight[i] + (bias ? bias[i] : 0.0f);
}

// Rotate-half RoPE of one head's first r dims in place; cos/sin hold r values (two copies of r/2 angles).
void rotate(float* x, const float* cos, const float* sin, int64_t r) {
  const int64_t half = r / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

template <typename T>
inline void store(T* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, at::Half>) {  // saturate at float16's range, as generate._storable does
      dst[i] = static_cast<at::Half>(std::min(std::max(src[i], -65504.0f), 65504.0f));
    } else {
      dst[i] = src[i];
    }
  }
}

// One query over the first n keys/values of one head, every one of them valid; the first n_memory get
// the additive `bias` (a memory gate). scores: n floats of scratch.
template <typename T>
void attend_prefix(const float* q, const T* k, const T* v, int64_t n, int64_t d, int64_t n_memory, float bias,
                   float scale, float* out, float* scores) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    const float s = dot(q, k + j * d, d) * scale + (j < n_memory ? bias : 0.0f);
    scores[j] = s;
    top = s > top ? s : top;
  }
  int64_t j = 0;
  __m256 sum8 = _mm256_setzero_ps();
  const __m256 top8 = _mm256_set1_ps(top);
  for (; j + 8 <= n; j += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + j), top8));
    _mm256_storeu_ps(scores + j, p);
    sum8 = _mm256_add_ps(sum8, p);
  }
  float total = hsum(sum8);
  for (; j < n; ++j) total += (scores[j] = std::exp(scores[j] - top));
  for (int64_t i = 0; i < d; ++i) out[i] = 0.0f;
  if (d % 8 == 0) {
    for (j = 0; j < n; ++j) {
      const __m256 p = _mm256_set1_ps(scores[j]);
      const T* vj = v + j * d;
      for (int64_t i = 0; i < d; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(p, load8(vj + i), _mm256_loadu_ps(out + i)));
    }
  } else {
    for (j = 0; j < n; ++j)
      for (int64_t i = 0; i < d; ++i) out[i] += scores[j] * static_cast<float>(v[j * d + i]);
  }
  const float inv = 1.0f / total;
  for (int64_t i = 0; i < d; ++i) out[i] *= inv;
}

constexpr int64_t kLayerParams = 9;  // norm1 weight, bias; qkv, out; norm2 weight, bias; fc1, fc2; gate bias

int64_t packed_out(const at::Tensor& packed, int64_t out, const char* what) {
  check_packed(packed, out, what);
  return out;
}

template <typename T>
void step_layers(const at::Tensor& ids, const at::Tensor& embedding, at::TensorList params, at::TensorList keys,
                 at::TensorList values, at::IntArrayRef memory_fill, int64_t t, const float* cos, const float* sin,
                 int64_t rot, int64_t H, int64_t ff, bool rms, float eps, float* logits) {
  const int64_t B = ids.size(0), d = embedding.size(1), V = embedding.size(0), L = keys.size();
  const int64_t D = keys[0].size(3), A = H * D, inner = std::max<int64_t>(3 * A, ff);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<float> x(B * d), hn(B * d), wide(B * inner), att(B * A), add(B * d);
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* table = embedding.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(id[b] >= 0 && id[b] < V, "dsmr::decode_step: token id ", id[b], " outside the vocabulary of ", V);
    std::copy(table + id[b] * d, table + (id[b] + 1) * d, x.data() + b * d);
  }
  auto norm = [&](const at::Tensor& w, const at::Tensor& bias) {
    for (int64_t b = 0; b < B; ++b)
      norm_row(x.data() + b * d, w.data_ptr<float>(), bias.numel() ? bias.data_ptr<float>() : nullptr, d, rms, eps,
               hn.data() + b * d);
  };
  auto linear = [&](const float* in, int64_t n_in, const at::Tensor& packed, int64_t out, float* y) {
    packed_linear(in, B, packed.data_ptr<at::Half>(), packed.size(0), n_in, out, y);
  };
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* p = params.data() + l * kLayerParams;
    norm(p[0], p[1]);
    linear(hn.data(), d, p[2], 3 * A, wide.data());
    const int64_t slot = memory_fill[l] + t, N = keys[l].size(2);
    T* kp = keys[l].data_ptr<T>();
    T* vp = values[l].data_ptr<T>();
    const float* gate = p[8].numel() ? p[8].data_ptr<float>() : nullptr;
    for (int64_t b = 0; b < B; ++b) {  // rotate q and k, store k and v at the slot
      float* row = wide.data() + b * 3 * A;
      for (int64_t h = 0; h < H; ++h) {
        rotate(row + h * D, cos, sin, rot);
        rotate(row + A + h * D, cos, sin, rot);
        store(kp + ((b * H + h) * N + slot) * D, row + A + h * D, D);
        store(vp + ((b * H + h) * N + slot) * D, row + 2 * A + h * D, D);
      }
    }
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(slot + 1);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const float bias = gate ? gate[p[8].numel() == 1 ? 0 : h] : 0.0f;
        attend_prefix(wide.data() + b * 3 * A + h * D, kp + bh * N * D, vp + bh * N * D, slot + 1, D,
                      memory_fill[l], bias, scale, att.data() + b * A + h * D, scores.data());
      }
    });
    linear(att.data(), A, p[3], d, add.data());
    for (int64_t i = 0; i < B * d; ++i) x[i] += add[i];
    norm(p[4], p[5]);
    linear(hn.data(), d, p[6], ff, wide.data());
    int64_t i = 0;
    for (; i + 8 <= B * ff; i += 8) _mm256_storeu_ps(wide.data() + i, gelu8(_mm256_loadu_ps(wide.data() + i)));
    for (; i < B * ff; ++i) wide[i] = 0.5f * wide[i] * (1.0f + std::erf(wide[i] * 0.70710678118654752f));
    linear(wide.data(), ff, p[7], d, add.data());
    for (int64_t j = 0; j < B * d; ++j) x[j] += add[j];
  }
  const at::Tensor* f = params.data() + L * kLayerParams;
  norm(f[0], f[1]);
  linear(hn.data(), d, f[2], V, logits);
}

}  // namespace

// The whole one-token step of a DSMR model with float16 packed weights: embedding, every block (norm, qkv,
// RoPE, key/value written at slot memory_fill[l] + t of its buffer, attention over the filled slots with the
// gate bias on the memory ones, output projection, norm, GELU MLP), final norm and head. One call instead of
// ~100 PyTorch operations: on a CPU a one-token step is otherwise mostly per-operation cost.
// params: per layer (norm1 w, b, qkv, out, norm2 w, b, fc1, fc2, gate bias [0|1|H]), then final norm w, b and
// the head; b is empty for RMSNorm. keys/values [B, H, h_l + T, D] float16 or float32, written in place.
// cos/sin: the segment's rotary table [.., T, r] float32. Returns float32 logits [B, vocab].
at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& embedding, at::TensorList params, at::TensorList keys,
                       at::TensorList values, at::IntArrayRef memory_fill, int64_t t, const at::Tensor& cos,
                       const at::Tensor& sin, int64_t n_heads, int64_t ff_dim, bool rmsnorm, double eps) {
  const int64_t L = keys.size();
  TORCH_CHECK(L > 0 && values.size() == keys.size() && memory_fill.size() == keys.size() &&
              static_cast<int64_t>(params.size()) == L * kLayerParams + 3,
              "dsmr::decode_step: ", L, " layers of keys, ", values.size(), " of values, ", memory_fill.size(),
              " fills and ", params.size(), " parameters (", kLayerParams, " per layer + 3 expected)");
  TORCH_CHECK(ids.device().is_cpu() && ids.dim() == 1 && ids.scalar_type() == at::kLong,
              "dsmr::decode_step: ids [B] int64 on the CPU, got ", ids.scalar_type(), " ", ids.sizes());
  const at::Tensor id = ids.contiguous();
  TORCH_CHECK(embedding.scalar_type() == at::kFloat && embedding.dim() == 2 && embedding.is_contiguous() &&
              embedding.size(1) % 8 == 0, "dsmr::decode_step: a contiguous float32 embedding [vocab, d], d % 8 == 0");
  const int64_t B = ids.size(0), d = embedding.size(1), V = embedding.size(0);
  const at::ScalarType state = keys[0].scalar_type();
  TORCH_CHECK(state == at::kHalf || state == at::kFloat, "dsmr::decode_step: a float16 or float32 state");
  const int64_t D = keys[0].size(3), A = n_heads * D;
  for (int64_t l = 0; l < L; ++l) {
    for (const at::Tensor& buf : {keys[l], values[l]})
      TORCH_CHECK(buf.device().is_cpu() && buf.scalar_type() == state && buf.is_contiguous() && buf.dim() == 4 &&
                  buf.size(0) == B && buf.size(1) == n_heads && buf.size(3) == D,
                  "dsmr::decode_step: layer ", l, " state ", buf.scalar_type(), " ", buf.sizes(), ": contiguous ",
                  state, " [", B, ", ", n_heads, ", N, ", D, "] expected, like layer 0's keys");
    TORCH_CHECK(memory_fill[l] >= 0 && t >= 0 && memory_fill[l] + t < keys[l].size(2),
                "dsmr::decode_step: slot ", memory_fill[l] + t, " outside layer ", l, "'s buffer of ", keys[l].size(2));
    const at::Tensor* p = params.data() + l * kLayerParams;
    packed_out(p[2], 3 * A, "dsmr::decode_step qkv");
    packed_out(p[3], d, "dsmr::decode_step out");
    packed_out(p[6], ff_dim, "dsmr::decode_step fc1");
    packed_out(p[7], d, "dsmr::decode_step fc2");
    TORCH_CHECK(p[2].size(1) * 8 == d && p[3].size(1) * 8 == A && p[6].size(1) * 8 == d && p[7].size(1) * 8 == ff_dim,
                "dsmr::decode_step: layer ", l, " weights do not match d_model ", d, ", attention ", A, ", ff ", ff_dim);
    for (int i : {0, 1, 4, 5, 8})  // norm weights [d], biases [d] (LayerNorm) or empty (RMSNorm), gate bias
      TORCH_CHECK(p[i].device().is_cpu() && p[i].scalar_type() == at::kFloat && p[i].is_contiguous() &&
                  (i == 8 || p[i].numel() == d || (p[i].numel() == 0 && (i == 1 || i == 5))),
                  "dsmr::decode_step: layer ", l, " norm or gate parameter ", i, " is not float32 [", d, "]: ",
                  p[i].scalar_type(), " ", p[i].sizes());
    TORCH_CHECK(p[8].numel() == 0 || p[8].numel() == 1 || p[8].numel() == n_heads, "dsmr::decode_step: gate bias of ",
                p[8].numel(), " values for ", n_heads, " heads");
  }
  const at::Tensor* f = params.data() + L * kLayerParams;
  packed_out(f[2], V, "dsmr::decode_step head");
  TORCH_CHECK(f[2].size(1) * 8 == d && f[0].numel() == d && (f[1].numel() == d || f[1].numel() == 0),
              "dsmr::decode_step: final norm or head does not match d_model ", d);
  const int64_t rot = cos.size(-1);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.sizes() == cos.sizes() && sin.scalar_type() == at::kFloat &&
              cos.is_contiguous() && sin.is_contiguous() && rot % 2 == 0 && rot <= D && t < cos.numel() / rot,
              "dsmr::decode_step: rotary tables [.., T, r <= ", D, "] float32 with row ", t, " expected, got ",
              cos.sizes());
  at::Tensor logits = at::empty({B, V}, embedding.options());
  const float *c = cos.data_ptr<float>() + t * rot, *s = sin.data_ptr<float>() + t * rot;
  if (state == at::kHalf) {
    step_layers<at::Half>(id, embedding, params, keys, values, memory_fill, t, c, s, rot, n_heads, ff_dim, rmsnorm,
                          static_cast<float>(eps), logits.data_ptr<float>());
  } else {
    step_layers<float>(id, embedding, params, keys, values, memory_fill, t, c, s, rot, n_heads, ff_dim, rmsnorm,
                       static_cast<float>(eps), logits.data_ptr<float>());
  }
  return logits;
}

TORCH_LIBRARY(dsmr, m) {
  m.def("half_linear(Tensor x, Tensor packed, int out) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("decode_step(Tensor ids, Tensor embedding, Tensor[] params, Tensor(a!)[] keys, Tensor(b!)[] values, "
        "int[] memory_fill, int t, Tensor cos, Tensor sin, int n_heads, int ff_dim, bool rmsnorm, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsmr, CPU, m) {
  m.impl("half_linear", &half_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_step", &decode_step);
}
