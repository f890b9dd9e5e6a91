// Shared AVX-512 helpers of pocketllama's CPU kernels: 16 values (or the first n) of a float / bfloat16 /
// float16 row as fp32.
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

}  // namespace pocketllama
