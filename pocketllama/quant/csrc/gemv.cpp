// pocketllama quantized GEMV for CPUs with AVX-512: y (M, N) = x (M, K) @ dequant(W).T for small M (decode).
// Weights are pocketllama's canonical layouts (quant/primitives.py) with rows interleaved per block (kernels.py
// `interleave`), so each block of rows streams from memory as one sequential run:
//   int8: w int8 (N/8, K/64, 8, 64), scales (N, G)                                  w = q * s
//   int4: w uint8 (N/4, K/64, 4, 32), low nibble = even column, scales/zeros (N, G)  w = (q - 8) * s + z
//         (zeros None: symmetric, w = (q - 8) * s, llama.cpp's Q4_0 and Meta's quantized Llama 3.2)
// Arithmetic is fp32 (weights exact, fp32 accumulation), so results match a dequantized fp32 matmul up to
// summation order. Rows are split across PyTorch's intra-op threads (at::parallel_for).
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include "ops.h"
#include "simd.h"

namespace {

// Output rows computed together, sharing the loads of x (measured best: 8 for int8, 4 for int4).
constexpr int ROWS_INT8 = 8, ROWS_INT4 = 4;

template <typename S>
inline float to_f(S v) { return static_cast<float>(v); }

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// ---- scales -----------------------------------------------------------------------------------------
constexpr int64_t MAX_GROUPS = 1024;  // K / group; Llama's widest row is 28672 values = 896 groups of 32

using pocketllama::load16;
using pocketllama::tail;

// Scales of R rows (R x G, row stride G) as fp32 into `out` (R x G).
template <typename S, int R>
inline void scales_f32(const S* s, int64_t G, float* out) {
  for (int r = 0; r < R; ++r)
    for (int64_t g = 0; g < G; g += 16) _mm512_mask_storeu_ps(out + r * G + g, tail(G - g), load16(s + r * G + g, G - g));
}

// ---- int8 ---------------------------------------------------------------------------------------------
// Weights interleaved per block of R8 rows: (N/R8, K/64, R8, 64), so a block streams as one sequential run
// (measured 2x the bandwidth of R8 separate row streams). One scale per row (G = 1) or per group of gs values.
template <typename S>
inline void int8_block(const float* x, const int8_t* wb, const S* s, float* y, int64_t K, int64_t G) {
  constexpr int R = ROWS_INT8;
  const int64_t gs = K / G;
  alignas(64) float sc[R * MAX_GROUPS];
  scales_f32<S, R>(s, G, sc);
  __m512 total[R], acc[R];
  for (int r = 0; r < R; ++r) total[r] = acc[r] = _mm512_setzero_ps();
  const int64_t steps = gs / 16;  // 16-value steps per group; a countdown instead of a modulo per step
  int64_t left = steps, g = 0;
  for (int64_t c = 0; c < K / 64; ++c) {
    const int8_t* wc = wb + c * 64 * R;
    for (int p = 0; p < R; ++p) _mm_prefetch(reinterpret_cast<const char*>(wc + 4 * 64 * R + p * 64), _MM_HINT_T0);
    for (int q = 0; q < 4; ++q) {
      const int64_t k = c * 64 + q * 16;
      const __m512 xv = _mm512_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wc + r * 64 + q * 16));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), xv, acc[r]);
      }
      if (--left == 0) {
        for (int r = 0; r < R; ++r) {
          total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(sc[r * G + g]), total[r]);
          acc[r] = _mm512_setzero_ps();
        }
        left = steps;
        ++g;
      }
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(total[r]);
}

// ---- int4 ---------------------------------------------------------------------------------------------
// Weights (N, K/2) bytes, low nibble = even column, interleaved per block of R4 rows in 32-byte chunks:
// (N/R4, K/64, R4, 32). xe / xo: the even / odd columns of x (K/2 each), so byte j of a row pairs with xe[j]
// (low nibble) and xo[j] (high). xs: per-group sums of x, for the zero-point term sum_g (z - 8 s) * xs[g]
// (z null: symmetric weights, z = 0).
template <typename S, int R>
inline void zero_terms(const S* z, const float* sc, const float* xs, int64_t G, float* offset) {
  for (int r = 0; r < R; ++r) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
      const __m512 zv = z ? load16(z + r * G + g, G - g) : _mm512_setzero_ps(), sv = _mm512_maskz_loadu_ps(tail(G - g), sc + r * G + g);
      acc = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.f), sv, zv), load16(xs + g, G - g), acc);
    }
    offset[r] = hsum(acc);
  }
}

