// CPU kernels for one-token decoding (x86-64, AVX2 + FMA + F16C), registered as the torch ops
// dsmr::decode_step (the whole step), dsmr::half_linear, dsmr::int8_linear and dsmr::decode_attention.
// Built on first use by dsmr/kernels.py.
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
#include <string>
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
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

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


// NL lanes against rows j0..j0+3 of a block widened to float32 (`wide`, pack_half's layout): twelve
// accumulators at most, each weight vector loaded once for all NL lanes.
template <int NL>
inline void lanes_dot(const float* x, int64_t in, const float* wide, int64_t chunks, int j0, float out[NL][4]) {
  __m256 acc[NL][4];
  for (int l = 0; l < NL; ++l)
    for (int r = 0; r < 4; ++r) acc[l][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < chunks; ++c) {
    __m256 xv[NL];
    for (int l = 0; l < NL; ++l) xv[l] = _mm256_loadu_ps(x + l * in + 8 * c);
    const float* w = wide + c * 8 * kRows + 8 * j0;
    for (int r = 0; r < 4; ++r) {
      const __m256 wv = _mm256_loadu_ps(w + 8 * r);
      for (int l = 0; l < NL; ++l) acc[l][r] = _mm256_fmadd_ps(xv[l], wv, acc[l][r]);
    }
  }
  for (int l = 0; l < NL; ++l)
    for (int r = 0; r < 4; ++r) out[l][r] = hsum(acc[l][r]);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// int8 weights are packed by sixteens ([out/8, in/16, 8, 16]): one lane's activations, rounded to int16
// (`xq`), times a block's int8 rows sixteen at a time with integer multiply-adds (vpmaddwd), twice the
// weights per instruction of a float multiply-add after widening; exact int32 sums.
inline void block_dot_int8(const int16_t* xq, const int8_t* p, int64_t chunks16, int32_t* y) {
  __m256i a[kRows];
  for (int j = 0; j < kRows; ++j) a[j] = _mm256_setzero_si256();
  for (int64_t c = 0; c < chunks16; ++c, p += 16 * kRows) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 16 * c));
    for (int j = 0; j < kRows; ++j) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j)));
      a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(xv, w));
    }
  }
  for (int j = 0; j < kRows; ++j) y[j] = hsum_epi32(a[j]);
}

// NL lanes' int16 activations (rows `in` apart) against rows j0..j0+3 of an int8 block (pack_int8's layout):
// twelve int32 accumulators at most, each weight vector widened to int16 once for all NL lanes.
template <int NL>
inline void lanes_dot(const int16_t* xq, int64_t in, const int8_t* block, int64_t chunks16, int j0,
                      int32_t out[NL][4]) {
  __m256i acc[NL][4];
  for (int l = 0; l < NL; ++l)
    for (int r = 0; r < 4; ++r) acc[l][r] = _mm256_setzero_si256();
  for (int64_t c = 0; c < chunks16; ++c) {
    __m256i xv[NL];
    for (int l = 0; l < NL; ++l) xv[l] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + l * in + 16 * c));
    const int8_t* w = block + (c * kRows + j0) * 16;
    for (int r = 0; r < 4; ++r) {
      const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * r)));
      for (int l = 0; l < NL; ++l) acc[l][r] = _mm256_add_epi32(acc[l][r], _mm256_madd_epi16(xv[l], wv));
    }
  }
  for (int l = 0; l < NL; ++l)
    for (int r = 0; r < 4; ++r) out[l][r] = hsum_epi32(acc[l][r]);
}

