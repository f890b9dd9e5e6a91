// pocketllama int8-activation x int4-weight GEMV for CPUs with AVX-512 VNNI (the `activations: "int8"` recipe
// mode): each row of x is quantized to int8 in blocks of 32 values (scale = max|x| / 127, like llama.cpp's
// Q8_0), and each vpdpbusd multiplies 64 weight nibbles by 64 int8 activations into int32, so a 64-weight chunk
// of two rows costs ~10 vector ops instead of the fp32 / bf16 kernels' ~16 per row (gemv.cpp), which makes the
// int4 GEMV memory-bound instead of compute-bound on small cores.
// Weights: the int4 kernels' interleaved layout (gemv.cpp): uint8 (N/4, K/64, 4, 32), low nibble = even column,
// scales/zeros (N, G), w = (q - 8) * s + z. Per group of row n:
//   sum_k w_k x_k ~= s * sum_b dx_b * (q . xq)_b + (z - 8 s) * sum_k x_k      (b: 32-value blocks of x)
// with the zero-point term from exact fp32 sums of x. Each output row's arithmetic does not depend on M, so
// a verification batch of several rows computes exactly what one-row decode does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

#ifdef __AVX512VNNI__
constexpr int ROWS = 4;  // rows per interleaved block (kernels.py INTERLEAVE["int4"])

// ---- activations -------------------------------------------------------------------------------------
// One row of x (K floats) -> int8 even / odd columns in the weights' byte order (byte j of a 64-column chunk
// holds columns 2j, 2j+1), the per-lane block scales of each chunk (dxe: 16 floats per chunk, lane l of a
// 512-bit product covers columns 8 (l % 8) .. + 7 of its row's chunk) and exact per-weight-group sums xs.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

template <typename T>
void quantize_row(const T* x, int64_t K, int64_t gs, int8_t* xe, int8_t* xo, float* dxe, int32_t* neg8, float* xs) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const int64_t blocks = K / 32, per_group = gs / 32;
  float dx[2] = {0.f, 0.f};
  for (int64_t g = 0; g < blocks; ++g) {
    const __m512 a = load16(x + 32 * g), b = load16(x + 32 * g + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float sum = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    if (g % per_group == 0) xs[g / per_group] = 0.f;
    xs[g / per_group] += sum;
    const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    const __m512 iv = _mm512_set1_ps(inv);
    const __m512i e = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, even, b), iv));
    const __m512i o = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_permutex2var_ps(a, odd, b), iv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xe + 16 * g), _mm512_cvtsepi32_epi8(e));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xo + 16 * g), _mm512_cvtsepi32_epi8(o));
    dx[g % 2] = d;
    if (g % 2 == 1) {  // chunk g / 2: lanes 0-3 and 8-11 are block 2c, lanes 4-7 and 12-15 block 2c + 1
      const __m512 lo = _mm512_set1_ps(dx[0]), hi = _mm512_set1_ps(dx[1]);
      _mm512_storeu_ps(dxe + 16 * (g / 2), _mm512_mask_blend_ps(0xF0F0, lo, hi));
      // -8 * (the sum of the 8 activations each lane multiplies): starting the lanes' int32 dot products
      // there turns sum q * xq into sum (q - 8) * xq at no cost in the weight loop
      const int64_t c = g / 2;
      const __m512i eight = _mm512_set1_epi8(8);
      const __m512i ev = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe + 32 * c)));
      const __m512i ov = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xo + 32 * c)));
      const __m512i s8 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, ev), eight, ov);
      _mm512_storeu_si512(neg8 + 16 * c, _mm512_sub_epi32(_mm512_setzero_si512(), s8));
    }
  }
}

// ---- weights -----------------------------------------------------------------------------------------
inline __m256 load8(const float* p, int n) { return _mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1), p); }
inline __m256 load8(const c10::BFloat16* p, int n) {
  const __m128i v = _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << n) - 1), p);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m256 load8(const c10::Half* p, int n) {
  return _mm256_cvtph_ps(_mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << n) - 1), p));
}
// up to 8 group scales of rows r and r + 1 starting at group g0: lanes 0-7 row r, 8-15 row r + 1
template <typename S>
inline __m512 scales_2rows(const S* s, int64_t G, int64_t g0) {
  const int n = static_cast<int>(std::min<int64_t>(8, G - g0));
  return _mm512_insertf32x8(_mm512_castps256_ps512(load8(s + g0, n)), load8(s + G + g0, n), 1);
}
inline float low_half(__m512 v) { return _mm512_mask_reduce_add_ps(0x00FF, v); }
inline float high_half(__m512 v) { return _mm512_mask_reduce_add_ps(0xFF00, v); }

// sum_g z_g * xs_g of one row: the zero-point term
template <typename S>
inline float zero_term(const S* z, const float* xs, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, G - g));
    acc = _mm256_fmadd_ps(load8(z + g, n), _mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1), xs + g), acc);
  }
  return _mm512_reduce_add_ps(_mm512_zextps256_ps512(acc));
}

