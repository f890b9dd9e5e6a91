// pocketllama int4 weights in the "groups" layout, for int8 activations (AVX-512 VNNI): each 32-bit lane of a
// vector holds one group of 32 weights across four loads, so a lane's int32 dot product covers a whole group and
// is scaled once (one cvt / mul / fma per 16 groups). On the int4 kernels' chunk layout (gemv.cpp) every load
// spans two groups and needs its own scaling: measured 13.6 vs 17.5 ms for the 1B's int4 linears.
// Layout (kernels.py `interleave_groups`), per block of 4 rows: 512-column super-chunks
//   (K/512, 4 rows, 4 steps, 16 groups, 4 bytes): byte b of group g at step t = canonical byte 16 g + 4 t + b
// then, when K % 512 != 0, a tail (4 rows, 4 steps, gt groups, 4 bytes) with gt = (K % 512) / 32.
// A canonical byte holds columns 2j (low nibble) and 2j + 1; w = (q - 8) * s + z per group of `gs` values
// (zeros None: symmetric, z = 0).
// x is quantized per 32 values to int8 (llama.cpp's Q8_0); per group (lane):
//   s * dx * sum (q - 8) xq + z * sum x       (the -8 folded into the int32 start; exact fp32 sums of x)
// Each output row's arithmetic does not depend on M (verification batches compute what decode does).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include "ops.h"
#include "simd.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace {

#ifdef __AVX512VNNI__
constexpr int ROWS = 4;

using pocketllama::load16;
using pocketllama::tail;

// One row of x -> per 512-column super-chunk and step t: xe / xo (64 bytes each: lane g = the 4 even / odd
// activations its weight bytes pair with), and per 32-value block: dx, -8 * sum xq (int32), sum x.
template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* xe, int8_t* xo, float* dx, int32_t* neg8, float* xs) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const int64_t blocks = K / 32, padded = (blocks + 15) / 16 * 16;
  std::memset(xe, 0, padded * 16);
  std::memset(xo, 0, padded * 16);
  for (int64_t g = blocks; g < padded; ++g) dx[g] = 0.f, neg8[g] = 0, xs[g] = 0.f;
  for (int64_t g = 0; g < blocks; ++g) {
    const __m512 a = load16(x + 32 * g), b = load16(x + 32 * g + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    xs[g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    dx[g] = amax / 127.f;
    const __m512 iv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i e = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, even, b), iv));
    const __m512i o = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, odd, b), iv));
    neg8[g] = -8 * (_mm512_reduce_add_epi32(e) + _mm512_reduce_add_epi32(o));
    alignas(16) int32_t e4[4], o4[4];  // byte j = 4 t + b of the group's even / odd activations
    _mm_store_si128(reinterpret_cast<__m128i*>(e4), _mm512_cvtsepi32_epi8(e));
    _mm_store_si128(reinterpret_cast<__m128i*>(o4), _mm512_cvtsepi32_epi8(o));
    const int64_t sc = g / 16, lane = g % 16;
    for (int t = 0; t < 4; ++t) {
      std::memcpy(xe + (sc * 4 + t) * 64 + lane * 4, &e4[t], 4);
      std::memcpy(xo + (sc * 4 + t) * 64 + lane * 4, &o4[t], 4);
    }
  }
}