template <typename S>
inline void int4_block(const float* xe, const float* xo, const float* xs, const uint8_t* wb, const S* s,
                       const S* z, float* y, int64_t K, int64_t G) {
  constexpr int R = ROWS_INT4;
  const int64_t half = K / 2, gb = half / G;  // bytes per group
  alignas(64) float sc[R * MAX_GROUPS];
  scales_f32<S, R>(s, G, sc);
  float offset[R];
  zero_terms<S, R>(z, sc, xs, G, offset);
  const __m512i mask = _mm512_set1_epi32(0xF);
  __m512 total[R], acc[R];
  for (int r = 0; r < R; ++r) total[r] = acc[r] = _mm512_setzero_ps();
  const int64_t steps = gb / 16;
  int64_t left = steps, g = 0;
  for (int64_t c = 0; c < half / 32; ++c) {
    const uint8_t* wc = wb + c * 32 * R;
    _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * 32 * R), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * 32 * R + 64), _MM_HINT_T0);
    for (int q = 0; q < 2; ++q) {
      const int64_t j = c * 32 + q * 16;
      const __m512 ev = _mm512_loadu_ps(xe + j), ov = _mm512_loadu_ps(xo + j);
      for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wc + r * 32 + q * 16)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, mask)), ev, acc[r]);
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), ov, acc[r]);
      }
      if (--left == 0) {
        for (int r = 0; r < R; ++r) {
          total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(sc[r * G + g]), total[r]);
          acc[r] = _mm512_setzero_ps();
        }
        left = steps;
        ++g;
      }
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(total[r]) + offset[r];
}

#ifdef __AVX512BF16__
// bfloat16 activations: nibbles become bf16 through a 16-entry table (vpermw) and each vdpbf16ps does 32
// multiply-adds; products of bf16 values are exact in fp32, so only the summation order differs.
// One 32-byte chunk (64 weights) spans 32 / gb groups (2 for group 32).
template <typename S>
inline void int4_block_bf16(const c10::BFloat16* xe, const c10::BFloat16* xo, const float* xs, const uint8_t* wb,
                            const S* s, const S* z, float* y, int64_t K, int64_t G) {
  constexpr int R = ROWS_INT4;
  const int64_t half = K / 2, gb = half / G;
  alignas(64) float sc[R * MAX_GROUPS];
  scales_f32<S, R>(s, G, sc);
  float offset[R];
  zero_terms<S, R>(z, sc, xs, G, offset);
  const __m512i lut = _mm512_set_epi16(
      0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040,
      0x4000, 0x3F80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0,
      0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
  const __m512i mask = _mm512_set1_epi16(0xF);
  __m512 total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
  const int64_t chunks_per_group = gb >= 32 ? gb / 32 : 1;  // gb == 16: two groups per chunk
  for (int64_t c = 0; c < half / 32; ++c) {
    const int64_t j = c * 32, g = gb == 16 ? 2 * c : c / chunks_per_group;
    const uint8_t* wc = wb + c * 32 * R;
    _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * 32 * R), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * 32 * R + 64), _MM_HINT_T0);
    const __m512bh ev = (__m512bh)_mm512_loadu_si512(xe + j);
    const __m512bh ov = (__m512bh)_mm512_loadu_si512(xo + j);
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wc + r * 32)));
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
#endif

// ---- bf16 x bf16 (dense weights) --------------------------------------------------------------------
// W (N, K) bf16 row-major as stored in the checkpoint (no repacking, so LoRA, saving and the float paths see
// the same tensor). R rows at a time share each load of x; each vdpbf16ps does 32 multiply-adds with fp32
// accumulation (products of bf16 values are exact in fp32), like oneDNN's bf16 GEMM up to summation order.
#ifdef __AVX512BF16__
// Measured on 2 Zen 4 cores over the 1B's weights: 8 rows per block (4: 0.97x, 16: 1.0x; llama.cpp's
// row-at-a-time order 0.66-0.90x); prefetching the block after next into L2 1.05x (1.02-1.39x over 20
// alternations, most where the machine's bandwidth is scarce).
constexpr int ROWS_BF16 = 8;

inline void bf16_block(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, int64_t K) {
  constexpr int R = ROWS_BF16;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    for (int r = 0; r < R; ++r)  // the same line of the block after next, into L2
      _mm_prefetch(reinterpret_cast<const char*>(w + (2 * R + r) * K + k), _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(w + r * K + k), xv);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum(acc[r]);
}