// x rounded to int16 with one scale: as fine as int32 sums of `in` products with int8 weights allow
// (|x| <= 2^31 / (127 in), at most 32,767), i.e. 2^-14 of the largest |x| or finer for in <= 1024. Returns
// the scale (0 for an all-zero x, NaN for a non-finite one).
inline float quantize_int16(const float* x, int64_t in, int16_t* xq) {
  float top = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < in; ++i) {
    top = std::max(top, std::abs(x[i]));
    finite = finite && std::isfinite(x[i]);
  }
  if (top == 0.0f || !finite) {
    for (int64_t i = 0; i < in; ++i) xq[i] = 0;
    // a NaN or inf in x gives NaN outputs (the caller's scale), as a float product would
    return finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
  }
  const float qmax = static_cast<float>(std::min<int64_t>(32767, 2147483647LL / (127 * in)));
  const float inv = qmax / top;
  for (int64_t i = 0; i < in; ++i) xq[i] = static_cast<int16_t>(std::lrintf(x[i] * inv));
  return top / qmax;
}

// Every lane of x (float32 rows, or int16 rows for int8 weights) against the block `w` of eight output rows
// starting at `o` (`n` of them real), in tiles of up to three lanes x four rows (lanes_dot); output j of lane r
// is finish(the tile's sum, r, j).
template <typename X, typename W, typename Sum, typename Finish>
void lane_tiles(const X* x, int64_t rows, int64_t in, const W* w, int64_t chunks, int64_t o, int64_t n, int64_t out,
                float* y, Finish finish) {
  Sum sums[3][4];
  for (int64_t r0 = 0; r0 < rows; r0 += 3) {
    const int nl = static_cast<int>(std::min<int64_t>(3, rows - r0));
    for (int j0 = 0; j0 < kRows; j0 += 4) {
      const X* xr = x + r0 * in;
      if (nl == 3) lanes_dot<3>(xr, in, w, chunks, j0, sums);
      else if (nl == 2) lanes_dot<2>(xr, in, w, chunks, j0, reinterpret_cast<Sum(*)[4]>(sums));
      else lanes_dot<1>(xr, in, w, chunks, j0, reinterpret_cast<Sum(*)[4]>(sums));
      for (int l = 0; l < nl; ++l)
        for (int r = 0; r < 4 && j0 + r < n; ++r) {
          const int64_t j = o + j0 + r;
          y[(r0 + l) * out + j] = finish(static_cast<float>(sums[l][r]), r0 + l, j);
        }
    }
  }
}

// y = x @ w.T for `rows` float32 rows x [rows, in] and a weight packed by pack_half or pack_int8 (`blocks`
// blocks of eight output rows, `out` of them real; int8 rows times their `scale`): y [rows, out]. Blocks are
// shared between threads.
template <typename T>
void packed_linear(const float* xp, int64_t rows, const T* wp, const float* scale, int64_t blocks, int64_t in,
                   int64_t out, float* yp) {
  constexpr bool int8 = std::is_same_v<T, int8_t>;
  const int64_t chunks = in / 8;
  // int8 weights: every lane's activations rounded to int16 with a scale of its own, so that a lane gets the
  // same outputs alone or among others
  std::vector<int16_t> xq(int8 ? rows * in : 0);
  std::vector<float> x_scale(int8 ? rows : 0);
  for (int64_t r = 0; int8 && r < rows; ++r) x_scale[r] = quantize_int16(xp + r * in, in, xq.data() + r * in);
  // output j of lane r from its sum: times the lane's and the row's int8 scales, or the row's optional scale
  const auto finish = [&](float sum, int64_t r, int64_t j) {
    if constexpr (int8) return sum * x_scale[r] * scale[j];
    else return scale ? sum * scale[j] : sum;
  };
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> wide(rows > 1 && !int8 ? kRows * in : 0);
    float tmp[kRows];
    int32_t sums[kRows];
    for (int64_t b = begin; b < end; ++b) {
      const T* block = wp + b * kRows * in;
      const int64_t o = kRows * b, n = std::min<int64_t>(kRows, out - o);
      if (rows == 1) {
        if constexpr (int8) {
          block_dot_int8(xq.data(), block, in / 16, sums);
          for (int64_t j = 0; j < n; ++j) yp[o + j] = finish(static_cast<float>(sums[j]), 0, o + j);
        } else {
          block_dot(xp, block, chunks, tmp);
          for (int64_t j = 0; j < n; ++j) yp[o + j] = finish(tmp[j], 0, o + j);
        }
        continue;
      }
      if constexpr (int8) {  // several lanes: integer multiply-adds on the block as packed
        lane_tiles<int16_t, int8_t, int32_t>(xq.data(), rows, in, block, in / 16, o, n, out, yp, finish);
      } else {  // several lanes: the block widened to float32 once, then every lane against it
        for (int64_t i = 0; i < kRows * in; i += 8) _mm256_storeu_ps(wide.data() + i, load8(block + i));
        lane_tiles<float, float, float>(xp, rows, in, wide.data(), chunks, o, n, out, yp, finish);
      }
    }
  });
}

