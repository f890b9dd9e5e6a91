// pocketllama quantized GEMV for CPUs with AVX-512: y (M, N) = x (M, K) @ dequant(W).T for small M (decode).
// Weights stay in pocketllama's canonical layouts (quant/primitives.py) and stream from memory once per call:
//   int8: w int8 (N, K), scales (N, G)                         w = q * s
//   int4: w uint8 (N, K/2) low nibble = even column, scales/zeros (N, G)   w = (q - 8) * s + z
// Arithmetic is fp32 (weights exact, fp32 accumulation), so results match a dequantized fp32 matmul up to
// summation order. Rows are split across PyTorch's intra-op threads (at::parallel_for).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>
#include <ATen/ATen.h>

namespace {

// Output rows computed together, sharing the loads of x (measured best: 8 for int8, 4 for int4).
constexpr int ROWS_INT8 = 8, ROWS_INT4 = 4;

template <typename S>
inline float to_f(S v) { return static_cast<float>(v); }

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// ---- scales -----------------------------------------------------------------------------------------
constexpr int64_t MAX_GROUPS = 1024;  // K / group; Llama's widest row is 28672 values = 896 groups of 32

inline __mmask16 tail(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
inline __m512 load16(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(tail(n), p); }
inline __m512 load16(const c10::BFloat16* p, int64_t n) {
  const __m256i v = _mm256_maskz_loadu_epi16(tail(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const c10::Half* p, int64_t n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail(n), p)); }

// Scales of R rows (R x G, row stride G) as fp32 into `out` (R x G).
template <typename S, int R>
inline void scales_f32(const S* s, int64_t G, float* out) {
  for (int r = 0; r < R; ++r)
    for (int64_t g = 0; g < G; g += 16) _mm512_mask_storeu_ps(out + r * G + g, tail(G - g), load16(s + r * G + g, G - g));
}

// ---- int8 ---------------------------------------------------------------------------------------------
template <typename S, int R>
inline void int8_rows(const float* x, const int8_t* w, const S* s, float* y, int64_t K, int64_t G) {
  const int64_t gs = K / G;
  alignas(64) float sc[R * MAX_GROUPS];
  scales_f32<S, R>(s, G, sc);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const int64_t k0 = g * gs;
    for (int64_t k = k0; k < k0 + gs; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) {
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * K + k), _MM_HINT_T0);
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), xv, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(sc[r * G + g]), total[r]);
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(total[r]);
}

// ---- int4 ---------------------------------------------------------------------------------------------
// xe / xo: the even / odd columns of x (K/2 each), so byte j of a row pairs with xe[j] (low) and xo[j] (high).
// xs: per-group sums of x, for the zero-point term sum_g (z - 8 s) * xs[g].
template <typename S, int R>
inline void int4_rows(const float* xe, const float* xo, const float* xs, const uint8_t* w, const S* s,
                      const S* z, float* y, int64_t K, int64_t G) {
  const int64_t half = K / 2, gb = half / G;  // bytes per group
  alignas(64) float sc[R * MAX_GROUPS];
  scales_f32<S, R>(s, G, sc);
  float offset[R];
  for (int r = 0; r < R; ++r) {  // sum_g (z - 8 s) * xs[g], vectorized over groups
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
      const __m512 zv = load16(z + r * G + g, G - g), sv = _mm512_maskz_loadu_ps(tail(G - g), sc + r * G + g);
      const __m512 xv = load16(xs + g, G - g);
      acc = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.f), sv, zv), xv, acc);
    }
    offset[r] = hsum(acc);
  }
  const __m512i mask = _mm512_set1_epi32(0xF);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const int64_t j0 = g * gb;
    for (int64_t j = j0; j < j0 + gb; j += 16) {
      const __m512 ev = _mm512_loadu_ps(xe + j);
      const __m512 ov = _mm512_loadu_ps(xo + j);
      for (int r = 0; r < R; ++r) {
        if ((j & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * half + j), _MM_HINT_T0);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * half + j)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, mask)), ev, acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), ov, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(sc[r * G + g]), total[r]);
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(total[r]) + offset[r];
}