inline void bf16_row(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, int64_t K) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
  *y = hsum(acc);
}

// Several rows of x (speculative verification, batched decode): each weight load serves up to 4 rows of x
// and each x load 4 weight rows, so the cost stays close to one pass over the weights instead of M passes
// (measured on the 1B: 8 rows took 2.2x one row's time with a pass per row). Same accumulation order per
// output as bf16_block, so results do not depend on how many rows come together.
constexpr int TILE_ROWS = 4;  // weight rows per tile (accumulators: TILE_ROWS x MT <= 16 of 32 registers)

template <int MT>
inline void bf16_tile(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, int64_t K, int64_t N) {
  constexpr int R = TILE_ROWS;
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      for (int m = 0; m < MT; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv, xv[m]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) y[m * N + r] = hsum(acc[m][r]);
}

inline void bf16_tiles(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* y, int64_t M, int64_t K, int64_t N) {
  for (int64_t m = 0; m < M;) {
    // a tile of one x row has only 4 independent accumulation chains (latency-bound): 5 rows go as 3 + 2
    const int64_t take = M - m == 5 ? 3 : std::min<int64_t>(4, M - m);
    switch (take) {
      case 4: bf16_tile<4>(x + m * K, w, y + m * N, K, N); break;
      case 3: bf16_tile<3>(x + m * K, w, y + m * N, K, N); break;
      case 2: bf16_tile<2>(x + m * K, w, y + m * N, K, N); break;
      default: bf16_tile<1>(x + m * K, w, y + m * N, K, N); break;
    }
    m += take;
  }
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_gemv runs on CPU");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "bf16_gemv: x (M, K), w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_gemv: bfloat16 only");
  TORCH_CHECK(w.is_contiguous() && x.size(1) % 32 == 0, "bf16_gemv: contiguous w and K % 32 == 0");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());  // bf16: each fp32 sum rounds once, to nearest even
  const auto* X = reinterpret_cast<const c10::BFloat16*>(xc.data_ptr());
  const auto* W = reinterpret_cast<const c10::BFloat16*>(w.data_ptr());
  auto* Y = reinterpret_cast<c10::BFloat16*>(y.data_ptr());
  if (M > 1) {
    const int64_t tiled = N / TILE_ROWS * TILE_ROWS;
    at::parallel_for(0, N / TILE_ROWS, 32, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) bf16_tiles(X, W + b * TILE_ROWS * K, Y + b * TILE_ROWS, M, K, N);
    });
    for (int64_t n = tiled; n < N; ++n)
      for (int64_t m = 0; m < M; ++m) bf16_row(X + m * K, W + n * K, Y + m * N + n, K);
    return y;
  }
  const int64_t full = N / ROWS_BF16 * ROWS_BF16;
  at::parallel_for(0, N / ROWS_BF16, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) bf16_block(X, W + b * ROWS_BF16 * K, Y + b * ROWS_BF16, K);
  });
  for (int64_t n = full; n < N; ++n) bf16_row(X, W + n * K, Y + n, K);
  return y;
}
#endif

// ---- fp32 x fp32 (dense weights) ----------------------------------------------------------------------
// W (N, K) fp32 as stored. One accumulator per output, sequential over K in steps of 16, then one horizontal
// sum: the same order whether a row of x comes alone or with others (tiles of 4 weight rows x up to 4 x rows
// share their loads), so verification rows equal decode rows. ATen's fp32 `mm` / `mv` for one row streams
// the weight at ~10 GB/s on these CPUs; this ~4x that.
template <int MT, int R>
inline void f32_tile(const float* x, const float* w, float* y, int64_t K, int64_t N) {
  __m512 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_loadu_ps(w + r * K + k);
      for (int m = 0; m < MT; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) y[m * N + r] = hsum(acc[m][r]);
}

template <int R>
inline void f32_rows(const float* x, const float* w, float* y, int64_t M, int64_t K, int64_t N) {
  for (int64_t m = 0; m < M;) {
    const int64_t take = std::min<int64_t>(4, M - m);
    switch (take) {
      case 4: f32_tile<4, R>(x + m * K, w, y + m * N, K, N); break;
      case 3: f32_tile<3, R>(x + m * K, w, y + m * N, K, N); break;
      case 2: f32_tile<2, R>(x + m * K, w, y + m * N, K, N); break;
      default: f32_tile<1, R>(x + m * K, w, y + m * N, K, N); break;
    }
    m += take;
  }
}