// Inputs of a packed weight: float16 ones come by eights, int8 ones by sixteens.
int64_t packed_in(const at::Tensor& packed) { return packed.size(1) * packed.size(3); }

void check_packed(const at::Tensor& packed, int64_t out, const char* op) {
  TORCH_CHECK(packed.device().is_cpu() && packed.dim() == 4 && packed.size(2) == kRows && packed.is_contiguous() &&
              ((packed.scalar_type() == at::kHalf && packed.size(3) == 8) ||
               (packed.scalar_type() == at::kChar && packed.size(3) == 16)) &&
              out > 0 && out <= kRows * packed.size(0) && out > kRows * (packed.size(0) - 1),
              op, ": float16 or int8 weights packed by pack_half / pack_int8 for ", out, " outputs expected, got ",
              packed.scalar_type(), " ", packed.sizes());
}

// An int8 weight's scales: float32, one per packed row. Null for float16 weights.
const float* checked_scale(const at::Tensor& packed, const at::Tensor* scale, const char* op) {
  if (packed.scalar_type() == at::kHalf) {
    TORCH_CHECK(scale == nullptr || !scale->numel(), op, ": float16 weights take no scales");
    return nullptr;
  }
  TORCH_CHECK(scale != nullptr && scale->device().is_cpu() && scale->scalar_type() == at::kFloat &&
              scale->is_contiguous() && scale->numel() == kRows * packed.size(0),
              op, ": int8 weights need float32 scales, one per packed row (", kRows * packed.size(0), ")");
  return scale->data_ptr<float>();
}

void linear_any(const float* x, int64_t rows, const at::Tensor& packed, const float* scale, int64_t out, float* y) {
  const int64_t in = packed_in(packed);
  if (packed.scalar_type() == at::kHalf) {
    packed_linear(x, rows, packed.data_ptr<at::Half>(), scale, packed.size(0), in, out, y);
  } else {
    packed_linear(x, rows, packed.data_ptr<int8_t>(), scale, packed.size(0), in, out, y);
  }
}

at::Tensor packed_linear_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor* scale, int64_t out,
                            const char* op) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": float32 x expected, got ", x.scalar_type());
  check_packed(packed, out, op);
  const float* s = checked_scale(packed, scale, op);
  const int64_t in = packed_in(packed);
  TORCH_CHECK(x.size(-1) == in, op, ": x [..., ", in, "] expected, got ", x.sizes());
  const at::Tensor xs = x.reshape({-1, in}).contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out;
  at::Tensor y = at::empty({xs.size(0), out}, x.options());
  linear_any(xs.data_ptr<float>(), xs.size(0), packed, s, out, y.data_ptr<float>());
  return y.view(out_shape);
}

}  // namespace

// y = x @ w.T for float32 x [..., in] and packed float16 w (pack_half of [out, in]): float32 y [..., out].
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out) {
  TORCH_CHECK(packed.scalar_type() == at::kHalf, "dsmr::half_linear: float16 weights, got ", packed.scalar_type());
  return packed_linear_op(x, packed, nullptr, out, "dsmr::half_linear");
}

