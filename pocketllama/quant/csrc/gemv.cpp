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

constexpr int ROWS = 4;  // output rows computed together, sharing the loads of x

template <typename S>
inline float to_f(S v) { return static_cast<float>(v); }

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// ---- int8 ---------------------------------------------------------------------------------------------
template <typename S, int R>
inline void int8_rows(const float* x, const int8_t* w, const S* s, float* y, int64_t K, int64_t G,
                      int64_t ldy) {
  const int64_t gs = K / G;
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const int64_t k0 = g * gs;
    for (int64_t k = k0; k < k0 + gs; k += 16) {
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k));
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
        acc[r] = _mm512_fmadd_ps(wv, xv, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(to_f(s[r * G + g])), total[r]);
  }
  for (int r = 0; r < R; ++r) y[r * ldy] = hsum(total[r]);
}

// ---- int4 ---------------------------------------------------------------------------------------------
// xe / xo: the even / odd columns of x (K/2 each), so byte j of a row pairs with xe[j] (low) and xo[j] (high).
// xs: per-group sums of x, for the zero-point term sum_g (z - 8 s) * xs[g].
template <typename S, int R>
inline void int4_rows(const float* xe, const float* xo, const float* xs, const uint8_t* w, const S* s,
                      const S* z, float* y, int64_t K, int64_t G, int64_t ldy) {
  const int64_t half = K / 2, gb = half / G;  // bytes per group
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
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * half + j)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, mask)), ev, acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), ov, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(to_f(s[r * G + g])), total[r]);
  }
  for (int r = 0; r < R; ++r) {
    float offset = 0.f;
    for (int64_t g = 0; g < G; ++g) offset += (to_f(z[r * G + g]) - 8.f * to_f(s[r * G + g])) * xs[g];
    y[r * ldy] = hsum(total[r]) + offset;
  }
}

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
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * ROWS;
      for (int64_t m = 0; m < M; ++m) {
        if (n + ROWS <= N) {
          int8_rows<S, ROWS>(X + m * K, W + n * K, Sc + n * G, Y + m * N + n, K, G, 1);
        } else {
          for (int64_t r = n; r < N; ++r) int8_rows<S, 1>(X + m * K, W + r * K, Sc + r * G, Y + m * N + r, K, G, 1);
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
  const int64_t half = K / 2, blocks = (N + ROWS - 1) / ROWS;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * ROWS;
      for (int64_t m = 0; m < M; ++m) {
        const float *e = E + m * half, *o = O + m * half, *sums = XS + m * G;
        if (n + ROWS <= N) {
          int4_rows<S, ROWS>(e, o, sums, W + n * half, Sc + n * G, Z + n * G, Y + m * N + n, K, G, 1);
        } else {
          for (int64_t r = n; r < N; ++r)
            int4_rows<S, 1>(e, o, sums, W + r * half, Sc + r * G, Z + r * G, Y + m * N + r, K, G, 1);
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
  at::Tensor y = at::empty({xf.size(0), w.size(0)}, xf.options());
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