at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "f32_gemv runs on CPU");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "f32_gemv: x (M, K), w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "f32_gemv: float32 only");
  TORCH_CHECK(w.is_contiguous() && x.size(1) % 16 == 0, "f32_gemv: contiguous w and K % 16 == 0");
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  const float* X = xc.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  constexpr int R = 4;  // weight rows per block: with up to 4 x rows, 16 accumulators
  at::parallel_for(0, N / R, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f32_rows<R>(X, W + b * R * K, Y + b * R, M, K, N);
  });
  for (int64_t n = N / R * R; n < N; ++n) f32_rows<1>(X, W + n * K, Y + n, M, K, N);
  return y;
}

// ---- decode glue: RMSNorm and rotary embedding in one call each ------------------------------------------
// Eager PyTorch spends ~7 dispatcher calls per RMSNorm and ~7 per rotary application; a small model's decode
// step is bound by that overhead. These reproduce HF's arithmetic order in the activation dtype T:
//   rms_norm: h = x * rsqrt(mean(x^2) + eps) in fp32, rounded to T, times the weight (rounded to T)
//   rotary:   x * cos + rotate_half(x) * sin, each product and the sum rounded to T (no FMA contraction)
template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& y) {
  const int64_t M = x.size(0), D = x.size(1);
  const T* X = reinterpret_cast<const T*>(x.data_ptr());
  const T* W = reinterpret_cast<const T*>(w.data_ptr());
  T* Y = reinterpret_cast<T*>(y.data_ptr());
  const int64_t xs = x.stride(0);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* row = X + m * xs;
      double ss = 0.0;  // fp64 accumulation: at least as exact as PyTorch's cascaded fp32 mean
      for (int64_t d = 0; d < D; ++d) {
        const float v = static_cast<float>(row[d]);
        ss += static_cast<double>(v * v);
      }
      const float mean = static_cast<float>(ss / static_cast<double>(D));
      const float inv = 1.0f / std::sqrt(mean + static_cast<float>(eps));
      for (int64_t d = 0; d < D; ++d) {
        const T h = round_to<T>(static_cast<float>(row[d]) * inv);
        Y[m * D + d] = round_to<T>(static_cast<float>(W[d]) * static_cast<float>(h));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(),
              "rms_norm: x (M, D) with unit column stride, weight (D,)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "rms_norm: x and weight must share a dtype");
  at::Tensor y = at::empty({x.size(0), x.size(1)}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat: rms_norm_impl<float>(x, w, eps, y); break;
    case at::kBFloat16: rms_norm_impl<c10::BFloat16>(x, w, eps, y); break;
    case at::kHalf: rms_norm_impl<c10::Half>(x, w, eps, y); break;
    default: TORCH_CHECK(false, "rms_norm: float32, bfloat16 or float16");
  }
  return y;
}

// silu(gate) * up as HF's MLP computes it in T: silu in fp32 (x / (1 + e^-x)) rounded to T, times up, rounded.
// One pass instead of ATen's silu and mul (and their dispatch); rows of a fused gate|up output are fine.
template <typename T>
void silu_mul_impl(const at::Tensor& g, const at::Tensor& u, at::Tensor& y) {
  const int64_t M = g.size(0), I = g.size(1), gs = g.stride(0), us = u.stride(0);
  const T* G = reinterpret_cast<const T*>(g.data_ptr());
  const T* U = reinterpret_cast<const T*>(u.data_ptr());
  T* Y = reinterpret_cast<T*>(y.data_ptr());
  const __m512 one = _mm512_set1_ps(1.f);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t i = 0; i < I; i += 16) {
        const __m512 x = load16(G + m * gs + i, I - i);
        const __m512 s = pocketllama::round_vec<T>(
            _mm512_div_ps(x, _mm512_add_ps(one, pocketllama::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x)))));
        pocketllama::store16(Y + m * I + i, _mm512_mul_ps(s, load16(U + m * us + i, I - i)), I - i);
      }
  });
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.stride(1) == 1 && up.stride(1) == 1 &&
              gate.scalar_type() == up.scalar_type() && gate.device().is_cpu() && up.device().is_cpu(),
              "silu_mul: gate and up (M, I) alike, unit column stride, on CPU");
  at::Tensor y = at::empty({gate.size(0), gate.size(1)}, gate.options());
  switch (gate.scalar_type()) {
    case at::kFloat: silu_mul_impl<float>(gate, up, y); break;
    case at::kBFloat16: silu_mul_impl<c10::BFloat16>(gate, up, y); break;
    case at::kHalf: silu_mul_impl<c10::Half>(gate, up, y); break;
    default: TORCH_CHECK(false, "silu_mul: float32, bfloat16 or float16");
  }
  return y;
}