// y[0..3] for one block of 4 rows. idx[cc]: lane -> scale-vector lane for chunk cc of a span of chunks that
// share one load of 8 group scales per row (span = gs / 8 chunks).
template <typename S>
inline void block_a8(const int8_t* xe, const int8_t* xo, const float* dxe, const int32_t* neg8, const float* xs,
                     const uint8_t* wb, const S* s, const S* z, float* y, int64_t K, int64_t G, int64_t gs,
                     const __m512i* idx) {
  const int64_t C = K / 64, span = gs / 8;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 t01 = _mm512_setzero_ps(), t23 = _mm512_setzero_ps(), s01 = t01, s23 = t23;
  for (int64_t c = 0, cc = 0; c < C; ++c, cc = cc + 1 == span ? 0 : cc + 1) {
    if (cc == 0) {
      const int64_t g0 = c * 64 / gs;
      s01 = scales_2rows(s, G, g0);
      s23 = scales_2rows(s + 2 * G, G, g0);
    }
    const uint8_t* wc = wb + c * 32 * ROWS;
    _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * 32 * ROWS), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(wc + 8 * 32 * ROWS + 64), _MM_HINT_T0);
    const __m512i ev = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xe + 32 * c)));
    const __m512i ov = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xo + 32 * c)));
    const __m512 d = _mm512_loadu_ps(dxe + 16 * c);
    const __m512i start = _mm512_loadu_si512(neg8 + 16 * c);
    const __m512i w01 = _mm512_loadu_si512(wc), w23 = _mm512_loadu_si512(wc + 64);
    __m512i i01 = _mm512_dpbusd_epi32(start, _mm512_and_si512(w01, low), ev);
    __m512i i23 = _mm512_dpbusd_epi32(start, _mm512_and_si512(w23, low), ev);
    i01 = _mm512_dpbusd_epi32(i01, _mm512_and_si512(_mm512_srli_epi16(w01, 4), low), ov);
    i23 = _mm512_dpbusd_epi32(i23, _mm512_and_si512(_mm512_srli_epi16(w23, 4), low), ov);
    t01 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(i01), d), _mm512_permutexvar_ps(idx[cc], s01), t01);
    t23 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(i23), d), _mm512_permutexvar_ps(idx[cc], s23), t23);
  }
  y[0] = low_half(t01) + zero_term(z, xs, G);
  y[1] = high_half(t01) + zero_term(z + G, xs, G);
  y[2] = low_half(t23) + zero_term(z + 2 * G, xs, G);
  y[3] = high_half(t23) + zero_term(z + 3 * G, xs, G);
}

template <typename S>
void impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = s.size(0), G = s.size(1), gs = K / G, span = gs / 8;
  std::vector<int8_t> xe(M * K / 2), xo(M * K / 2);
  std::vector<float> dxe(M * K / 4), xs(M * G);
  std::vector<int32_t> neg8(M * K / 4);
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x.data_ptr<float>() + m * K, K, gs, xe.data() + m * K / 2, xo.data() + m * K / 2,
                 dxe.data() + m * K / 4, neg8.data() + m * K / 4, xs.data() + m * G);
  alignas(64) int32_t lanes[16];
  std::vector<__m512i> idx(span);
  for (int64_t cc = 0; cc < span; ++cc) {
    for (int l = 0; l < 16; ++l) lanes[l] = 8 * (l / 8) + static_cast<int32_t>((64 * cc + 8 * (l % 8)) / gs);
    idx[cc] = _mm512_load_si512(lanes);
  }
  const uint8_t* W = w.data_ptr<uint8_t>();
  const S* Sc = reinterpret_cast<const S*>(s.data_ptr());
  const S* Z = reinterpret_cast<const S*>(z.data_ptr());
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N / ROWS, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * ROWS;
      for (int64_t m = 0; m < M; ++m)
        block_a8<S>(xe.data() + m * K / 2, xo.data() + m * K / 2, dxe.data() + m * K / 4, neg8.data() + m * K / 4,
                    xs.data() + m * G,
                    W + n * K / 2, Sc + n * G, Z + n * G, Y + m * N + n, K, G, gs, idx.data());
    }
  });
}

at::Tensor int4_gemv_a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && s.device().is_cpu(), "int4_gemv_a8 runs on CPU");
  TORCH_CHECK(x.dim() == 2 && s.dim() == 2 && w.is_contiguous() && s.is_contiguous() && z.is_contiguous() &&
              z.sizes() == s.sizes() && z.scalar_type() == s.scalar_type(),
              "int4_gemv_a8: x (M, K), contiguous weight, scales and zeros (N, G)");
  const int64_t N = s.size(0), K = x.size(1), G = s.size(1);
  TORCH_CHECK(N % ROWS == 0 && K % 64 == 0 && K % G == 0, "int4_gemv_a8: needs N % 4 == 0, K % 64 == 0, got N=",
              N, " K=", K);
  const int64_t gs = K / G;
  TORCH_CHECK(gs == 32 || (gs % 64 == 0 && gs <= 256), "int4_gemv_a8: groups of 32, 64, 128 or 256 values, got ", gs);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.numel() * 2 == N * K, "int4_gemv_a8: weight must be uint8 N*K/2");
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({x.size(0), N}, xf.options());
  switch (s.scalar_type()) {
    case at::kFloat: impl<float>(xf, w, s, z, y); break;
    case at::kBFloat16: impl<c10::BFloat16>(xf, w, s, z, y); break;
    case at::kHalf: impl<c10::Half>(xf, w, s, z, y); break;
    default: TORCH_CHECK(false, "int4_gemv_a8: scales must be float32, bfloat16 or float16");
  }
  return y.to(x.scalar_type());
}
#endif

}  // namespace

#ifdef __AVX512VNNI__
TORCH_LIBRARY_FRAGMENT(pocketllama_quant, m) {
  m.def("int4_gemv_a8(Tensor x, Tensor w, Tensor scales, Tensor zeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(pocketllama_quant, CPU, m) { m.impl("int4_gemv_a8", &int4_gemv_a8); }
#endif