// y[0..3] of one block of 4 rows. ex: lane -> group index within a 16-lane load of scales (l / (gs / 32)).
template <typename S>
inline void block(const int8_t* xe, const int8_t* xo, const float* dx, const int32_t* neg8, const float* xs,
                  const uint8_t* wb, const S* s, const S* z, float* y, int64_t K, int64_t G, int64_t per,
                  __m512i ex) {
  const int64_t full = K / 512, subgroups = K / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 tot[ROWS];
  for (int r = 0; r < ROWS; ++r) tot[r] = _mm512_setzero_ps();
  for (int64_t sc = 0; sc * 16 < subgroups; ++sc) {
    const int64_t gt = std::min<int64_t>(16, subgroups - sc * 16);  // groups in this super-chunk
    const __mmask16 lanes = tail(gt);
    const __mmask64 bytes = gt == 16 ? ~0ULL : (1ULL << (4 * gt)) - 1;
    const uint8_t* base = wb + sc * 1024;  // full super-chunks are 1 KB per block; the tail follows them
    const int64_t step = 4 * gt;           // bytes per (row, step)
    __m512i ev[4], ov[4];
    for (int t = 0; t < 4; ++t) {
      ev[t] = _mm512_loadu_si512(xe + (sc * 4 + t) * 64);
      ov[t] = _mm512_loadu_si512(xo + (sc * 4 + t) * 64);
    }
    const __m512 dv = _mm512_loadu_ps(dx + sc * 16), xv = _mm512_loadu_ps(xs + sc * 16);
    const __m512i start = _mm512_loadu_si512(neg8 + sc * 16);
    const int64_t g0 = sc * 16 / per, ng = std::min<int64_t>((gt + per - 1) / per, G - g0);
    for (int r = 0; r < ROWS; ++r) {
      const uint8_t* wr = base + r * 4 * step;
      __m512i acc = start;
      for (int t = 0; t < 4; ++t) {
        const __m512i w = _mm512_maskz_loadu_epi8(bytes, wr + t * step);
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(w, low), ev[t]);
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(w, 4), low), ov[t]);
      }
      __m512 sv = load16(s + r * G + g0, ng);
      if (per > 1) sv = _mm512_permutexvar_ps(ex, sv);
      tot[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), dv), sv, tot[r]);
      if (z) {
        __m512 zv = load16(z + r * G + g0, ng);
        if (per > 1) zv = _mm512_permutexvar_ps(ex, zv);
        tot[r] = _mm512_mask3_fmadd_ps(zv, xv, tot[r], lanes);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r) y[r] = _mm512_reduce_add_ps(tot[r]);
}

template <typename T, typename S>
void gemv_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = s.size(0), G = s.size(1), per = K / G / 32;
  const int64_t padded = (K / 32 + 15) / 16 * 16;  // blocks, rounded up to whole super-chunks
  // scratch reused across calls (a small model makes ~100 calls per token)
  thread_local std::vector<int8_t> xe, xo;
  thread_local std::vector<float> dx, xs;
  thread_local std::vector<int32_t> neg8;
  xe.resize(M * padded * 16), xo.resize(M * padded * 16), dx.resize(M * padded), xs.resize(M * padded);
  neg8.resize(M * padded);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(reinterpret_cast<const T*>(x.data_ptr()) + m * K, K, xe.data() + m * padded * 16,
                 xo.data() + m * padded * 16, dx.data() + m * padded, neg8.data() + m * padded, xs.data() + m * padded);
  alignas(64) int32_t lanes[16];
  for (int l = 0; l < 16; ++l) lanes[l] = static_cast<int32_t>(l / per);
  const __m512i ex = _mm512_load_si512(lanes);
  const uint8_t* W = w.data_ptr<uint8_t>();
  const S* Sc = reinterpret_cast<const S*>(s.data_ptr());
  const S* Z = z.defined() ? reinterpret_cast<const S*>(z.data_ptr()) : nullptr;
  T* Y = reinterpret_cast<T*>(y.data_ptr());
  const int8_t *XE = xe.data(), *XO = xo.data();
  const float *DX = dx.data(), *XS = xs.data();
  const int32_t* NEG8 = neg8.data();
  at::parallel_for(0, N / ROWS, 16, [&](int64_t b0, int64_t b1) {
    float out[ROWS];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * ROWS;
      for (int64_t m = 0; m < M; ++m) {
        block<S>(XE + m * padded * 16, XO + m * padded * 16, DX + m * padded, NEG8 + m * padded, XS + m * padded,
                 W + n * K / 2, Sc + n * G, Z ? Z + n * G : nullptr, out, K, G, per, ex);
        for (int r = 0; r < ROWS; ++r) Y[m * N + n + r] = static_cast<T>(out[r]);
      }
    }
  });
}

template <typename T>
void gemv_scales(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, at::Tensor& y) {
  switch (s.scalar_type()) {
    case at::kFloat: gemv_impl<T, float>(x, w, s, z, y); break;
    case at::kBFloat16: gemv_impl<T, c10::BFloat16>(x, w, s, z, y); break;
    case at::kHalf: gemv_impl<T, c10::Half>(x, w, s, z, y); break;
    default: TORCH_CHECK(false, "int4g_gemv_a8: scales must be float32, bfloat16 or float16");
  }
}