#ifdef __AVX512BF16__
// int4 with bfloat16 activations: nibbles become bf16 through a 16-entry table (vpermw) and each vdpbf16ps
// does 32 multiply-adds; products of bf16 values are exact in fp32, so only summation order differs.
// xe / xo are bf16 here. One 32-byte chunk (64 weights) spans 32 / gb groups (2 for group 32).
template <typename S, int R>
inline void int4_rows_bf16(const c10::BFloat16* xe, const c10::BFloat16* xo, const float* xs, const uint8_t* w,
                           const S* s, const S* z, float* y, int64_t K, int64_t G) {
  const int64_t half = K / 2, gb = half / G;
  alignas(64) float sc[R * MAX_GROUPS];
  scales_f32<S, R>(s, G, sc);
  float offset[R];
  for (int r = 0; r < R; ++r) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
      const __m512 zv = load16(z + r * G + g, G - g), sv = _mm512_maskz_loadu_ps(tail(G - g), sc + r * G + g);
      acc = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.f), sv, zv), load16(xs + g, G - g), acc);
    }
    offset[r] = hsum(acc);
  }
  const __m512i lut = _mm512_set_epi16(
      0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040,
      0x4000, 0x3F80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0,
      0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
  const __m512i mask = _mm512_set1_epi16(0xF);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < half; j += 32) {
    const __m512bh ev = (__m512bh)_mm512_loadu_si512(xe + j);
    const __m512bh ov = (__m512bh)_mm512_loadu_si512(xo + j);
    const int64_t g = j / gb;
    for (int r = 0; r < R; ++r) {
      if ((j & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * half + j), _MM_HINT_T0);
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * half + j)));
      __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, mask), lut), ev);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut), ov);
      // lane i holds bytes j+2i, j+2i+1: lanes 0-7 are group g, lanes 8-15 group g+1 when groups are 16 bytes
      const __m512 sv = gb == 16
          ? _mm512_insertf32x8(_mm512_set1_ps(sc[r * G + g]), _mm256_set1_ps(sc[r * G + g + 1]), 1)
          : _mm512_set1_ps(sc[r * G + g]);
      total[r] = _mm512_fmadd_ps(acc, sv, total[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(total[r]) + offset[r];
}

template <typename S>
void int4_impl_bf16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z,
                    at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = s.size(1);
  at::Tensor pairs = x.view({M, K / 2, 2});
  at::Tensor xe = pairs.select(2, 0).contiguous(), xo = pairs.select(2, 1).contiguous();
  at::Tensor xs = x.to(at::kFloat).view({M, G, K / G}).sum(-1).contiguous();
  const auto* E = reinterpret_cast<const c10::BFloat16*>(xe.data_ptr());
  const auto* O = reinterpret_cast<const c10::BFloat16*>(xo.data_ptr());
  const float* XS = xs.data_ptr<float>();
  const uint8_t* W = w.data_ptr<uint8_t>();
  const S* Sc = reinterpret_cast<const S*>(s.data_ptr());
  const S* Z = reinterpret_cast<const S*>(z.data_ptr());
  float* Y = y.data_ptr<float>();
  const int64_t half = K / 2, blocks = (N + ROWS_INT4 - 1) / ROWS_INT4;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * ROWS_INT4;
      for (int64_t m = 0; m < M; ++m) {
        const c10::BFloat16 *e = E + m * half, *o = O + m * half;
        const float* sums = XS + m * G;
        if (n + ROWS_INT4 <= N) {
          int4_rows_bf16<S, ROWS_INT4>(e, o, sums, W + n * half, Sc + n * G, Z + n * G, Y + m * N + n, K, G);
        } else {
          for (int64_t r = n; r < N; ++r)
            int4_rows_bf16<S, 1>(e, o, sums, W + r * half, Sc + r * G, Z + r * G, Y + m * N + r, K, G);
        }
      }
    }
  });
}
#endif

at::Tensor as_float_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "pocketllama gemv: x must be 2-D (M, K), got ", x.dim(), "-D");
  return x.to(at::kFloat).contiguous();
}

template <typename S>
void int8_impl(const at::Tensor& xf, const at::Tensor& w, const at::Tensor& s, at::Tensor& y) {
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0), G = s.size(1);
  const float* X = xf.data_ptr<float>();
  const int8_t* W = w.data_ptr<int8_t>();
  const S* Sc = reinterpret_cast<const S*>(s.data_ptr());
  float* Y = y.data_ptr<float>();
  const int64_t blocks = (N + ROWS_INT8 - 1) / ROWS_INT8;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * ROWS_INT8;
      for (int64_t m = 0; m < M; ++m) {
        if (n + ROWS_INT8 <= N) {
          int8_rows<S, ROWS_INT8>(X + m * K, W + n * K, Sc + n * G, Y + m * N + n, K, G);
        } else {
          for (int64_t r = n; r < N; ++r) int8_rows<S, 1>(X + m * K, W + r * K, Sc + r * G, Y + m * N + r, K, G);
        }
      }
    }
  });
}