template <typename T>
void rotary_impl(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t hd) {
  const int64_t M = x.size(0), heads = x.size(1) / hd, half = hd / 2, xs = x.stride(0);
  T* X = reinterpret_cast<T*>(x.data_ptr());
  const T* C = reinterpret_cast<const T*>(cos.data_ptr());
  const T* S = reinterpret_cast<const T*>(sin.data_ptr());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < heads; ++h) {
      T* v = X + m * xs + h * hd;
      const T* c = C + m * hd;
      const T* s = S + m * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = static_cast<float>(v[i]), b = static_cast<float>(v[i + half]);
        // out[i] = a*c[i] + (-b)*s[i]; out[i+half] = b*c[i+half] + a*s[i+half]
        const float lo = static_cast<float>(round_to<T>(a * static_cast<float>(c[i]))) +
                         static_cast<float>(round_to<T>(-b * static_cast<float>(s[i])));
        const float hi = static_cast<float>(round_to<T>(b * static_cast<float>(c[i + half]))) +
                         static_cast<float>(round_to<T>(a * static_cast<float>(s[i + half])));
        v[i] = round_to<T>(lo);
        v[i + half] = round_to<T>(hi);
      }
    }
}

void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % head_dim == 0 && head_dim % 2 == 0,
              "rotary_: x (M, heads * head_dim) with unit column stride");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == x.size(0) && cos.size(1) == head_dim &&
              cos.is_contiguous() && sin.is_contiguous(), "rotary_: cos/sin (M, head_dim), contiguous");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rotary_: cos/sin must share x's dtype");
  switch (x.scalar_type()) {
    case at::kFloat: rotary_impl<float>(x, cos, sin, head_dim); break;
    case at::kBFloat16: rotary_impl<c10::BFloat16>(x, cos, sin, head_dim); break;
    case at::kHalf: rotary_impl<c10::Half>(x, cos, sin, head_dim); break;
    default: TORCH_CHECK(false, "rotary_: float32, bfloat16 or float16");
  }
}

// ---- dequantization for prefill (many rows): weights -> float rows, then one GEMM ---------------------------
// Rows r0..r1 (multiples of the block rows) of an interleaved int4 / int8 weight as canonical (r1-r0, K) rows
// in `out`'s dtype, in one parallel pass: w = (q - 8) * s + z (int4, fused multiply-add), q * s (int8), in
// fp32 and rounded once: bit-identical to the pure-torch path's addcmul / mul.
// 32 float values (16 even columns `e`, 16 odd `o`) -> T, stored in column order at dst.
inline void store_pairs(const __m512 e, const __m512 o, float* dst) {
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  _mm512_storeu_ps(dst, _mm512_permutex2var_ps(e, lo, o));
  _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(e, hi, o));
}
#ifdef __AVX512BF16__
inline void store_pairs(const __m512 e, const __m512 o, c10::BFloat16* dst) {  // vcvtne2ps2bf16: nearest even
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_permutex2var_ps(e, hi, o), _mm512_permutex2var_ps(e, lo, o));
  _mm512_storeu_si512(dst, (__m512i)v);
}
#endif
template <typename T>
inline void store_pairs(const __m512 e, const __m512 o, T* dst) {
  alignas(64) float tmp[32];
  store_pairs(e, o, tmp);
  for (int i = 0; i < 32; ++i) dst[i] = static_cast<T>(tmp[i]);  // round to nearest even, as ATen
}