void check(const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, int64_t K, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && s.device().is_cpu() && (!z.defined() || z.device().is_cpu()), what, " runs on CPU");
  TORCH_CHECK(s.dim() == 2 && w.is_contiguous() && s.is_contiguous() &&
              (!z.defined() || (z.is_contiguous() && z.sizes() == s.sizes() && z.scalar_type() == s.scalar_type())),
              what, ": contiguous weight, scales and zeros (N, G)");
  const int64_t N = s.size(0), G = s.size(1);
  TORCH_CHECK(N % ROWS == 0 && K % 64 == 0 && K % G == 0 && (K / G) % 32 == 0 && K / G <= 512, what,
              ": needs N % 4 == 0, K % 64 == 0 and groups of 32..512 values, got N=", N, " K=", K, " G=", G);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.numel() * 2 == N * K, what, ": weight must be uint8 N*K/2");
}

at::Tensor int4g_gemv_a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "int4g_gemv_a8: x (M, K) on CPU");
  check(w, s, z, x.size(1), "int4g_gemv_a8");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), s.size(0)}, xc.options());
  switch (x.scalar_type()) {
    case at::kFloat: gemv_scales<float>(xc, w, s, z, y); break;
    case at::kBFloat16: gemv_scales<c10::BFloat16>(xc, w, s, z, y); break;
    case at::kHalf: gemv_scales<c10::Half>(xc, w, s, z, y); break;
    default: TORCH_CHECK(false, "int4g_gemv_a8: x must be float32, bfloat16 or float16");
  }
  return y;
}

// ---- prefill: rows r0..r1 of the weight as floats (canonical order), w = fma(q - 8, s, z) rounded once:
// bit-identical to the torch path's addcmul. Per 16 weight bytes (4 groups x 4 bytes of one step), the nibbles
// become two vectors of 2 groups x 8 consecutive columns each.
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(c10::BFloat16* p, __m256 v) {
#ifdef __AVX512BF16__
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), (__m128i)_mm256_cvtneps_pbh(v));
#else
  alignas(32) float f[8];
  _mm256_store_ps(f, v);
  for (int i = 0; i < 8; ++i) p[i] = static_cast<c10::BFloat16>(f[i]);
#endif
}
inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename S, typename T>
void dequant_impl(const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, int64_t r0, int64_t r1,
                  at::Tensor& out) {
  const int64_t N = s.size(0), G = s.size(1), K = w.numel() * 2 / N, per = K / G / 32, subgroups = K / 32;
  const uint8_t* W = w.data_ptr<uint8_t>();
  const S* Sc = reinterpret_cast<const S*>(s.data_ptr());
  const S* Z = z.defined() ? reinterpret_cast<const S*>(z.data_ptr()) : nullptr;
  T* O = reinterpret_cast<T*>(out.data_ptr());
  alignas(64) int32_t lanes[16];
  for (int l = 0; l < 16; ++l) lanes[l] = static_cast<int32_t>(l / per);
  const __m512i ex = _mm512_load_si512(lanes);
  __m512i pair[8];  // lanes 0-7: group 2j, 8-15: group 2j + 1 (of a super-chunk's 16)
  for (int j = 0; j < 8; ++j) pair[j] = _mm512_set_epi32(2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1,
      2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j);
  const __m512i lo_hi_a = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i lo_hi_b = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512i nib = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
  at::parallel_for(r0 / ROWS, r1 / ROWS, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t sc = 0; sc * 16 < subgroups; ++sc) {
        const int64_t gt = std::min<int64_t>(16, subgroups - sc * 16), step = 4 * gt;
        const int64_t g0 = sc * 16 / per, ng = std::min<int64_t>((gt + per - 1) / per, G - g0);
        const uint8_t* base = W + b * ROWS * K / 2 + sc * 1024;
        for (int r = 0; r < ROWS; ++r) {
          const int64_t n = b * ROWS + r;
          __m512 sv = load16(Sc + n * G + g0, ng), zv = Z ? load16(Z + n * G + g0, ng) : _mm512_setzero_ps();
          if (per > 1) sv = _mm512_permutexvar_ps(ex, sv), zv = _mm512_permutexvar_ps(ex, zv);
          T* row = O + (n - r0) * K + sc * 512;
          for (int t = 0; t < 4; ++t) {
            const uint8_t* p = base + r * 4 * step + t * step;
            for (int64_t q4 = 0; 4 * q4 < gt; ++q4) {  // 4 groups (16 bytes) at a time
              const int64_t left = gt - 4 * q4;         // groups present in this quarter (tail: maybe < 4)
              const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(
                  left >= 4 ? 0xFFFF : static_cast<__mmask16>((1u << (4 * left)) - 1), p + 16 * q4));
              const __m512i lo = _mm512_sub_epi32(_mm512_and_si512(v, nib), eight);
              const __m512i hi = _mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight);
              for (int h = 0; h < 2 && 2 * h < left; ++h) {
                const int64_t g = 4 * q4 + 2 * h;  // groups g and g + 1
                const __m512 q = _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo, h ? lo_hi_b : lo_hi_a, hi));
                const __m512 val = _mm512_fmadd_ps(q, _mm512_permutexvar_ps(pair[g / 2], sv),
                                                   _mm512_permutexvar_ps(pair[g / 2], zv));
                store8(row + 32 * g + 8 * t, _mm512_castps512_ps256(val));
                if (g + 1 < gt) store8(row + 32 * (g + 1) + 8 * t, _mm512_extractf32x8_ps(val, 1));
              }
            }
          }
        }
      }
  });
}