// The same for int8 weights (pack_int8 of [out, in]) and their per-row float32 scales.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t out) {
  TORCH_CHECK(packed.scalar_type() == at::kChar, "dsmr::int8_linear: int8 weights, got ", packed.scalar_type());
  return packed_linear_op(x, packed, &scale, out, "dsmr::int8_linear");
}

namespace {

// A query held in registers (DC vectors) against four consecutive keys: four independent sums.
template <typename T, int DC>
inline void dot4(const __m256 (&qv)[DC], const T* kj, float s4[4]) {
  constexpr int64_t d = 8 * DC;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int c = 0; c < DC; ++c) {
    a0 = _mm256_fmadd_ps(qv[c], load8(kj + 8 * c), a0);
    a1 = _mm256_fmadd_ps(qv[c], load8(kj + d + 8 * c), a1);
    a2 = _mm256_fmadd_ps(qv[c], load8(kj + 2 * d + 8 * c), a2);
    a3 = _mm256_fmadd_ps(qv[c], load8(kj + 3 * d + 8 * c), a3);
  }
  s4[0] = hsum(a0), s4[1] = hsum(a1), s4[2] = hsum(a2), s4[3] = hsum(a3);
}

// exp of eight floats (Cephes' polynomial, as in the common AVX "mathfun" code): ~1 ulp; exactly 0 below
// -87.3, where float32's exp underflows anyway; NaN stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
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
  return _mm256_or_ps(_mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), small), nan);
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
  int64_t i = 0;
  if constexpr (std::is_same_v<T, at::Half>) {  // saturate at float16's range, as generate._storable does
    const __m256 lo = _mm256_set1_ps(-65504.0f), hi = _mm256_set1_ps(65504.0f);
    for (; i + 8 <= n; i += 8) {
      // max/min return their second operand when either is NaN: a NaN stays NaN, as in _storable
      const __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(src + i)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    for (; i < n; ++i) dst[i] = static_cast<at::Half>(std::min(std::max(src[i], -65504.0f), 65504.0f));
  } else {
    for (; i < n; ++i) dst[i] = src[i];
  }
}

// Softmax of n scores in place (exp(s - top), vectorized); returns their sum.
inline float softmax_numerators(float* scores, int64_t n, float top) {
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
  return total;
}

// What is added to each score of a query: the memory gate's bias on the first n_memory keys (the fused step,
// whose keys are all valid), or an additive mask (PyTorch's step: -inf on a decoder's unfilled slots, whose
// groups of four are not read at all).
struct PrefixBias {
  int64_t n_memory;
  float bias;
  bool skips(int64_t) const { return false; }
  float at(int64_t j) const { return j < n_memory ? bias : 0.0f; }
};

struct AdditiveMask {
  const float* mask;
  bool skips(int64_t j) const {  // four keys masked out: not read
    const float neg_inf = -std::numeric_limits<float>::infinity();
    return mask[j] == neg_inf && mask[j + 1] == neg_inf && mask[j + 2] == neg_inf && mask[j + 3] == neg_inf;
  }
  float at(int64_t j) const { return mask[j]; }
};