template <typename S, typename T>
void int4_dequant_impl(const uint8_t* W, const S* Sc, const S* Z, T* out, int64_t r0, int64_t r1, int64_t K,
                       int64_t G) {
  constexpr int R = ROWS_INT4;
  const int64_t half = K / 2, gs = K / G;  // gs >= 32: each 16-byte half-chunk (32 values) is in one group
  const __m512 eight = _mm512_set1_ps(8.f);
  const __m512i mask = _mm512_set1_epi32(0xF);
  at::parallel_for(r0 / R, r1 / R, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* wb = W + b * R * half;
      for (int64_t c = 0; c < half / 32; ++c)
        for (int r = 0; r < R; ++r) {
          const int64_t n = b * R + r;
          for (int h = 0; h < 2; ++h) {
            const int64_t g = (c * 64 + 32 * h) / gs;
            const __m512 sv = _mm512_set1_ps(static_cast<float>(Sc[n * G + g]));
            const __m512 zv = _mm512_set1_ps(Z ? static_cast<float>(Z[n * G + g]) : 0.f);
            const __m512i v = _mm512_cvtepu8_epi32(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + c * 32 * R + r * 32 + 16 * h)));
            // (q - 8) * s + z fused (one rounding), like ATen's vectorized addcmul
            const __m512 e = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, mask)), eight), sv, zv);
            const __m512 o = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), eight), sv, zv);
            store_pairs(e, o, out + (n - r0) * K + c * 64 + 32 * h);
          }
        }
    }
  });
}

template <typename S, typename T>
void int8_dequant_impl(const int8_t* W, const S* Sc, T* out, int64_t r0, int64_t r1, int64_t K, int64_t G) {
  constexpr int R = ROWS_INT8;
  const int64_t gs = K / G;  // a multiple of 16 (the interleaved layout's condition)
  at::parallel_for(r0 / R, r1 / R, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* wb = W + b * R * K;
      for (int64_t c = 0; c < K / 64; ++c)
        for (int r = 0; r < R; ++r) {
          const int64_t n = b * R + r;
          for (int q = 0; q < 4; ++q) {
            const int64_t k = c * 64 + 16 * q;
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + c * 64 * R + r * 64 + 16 * q));
            const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)),
                                           _mm512_set1_ps(static_cast<float>(Sc[n * G + k / gs])));
            pocketllama::store16(out + (n - r0) * K + k, v, 16);  // rounded as static_cast<T>
          }
        }
    }
  });
}

template <typename F>
void dispatch_out(const at::Tensor& out, F&& f) {
  switch (out.scalar_type()) {
    case at::kFloat: f(out.data_ptr<float>()); break;
    case at::kBFloat16: f(reinterpret_cast<c10::BFloat16*>(out.data_ptr())); break;
    case at::kHalf: f(reinterpret_cast<c10::Half*>(out.data_ptr())); break;
    default: TORCH_CHECK(false, "dequant: output must be float32, bfloat16 or float16");
  }
}

template <typename F>
void dispatch_scales(const at::Tensor& s, F&& f) {
  switch (s.scalar_type()) {
    case at::kFloat: f(s.data_ptr<float>()); break;
    case at::kBFloat16: f(reinterpret_cast<const c10::BFloat16*>(s.data_ptr())); break;
    case at::kHalf: f(reinterpret_cast<const c10::Half*>(s.data_ptr())); break;
    default: TORCH_CHECK(false, "dequant: scales must be float32, bfloat16 or float16");
  }
}

void int4_dequant(const at::Tensor& w, const at::Tensor& s, const std::optional<at::Tensor>& zeros, int64_t r0,
                  int64_t r1, at::Tensor out) {
  const at::Tensor z = zeros.value_or(at::Tensor());
  const int64_t N = s.size(0), G = s.size(1), K = out.size(1);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.numel() * 2 == N * K && K % 64 == 0,
              "int4_dequant: interleaved uint8 weight (N, K/2)");
  TORCH_CHECK(s.is_contiguous() && (!z.defined() || (z.sizes() == s.sizes() && z.scalar_type() == s.scalar_type() &&
                                                     z.is_contiguous())), "int4_dequant: scales/zeros (N, G) alike");
  TORCH_CHECK(r0 % ROWS_INT4 == 0 && r1 % ROWS_INT4 == 0 && 0 <= r0 && r0 <= r1 && r1 <= N && out.is_contiguous() &&
              out.size(0) == r1 - r0 && K % G == 0, "int4_dequant: rows in whole blocks, out (r1 - r0, K)");
  dispatch_scales(s, [&](auto* sp) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(sp)>>;
    const S* zp = z.defined() ? reinterpret_cast<const S*>(z.data_ptr()) : nullptr;
    dispatch_out(out, [&](auto* op) { int4_dequant_impl(w.data_ptr<uint8_t>(), sp, zp, op, r0, r1, K, G); });
  });
}