template <typename S>
void int4_impl(const at::Tensor& xf, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, at::Tensor& y) {
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0), G = s.size(1);
  // (M, K) -> even / odd columns (M, K/2) each, and per-group sums (M, G)
  at::Tensor pairs = xf.view({M, K / 2, 2});
  at::Tensor xe = pairs.select(2, 0).contiguous(), xo = pairs.select(2, 1).contiguous();
  at::Tensor xs = xf.view({M, G, K / G}).sum(-1).contiguous();
  const float *E = xe.data_ptr<float>(), *O = xo.data_ptr<float>(), *XS = xs.data_ptr<float>();
  const uint8_t* W = w.data_ptr<uint8_t>();
  const S* Sc = reinterpret_cast<const S*>(s.data_ptr());
  const S* Z = reinterpret_cast<const S*>(z.data_ptr());
  float* Y = y.data_ptr<float>();
  const int64_t half = K / 2, blocks = (N + ROWS_INT4 - 1) / ROWS_INT4;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * ROWS_INT4;
      for (int64_t m = 0; m < M; ++m) {
        const float *e = E + m * half, *o = O + m * half, *sums = XS + m * G;
        if (n + ROWS_INT4 <= N) {
          int4_rows<S, ROWS_INT4>(e, o, sums, W + n * half, Sc + n * G, Z + n * G, Y + m * N + n, K, G);
        } else {
          for (int64_t r = n; r < N; ++r)
            int4_rows<S, 1>(e, o, sums, W + r * half, Sc + r * G, Z + r * G, Y + m * N + r, K, G);
        }
      }
    }
  });
}

void check_common(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t k_bytes_div) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && s.device().is_cpu(), "pocketllama gemv runs on CPU");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && s.dim() == 2 && s.is_contiguous(),
              "pocketllama gemv: weight and scales must be contiguous 2-D tensors");
  TORCH_CHECK(w.size(1) * k_bytes_div == x.size(1), "pocketllama gemv: weight has ", w.size(1),
              " bytes per row, x has ", x.size(1), " columns");
  TORCH_CHECK(s.size(0) == w.size(0), "pocketllama gemv: scales rows != weight rows");
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  at::Tensor xf = as_float_rows(x);
  check_common(xf, w, s, 1);
  TORCH_CHECK(w.scalar_type() == at::kChar, "int8_gemv: weight must be int8");
  const int64_t K = xf.size(1), G = s.size(1);
  TORCH_CHECK(K % G == 0 && (K / G) % 16 == 0, "int8_gemv: groups of ", K / G, " values; need a multiple of 16");
  TORCH_CHECK(G <= MAX_GROUPS, "int8_gemv: at most ", MAX_GROUPS, " groups per row");
  at::Tensor y = at::empty({xf.size(0), w.size(0)}, xf.options());
  switch (s.scalar_type()) {
    case at::kFloat: int8_impl<float>(xf, w, s, y); break;
    case at::kBFloat16: int8_impl<c10::BFloat16>(xf, w, s, y); break;
    case at::kHalf: int8_impl<c10::Half>(xf, w, s, y); break;
    default: TORCH_CHECK(false, "int8_gemv: scales must be float32, bfloat16 or float16");
  }
  return y.to(x.scalar_type());
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z) {
  at::Tensor xf = as_float_rows(x);
  check_common(xf, w, s, 2);
  TORCH_CHECK(w.scalar_type() == at::kByte, "int4_gemv: weight must be uint8 (two int4 per byte)");
  TORCH_CHECK(z.sizes() == s.sizes() && z.scalar_type() == s.scalar_type() && z.is_contiguous(),
              "int4_gemv: zeros must match scales");
  const int64_t K = xf.size(1), G = s.size(1);
  TORCH_CHECK(K % G == 0 && (K / G) % 32 == 0, "int4_gemv: groups of ", K / G, " values; need a multiple of 32");
  TORCH_CHECK(G <= MAX_GROUPS, "int4_gemv: at most ", MAX_GROUPS, " groups per row");
  at::Tensor y = at::empty({xf.size(0), w.size(0)}, xf.options());
#ifdef __AVX512BF16__
  if (x.scalar_type() == at::kBFloat16 && (K / 2) % 32 == 0) {
    const at::Tensor xb = x.contiguous();
    switch (s.scalar_type()) {
      case at::kFloat: int4_impl_bf16<float>(xb, w, s, z, y); break;
      case at::kBFloat16: int4_impl_bf16<c10::BFloat16>(xb, w, s, z, y); break;
      case at::kHalf: int4_impl_bf16<c10::Half>(xb, w, s, z, y); break;
      default: TORCH_CHECK(false, "int4_gemv: scales must be float32, bfloat16 or float16");
    }
    return y.to(x.scalar_type());
  }
#endif
  switch (s.scalar_type()) {
    case at::kFloat: int4_impl<float>(xf, w, s, z, y); break;
    case at::kBFloat16: int4_impl<c10::BFloat16>(xf, w, s, z, y); break;
    case at::kHalf: int4_impl<c10::Half>(xf, w, s, z, y); break;
    default: TORCH_CHECK(false, "int4_gemv: scales must be float32, bfloat16 or float16");
  }
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(pocketllama_quant, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor w, Tensor scales, Tensor zeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(pocketllama_quant, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
}