// The one attention kernel: one query over n keys/values of one head, softmax(q k^T scale + extra) v, where
// `extra` (PrefixBias or AdditiveMask) says what each score gets added. DC = head dims / 8, known at compile
// time: the query and the output stay in registers, four keys are scored at once. A row whose every score
// is -inf gives zeros, as PyTorch's SDPA does. scores: n floats of scratch.
template <typename T, int DC, typename Extra>
void attend(const float* q, const T* k, const T* v, int64_t n, const Extra& extra, float scale, float* out,
            float* scores) {
  constexpr int64_t d = 8 * DC;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  __m256 qv[DC];
  for (int c = 0; c < DC; ++c) qv[c] = _mm256_loadu_ps(q + 8 * c);
  float top = neg_inf;
  int64_t j = 0;
  constexpr int64_t ahead = 1024 / sizeof(T);  // prefetch distance: across the 4 KB pages where the
                                               // hardware's own prefetcher stops
  for (; j + 4 <= n; j += 4) {
    if (extra.skips(j)) {
      scores[j] = scores[j + 1] = scores[j + 2] = scores[j + 3] = neg_inf;
      continue;
    }
    const T* kj = k + j * d;
    for (int64_t b = 0; b < 4 * d; b += 64 / static_cast<int64_t>(sizeof(T)))
      _mm_prefetch(reinterpret_cast<const char*>(kj + ahead + b), _MM_HINT_T0);
    float s4[4];
    dot4<T, DC>(qv, kj, s4);
    for (int u = 0; u < 4; ++u) {
      const float e = extra.at(j + u);
      const float s = e == neg_inf ? neg_inf : s4[u] * scale + e;
      scores[j + u] = s;
      top = s > top ? s : top;
    }
  }
  for (; j < n; ++j) {
    const float e = extra.at(j);
    const float s = e == neg_inf ? neg_inf : dot(q, k + j * d, d) * scale + e;
    scores[j] = s;
    top = s > top ? s : top;
  }
  if (top == neg_inf) {
    for (int64_t i = 0; i < d; ++i) out[i] = 0.0f;
    return;
  }
  const float inv = 1.0f / softmax_numerators(scores, n, top);  // masked scores give exactly 0
  __m256 acc[DC];
  for (int c = 0; c < DC; ++c) acc[c] = _mm256_setzero_ps();
  for (j = 0; j < n; ++j) {
    if (scores[j] == 0.0f) continue;  // masked (or underflowed): nothing to add, nothing to read
    const __m256 p = _mm256_set1_ps(scores[j]);
    const T* vj = v + j * d;
    for (int64_t b = 0; b < d; b += 64 / static_cast<int64_t>(sizeof(T)))
      _mm_prefetch(reinterpret_cast<const char*>(vj + ahead + b), _MM_HINT_T0);
    for (int c = 0; c < DC; ++c) acc[c] = _mm256_fmadd_ps(p, load8(vj + 8 * c), acc[c]);
  }
  for (int c = 0; c < DC; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
}

// Any other head size: the same, one key at a time, the output accumulated in memory.
template <typename T, typename Extra>
void attend_any(const float* q, const T* k, const T* v, int64_t n, int64_t d, const Extra& extra, float scale,
                float* out, float* scores) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float top = neg_inf;
  for (int64_t j = 0; j < n; ++j) {
    const float e = extra.at(j);
    const float s = e == neg_inf ? neg_inf : dot(q, k + j * d, d) * scale + e;
    scores[j] = s;
    top = s > top ? s : top;
  }
  for (int64_t i = 0; i < d; ++i) out[i] = 0.0f;
  if (top == neg_inf) return;
  const float inv = 1.0f / softmax_numerators(scores, n, top);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < d; ++i) out[i] += scores[j] * static_cast<float>(v[j * d + i]);
  for (int64_t i = 0; i < d; ++i) out[i] *= inv;
}