void int8_dequant(const at::Tensor& w, const at::Tensor& s, int64_t r0, int64_t r1, at::Tensor out) {
  const int64_t N = s.size(0), G = s.size(1), K = out.size(1);
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous() && w.numel() == N * K && K % 64 == 0,
              "int8_dequant: interleaved int8 weight (N, K)");
  TORCH_CHECK(s.is_contiguous() && r0 % ROWS_INT8 == 0 && r1 % ROWS_INT8 == 0 && 0 <= r0 && r0 <= r1 && r1 <= N &&
              out.is_contiguous() && out.size(0) == r1 - r0 && K % G == 0,
              "int8_dequant: rows in whole blocks, out (r1 - r0, K)");
  dispatch_scales(s, [&](auto* sp) {
    dispatch_out(out, [&](auto* op) { int8_dequant_impl(w.data_ptr<int8_t>(), sp, op, r0, r1, K, G); });
  });
}

at::Tensor as_float_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "pocketllama gemv: x must be 2-D (M, K), got ", x.dim(), "-D");
  return x.to(at::kFloat).contiguous();
}

template <typename S>
void int8_impl(const at::Tensor& xf, const at::Tensor& w, const at::Tensor& s, at::Tensor& y) {
  const int64_t M = xf.size(0), K = xf.size(1), N = s.size(0), G = s.size(1);
  const float* X = xf.data_ptr<float>();
  const int8_t* W = w.data_ptr<int8_t>();
  const S* Sc = reinterpret_cast<const S*>(s.data_ptr());
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N / ROWS_INT8, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m = 0; m < M; ++m)
        int8_block<S>(X + m * K, W + b * ROWS_INT8 * K, Sc + b * ROWS_INT8 * G, Y + m * N + b * ROWS_INT8, K, G);
  });
}

template <typename S>
void int4_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = s.size(0), G = s.size(1), half = K / 2;
  // (M, K) -> even / odd columns (M, K/2) each (bf16 stays bf16 for vdpbf16ps), and fp32 group sums (M, G),
  // in one pass without ATen temporaries (decode calls this ~200 times per token; overhead counts)
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor xe = at::empty({M, half}, x.options()), xo = at::empty({M, half}, x.options());
  at::Tensor xs = at::empty({M, G}, x.options().dtype(at::kFloat));
  const int64_t gs = K / G;
  for (int64_t m = 0; m < M; ++m) {
    float* sums = xs.data_ptr<float>() + m * G;
    if (bf16) {
      const auto* src = reinterpret_cast<const c10::BFloat16*>(x.data_ptr()) + m * K;
      auto* e = reinterpret_cast<c10::BFloat16*>(xe.data_ptr()) + m * half;
      auto* o = reinterpret_cast<c10::BFloat16*>(xo.data_ptr()) + m * half;
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.f;
        for (int64_t j = g * gs / 2; j < (g + 1) * gs / 2; ++j) {
          e[j] = src[2 * j];
          o[j] = src[2 * j + 1];
          acc += static_cast<float>(src[2 * j]) + static_cast<float>(src[2 * j + 1]);
        }
        sums[g] = acc;
      }
    } else {
      const float* src = x.data_ptr<float>() + m * K;
      float* e = xe.data_ptr<float>() + m * half;
      float* o = xo.data_ptr<float>() + m * half;
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.f;
        for (int64_t j = g * gs / 2; j < (g + 1) * gs / 2; ++j) {
          e[j] = src[2 * j];
          o[j] = src[2 * j + 1];
          acc += src[2 * j] + src[2 * j + 1];
        }
        sums[g] = acc;
      }
    }
  }
  const float* XS = xs.data_ptr<float>();
  const uint8_t* W = w.data_ptr<uint8_t>();
  const S* Sc = reinterpret_cast<const S*>(s.data_ptr());
  const S* Z = z.defined() ? reinterpret_cast<const S*>(z.data_ptr()) : nullptr;
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N / ROWS_INT4, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * ROWS_INT4;
      for (int64_t m = 0; m < M; ++m) {
#ifdef __AVX512BF16__
        if (bf16) {
          const auto* e = reinterpret_cast<const c10::BFloat16*>(xe.data_ptr()) + m * half;
          const auto* o = reinterpret_cast<const c10::BFloat16*>(xo.data_ptr()) + m * half;
          int4_block_bf16<S>(e, o, XS + m * G, W + n * half, Sc + n * G, Z ? Z + n * G : nullptr, Y + m * N + n, K, G);
          continue;
        }
#endif
        int4_block<S>(xe.data_ptr<float>() + m * half, xo.data_ptr<float>() + m * half, XS + m * G, W + n * half,
                      Sc + n * G, Z ? Z + n * G : nullptr, Y + m * N + n, K, G);
      }
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t rows, const char* what) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && s.device().is_cpu(), what, " runs on CPU");
  TORCH_CHECK(x.dim() == 2, what, ": x must be 2-D (M, K)");
  TORCH_CHECK(w.is_contiguous() && s.dim() == 2 && s.is_contiguous(), what, ": weight and scales must be contiguous");
  const int64_t N = s.size(0), K = x.size(1), G = s.size(1);
  TORCH_CHECK(N % rows == 0 && K % 64 == 0, what, ": needs rows % ", rows, " == 0 and K % 64 == 0, got N=", N,
              " K=", K);
  TORCH_CHECK(K % G == 0 && G <= MAX_GROUPS, what, ": ", G, " groups do not split a row of ", K);
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) {
  check(x, w, s, ROWS_INT8, "int8_gemv");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.numel() == s.size(0) * x.size(1), "int8_gemv: weight must be int8 N*K");
  TORCH_CHECK((x.size(1) / s.size(1)) % 16 == 0, "int8_gemv: groups must be a multiple of 16 values");
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({xf.size(0), s.size(0)}, xf.options());
  switch (s.scalar_type()) {
    case at::kFloat: int8_impl<float>(xf, w, s, y); break;
    case at::kBFloat16: int8_impl<c10::BFloat16>(xf, w, s, y); break;
    case at::kHalf: int8_impl<c10::Half>(xf, w, s, y); break;
    default: TORCH_CHECK(false, "int8_gemv: scales must be float32, bfloat16 or float16");
  }
  return y.to(x.scalar_type());
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z) {
  check(x, w, s, ROWS_INT4, "int4_gemv");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.numel() * 2 == s.size(0) * x.size(1),
              "int4_gemv: weight must be uint8 N*K/2 (two int4 per byte)");
  TORCH_CHECK(!z.defined() || (z.sizes() == s.sizes() && z.scalar_type() == s.scalar_type() && z.is_contiguous()),
              "int4_gemv: zeros must match scales");
  TORCH_CHECK((x.size(1) / s.size(1)) % 32 == 0, "int4_gemv: groups must be a multiple of 32 values");