void int4g_dequant(const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& zeros, int64_t r0,
                   int64_t r1, at::Tensor out) {
  const at::Tensor z = zeros.value_or(at::Tensor());
  const int64_t N = s.size(0);
  TORCH_CHECK(N > 0 && w.numel() * 2 % N == 0, "int4g_dequant: weight and scales disagree");
  const int64_t K = w.numel() * 2 / N;
  check(w, s, z, K, "int4g_dequant");
  TORCH_CHECK(r0 % ROWS == 0 && r1 % ROWS == 0 && 0 <= r0 && r0 <= r1 && r1 <= N, "int4g_dequant: rows must be "
              "multiples of 4 within the weight");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == r1 - r0 && out.size(1) == K,
              "int4g_dequant: out must be contiguous (r1 - r0, K)");
#define PL_DQ(S_)                                                                          \
  switch (out.scalar_type()) {                                                             \
    case at::kFloat: dequant_impl<S_, float>(w, s, z, r0, r1, out); break;                 \
    case at::kBFloat16: dequant_impl<S_, c10::BFloat16>(w, s, z, r0, r1, out); break;      \
    case at::kHalf: dequant_impl<S_, c10::Half>(w, s, z, r0, r1, out); break;              \
    default: TORCH_CHECK(false, "int4g_dequant: out must be float32, bfloat16 or float16"); \
  }
  switch (s.scalar_type()) {
    case at::kFloat: PL_DQ(float); break;
    case at::kBFloat16: PL_DQ(c10::BFloat16); break;
    case at::kHalf: PL_DQ(c10::Half); break;
    default: TORCH_CHECK(false, "int4g_dequant: scales must be float32, bfloat16 or float16");
  }
#undef PL_DQ
}
#endif

}  // namespace

#ifdef __AVX512VNNI__
at::Tensor pocketllama::ops::int4g_gemv_a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                                           const at::Tensor& z) {
  return ::int4g_gemv_a8(x, w, s, z);
}

TORCH_LIBRARY_FRAGMENT(pocketllama_quant, m) {
  m.def("int4g_gemv_a8(Tensor x, Tensor w, Tensor scales, Tensor? zeros) -> Tensor");
  m.def("int4g_dequant(Tensor w, Tensor scales, Tensor? zeros, int r0, int r1, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(pocketllama_quant, CPU, m) {
  m.impl("int4g_gemv_a8", [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                             const std::optional<at::Tensor>& z) { return int4g_gemv_a8(x, w, s, z.value_or(at::Tensor())); });
  m.impl("int4g_dequant", &int4g_dequant);
}
#endif