template <typename T, typename Extra>
void attend_dispatch(const float* q, const T* k, const T* v, int64_t n, int64_t d, const Extra& extra, float scale,
                     float* out, float* scores) {
  switch (d) {
    case 16: attend<T, 2>(q, k, v, n, extra, scale, out, scores); break;
    case 32: attend<T, 4>(q, k, v, n, extra, scale, out, scores); break;
    case 64: attend<T, 8>(q, k, v, n, extra, scale, out, scores); break;
    case 128: attend<T, 16>(q, k, v, n, extra, scale, out, scores); break;
    default: attend_any(q, k, v, n, d, extra, scale, out, scores);
  }
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
      attend_dispatch(qh, kh, vh, n, d, AdditiveMask{mrow}, scale, oh, scores.data());
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

// The fused step's weights, by name. dsmr::decode_step takes them as one flat list: per layer the fields of
// kLayerFields in that order, then those of kHeadFields; dsmr.generation.fused builds the list from the same
// names, which it reads from dsmr::step_fields when it loads. A scale is empty for float16 weights, a bias
// empty for RMSNorm, the gate bias empty (no gate), one value or one per head.
constexpr const char* kLayerFields[] = {"norm1.weight", "norm1.bias", "qkv", "qkv.scale", "out", "out.scale",
                                        "norm2.weight", "norm2.bias", "fc1", "fc1.scale", "fc2", "fc2.scale",
                                        "gate.bias"};
constexpr const char* kHeadFields[] = {"norm.weight", "norm.bias", "head", "head.scale"};
constexpr int64_t kLayerCount = sizeof(kLayerFields) / sizeof(kLayerFields[0]);
constexpr int64_t kHeadCount = sizeof(kHeadFields) / sizeof(kHeadFields[0]);

struct Projection {
  const at::Tensor& packed;
  const at::Tensor& scale;  // int8 row scales; empty for float16
};

struct LayerWeights {
  const at::Tensor &norm1_weight, &norm1_bias;
  Projection qkv, out;
  const at::Tensor &norm2_weight, &norm2_bias;
  Projection fc1, fc2;
  const at::Tensor& gate_bias;

  static LayerWeights at(at::TensorList w, int64_t layer) {
    const at::Tensor* p = w.data() + layer * kLayerCount;
    return {p[0], p[1], {p[2], p[3]}, {p[4], p[5]}, p[6], p[7], {p[8], p[9]}, {p[10], p[11]}, p[12]};
  }
};

struct HeadWeights {
  const at::Tensor &norm_weight, &norm_bias;
  Projection head;

  static HeadWeights at(at::TensorList w, int64_t layers) {
    const at::Tensor* p = w.data() + layers * kLayerCount;
    return {p[0], p[1], {p[2], p[3]}};
  }
};

void check_projection(const Projection& proj, int64_t in, int64_t out, const at::Tensor& first, int64_t layer,
                      const char* name) {
  const std::string what = std::string("dsmr::decode_step: ") + name + " of layer " + std::to_string(layer);
  check_packed(proj.packed, out, what.c_str());
  TORCH_CHECK(proj.packed.scalar_type() == first.scalar_type(), what, ": ", proj.packed.scalar_type(),
              " weights, the first are ", first.scalar_type());
  checked_scale(proj.packed, proj.scale.numel() ? &proj.scale : nullptr, what.c_str());
  TORCH_CHECK(packed_in(proj.packed) == in, what, " takes ", packed_in(proj.packed), " inputs, ", in, " expected");
}

void check_vector(const at::Tensor& t, int64_t n, bool may_be_empty, int64_t layer, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
              (t.numel() == n || (may_be_empty && t.numel() == 0)),
              "dsmr::decode_step: ", what, " of layer ", layer, " is not float32 [", n, "]: ", t.scalar_type(), " ",
              t.sizes());
}

std::string step_fields() {
  std::string names;
  for (const char* f : kLayerFields) names += std::string(names.empty() ? "" : ",") + f;
  names += ";";
  for (int64_t i = 0; i < kHeadCount; ++i) names += std::string(i ? "," : "") + kHeadFields[i];
  return names;
}