#ifdef __AVX512BF16__
  const bool bf16 = x.scalar_type() == at::kBFloat16;
#else
  const bool bf16 = false;
#endif
  at::Tensor xin = bf16 ? x.contiguous() : x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x.size(0), s.size(0)}, x.options().dtype(at::kFloat));
  switch (s.scalar_type()) {
    case at::kFloat: int4_impl<float>(xin, w, s, z, y); break;
    case at::kBFloat16: int4_impl<c10::BFloat16>(xin, w, s, z, y); break;
    case at::kHalf: int4_impl<c10::Half>(xin, w, s, z, y); break;
    default: TORCH_CHECK(false, "int4_gemv: scales must be float32, bfloat16 or float16");
  }
  return y.to(x.scalar_type());
}

}  // namespace

namespace pocketllama::ops {
#ifdef __AVX512BF16__
at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w) { return ::bf16_gemv(x, w); }
#endif
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s) { return ::int8_gemv(x, w, s); }
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z) {
  return ::int4_gemv(x, w, s, z);
}
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) { return ::rms_norm(x, w, eps); }
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) { return ::silu_mul(gate, up); }
at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w) { return ::f32_gemv(x, w); }
void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  ::rotary_(x, cos, sin, head_dim);
}
}  // namespace pocketllama::ops

TORCH_LIBRARY(pocketllama_quant, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor w, Tensor scales, Tensor? zeros) -> Tensor");
#ifdef __AVX512BF16__
  m.def("bf16_gemv(Tensor x, Tensor w) -> Tensor");
#endif
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("f32_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("int4_dequant(Tensor w, Tensor scales, Tensor? zeros, int r0, int r1, Tensor(a!) out) -> ()");
  m.def("int8_dequant(Tensor w, Tensor scales, int r0, int r1, Tensor(a!) out) -> ()");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin, int head_dim) -> ()");
}

TORCH_LIBRARY_IMPL(pocketllama_quant, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                         const std::optional<at::Tensor>& z) { return int4_gemv(x, w, s, z.value_or(at::Tensor())); });
#ifdef __AVX512BF16__
  m.impl("bf16_gemv", &bf16_gemv);
#endif
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("f32_gemv", &f32_gemv);
  m.impl("int4_dequant", &int4_dequant);
  m.impl("int8_dequant", &int8_dequant);
  m.impl("rotary_", &rotary_);
}
