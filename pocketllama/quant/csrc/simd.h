// Shared AVX-512 helpers of pocketllama's CPU kernels: 16 values (or the first n) of a float / bfloat16 /
// float16 row as fp32 and back (rounded as c10 rounds), and e^x.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>
#include <immintrin.h>

namespace pocketllama {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the high half of an fp32
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// the first min(n, 16) lanes
inline __mmask16 tail(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
inline __m512 load16(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(tail(n), p); }
inline __m512 load16(const c10::BFloat16* p, int64_t n) {
  const __m256i v = _mm256_maskz_loadu_epi16(tail(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline __m512 load16(const c10::Half* p, int64_t n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail(n), p)); }

// The bits of x rounded to bfloat16 as c10::BFloat16 rounds (nearest even, NaN -> 0x7FC0), in the high halves
// of the lanes (denormals kept, which the hardware conversion would flush).
inline __m512i bf16_bits(__m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(b, bias), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}

// 16 values rounded to T (nearest even) and back to fp32, as static_cast<T> lane by lane.
template <typename T>
inline __m512 round_vec(__m512 x);
template <>
inline __m512 round_vec<float>(__m512 x) { return x; }
template <>
inline __m512 round_vec<c10::BFloat16>(__m512 x) { return _mm512_castsi512_ps(bf16_bits(x)); }
template <>
inline __m512 round_vec<c10::Half>(__m512 x) { return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)); }

// The first min(n, 16) lanes of x stored as T (rounded as static_cast<T>).
inline void store16(float* p, __m512 x, int64_t n) { _mm512_mask_storeu_ps(p, tail(n), x); }
inline void store16(c10::BFloat16* p, __m512 x, int64_t n) {
  _mm256_mask_storeu_epi16(p, tail(n), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(x), 16)));
}
inline void store16(c10::Half* p, __m512 x, int64_t n) {
  _mm256_mask_storeu_epi16(p, tail(n), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// e^x lane by lane: 2^n e^r with |r| <= ln2 / 2 and a degree-7 Taylor polynomial (relative error < 1e-8, under
// half an fp32 ulp before rounding); overflows to inf, underflows to 0, NaN stays NaN.
inline __m512 exp_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

}  // namespace pocketllama