template <typename T>
void step_layers(const at::Tensor& ids, const at::Tensor& embedding, at::TensorList weights, at::TensorList keys,
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
  auto linear = [&](const float* in, const Projection& proj, int64_t out, float* y) {
    linear_any(in, B, proj.packed, proj.scale.numel() ? proj.scale.data_ptr<float>() : nullptr, out, y);
  };
  for (int64_t l = 0; l < L; ++l) {
    const LayerWeights w = LayerWeights::at(weights, l);
    norm(w.norm1_weight, w.norm1_bias);
    linear(hn.data(), w.qkv, 3 * A, wide.data());
    const int64_t slot = memory_fill[l] + t, N = keys[l].size(2);
    T* kp = keys[l].data_ptr<T>();
    T* vp = values[l].data_ptr<T>();
    const float* gate = w.gate_bias.numel() ? w.gate_bias.data_ptr<float>() : nullptr;
    const bool per_head = w.gate_bias.numel() > 1;
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
        const float bias = gate ? gate[per_head ? h : 0] : 0.0f;
        attend_dispatch(wide.data() + b * 3 * A + h * D, kp + bh * N * D, vp + bh * N * D, slot + 1, D,
                        PrefixBias{memory_fill[l], bias}, scale, att.data() + b * A + h * D, scores.data());
      }
    });
    linear(att.data(), w.out, d, add.data());
    for (int64_t i = 0; i < B * d; ++i) x[i] += add[i];
    norm(w.norm2_weight, w.norm2_bias);
    linear(hn.data(), w.fc1, ff, wide.data());
    int64_t i = 0;
    for (; i + 8 <= B * ff; i += 8) _mm256_storeu_ps(wide.data() + i, gelu8(_mm256_loadu_ps(wide.data() + i)));
    for (; i < B * ff; ++i) wide[i] = 0.5f * wide[i] * (1.0f + std::erf(wide[i] * 0.70710678118654752f));
    linear(wide.data(), w.fc2, d, add.data());
    for (int64_t j = 0; j < B * d; ++j) x[j] += add[j];
  }
  const HeadWeights f = HeadWeights::at(weights, L);
  norm(f.norm_weight, f.norm_bias);
  linear(hn.data(), f.head, V, logits);
}

}  // namespace

// The whole one-token step of a DSMR model with float16 or int8 packed weights: embedding, every block (norm, qkv,
// RoPE, key/value written at slot memory_fill[l] + t of its buffer, attention over the filled slots with the
// gate bias on the memory ones, output projection, norm, GELU MLP), final norm and head. One call instead of
// ~100 PyTorch operations: on a CPU a one-token step is otherwise mostly per-operation cost.
// weights: per layer the fields of kLayerFields, then those of kHeadFields (see above). keys/values
// [B, H, h_l + T, D] float16 or float32, written in place. cos/sin: the segment's rotary table [.., T, r]
// float32. Returns float32 logits [B, vocab].
at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& embedding, at::TensorList weights, at::TensorList keys,
                       at::TensorList values, at::IntArrayRef memory_fill, int64_t t, const at::Tensor& cos,
                       const at::Tensor& sin, int64_t n_heads, int64_t ff_dim, bool rmsnorm, double eps) {
  const int64_t L = keys.size();
  TORCH_CHECK(L > 0 && values.size() == keys.size() && memory_fill.size() == keys.size() &&
              static_cast<int64_t>(weights.size()) == L * kLayerCount + kHeadCount,
              "dsmr::decode_step: ", L, " layers of keys, ", values.size(), " of values, ", memory_fill.size(),
              " fills and ", weights.size(), " weights (", kLayerCount, " per layer + ", kHeadCount, " expected)");
  TORCH_CHECK(ids.device().is_cpu() && ids.dim() == 1 && ids.scalar_type() == at::kLong,
              "dsmr::decode_step: ids [B] int64 on the CPU, got ", ids.scalar_type(), " ", ids.sizes());
  const at::Tensor id = ids.contiguous();
  TORCH_CHECK(embedding.scalar_type() == at::kFloat && embedding.dim() == 2 && embedding.is_contiguous() &&
              embedding.size(1) % 8 == 0, "dsmr::decode_step: a contiguous float32 embedding [vocab, d], d % 8 == 0");
  const int64_t B = ids.size(0), d = embedding.size(1), V = embedding.size(0);
  const at::ScalarType state = keys[0].scalar_type();
  TORCH_CHECK(state == at::kHalf || state == at::kFloat, "dsmr::decode_step: a float16 or float32 state");
  const int64_t D = keys[0].size(3), A = n_heads * D;
  const at::Tensor& first = LayerWeights::at(weights, 0).qkv.packed;
  for (int64_t l = 0; l < L; ++l) {
    for (const at::Tensor& buf : {keys[l], values[l]})
      TORCH_CHECK(buf.device().is_cpu() && buf.scalar_type() == state && buf.is_contiguous() && buf.dim() == 4 &&
                  buf.size(0) == B && buf.size(1) == n_heads && buf.size(3) == D,
                  "dsmr::decode_step: layer ", l, " state ", buf.scalar_type(), " ", buf.sizes(), ": contiguous ",
                  state, " [", B, ", ", n_heads, ", N, ", D, "] expected, like layer 0's keys");
    TORCH_CHECK(memory_fill[l] >= 0 && t >= 0 && memory_fill[l] + t < keys[l].size(2),
                "dsmr::decode_step: slot ", memory_fill[l] + t, " outside layer ", l, "'s buffer of ", keys[l].size(2));
    const LayerWeights w = LayerWeights::at(weights, l);
    check_projection(w.qkv, d, 3 * A, first, l, "qkv");
    check_projection(w.out, A, d, first, l, "out");
    check_projection(w.fc1, d, ff_dim, first, l, "fc1");
    check_projection(w.fc2, ff_dim, d, first, l, "fc2");
    check_vector(w.norm1_weight, d, false, l, "norm1.weight");
    check_vector(w.norm1_bias, d, true, l, "norm1.bias");
    check_vector(w.norm2_weight, d, false, l, "norm2.weight");
    check_vector(w.norm2_bias, d, true, l, "norm2.bias");
    const int64_t g = w.gate_bias.numel();
    check_vector(w.gate_bias, g == 1 ? 1 : n_heads, true, l, "gate.bias");
  }
  const HeadWeights f = HeadWeights::at(weights, L);
  check_projection(f.head, d, V, first, L, "head");
  check_vector(f.norm_weight, d, false, L, "norm.weight");
  check_vector(f.norm_bias, d, true, L, "norm.bias");
  const int64_t rot = cos.dim() >= 2 ? cos.size(-1) : 0;
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.sizes() == cos.sizes() && sin.scalar_type() == at::kFloat &&
              cos.is_contiguous() && sin.is_contiguous() && rot >= 2 && rot % 2 == 0 && rot <= D &&
              cos.numel() == cos.size(-2) * rot && t < cos.size(-2),
              "dsmr::decode_step: one rotary table [.., T, r] float32 (even r <= ", D, ") with a row ", t,
              " expected, got ", cos.scalar_type(), " ", cos.sizes());
  at::Tensor logits = at::empty({B, V}, embedding.options());
  const float *c = cos.data_ptr<float>() + t * rot, *s = sin.data_ptr<float>() + t * rot;
  if (state == at::kHalf) {
    step_layers<at::Half>(id, embedding, weights, keys, values, memory_fill, t, c, s, rot, n_heads, ff_dim, rmsnorm,
                          static_cast<float>(eps), logits.data_ptr<float>());
  } else {
    step_layers<float>(id, embedding, weights, keys, values, memory_fill, t, c, s, rot, n_heads, ff_dim, rmsnorm,
                       static_cast<float>(eps), logits.data_ptr<float>());
  }
  return logits;
}

TORCH_LIBRARY(dsmr, m) {
  m.def("half_linear(Tensor x, Tensor packed, int out) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("decode_step(Tensor ids, Tensor embedding, Tensor[] weights, Tensor(a!)[] keys, Tensor(b!)[] values, "
        "int[] memory_fill, int t, Tensor cos, Tensor sin, int n_heads, int ff_dim, bool rmsnorm, float eps) -> Tensor");
  m.def("step_fields() -> str", &step_fields);  // no tensor argument: one kernel for every backend
  m.def("int8_linear(Tensor x, Tensor packed, Tensor scale, int out) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsmr, CPU, m) {
  m.impl("half_linear", &half_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_step", &decode_step);
  m.impl("int8_linear", &int8_linear);
}
