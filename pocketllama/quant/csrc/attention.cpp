// pocketllama decode attention for CPUs with AVX-512: write a few new tokens' keys/values into the static KV
// cache and attend their queries against it, in one call (eager PyTorch needs ~15 dispatcher calls and two
// small bmm per layer, which dominate a small model's decode step).
//   q (B, T, H*hd), k/v (B, T, KV*hd): the projections of the new tokens (row views of a fused output are fine)
//   cache_k/cache_v (Bc, KV, S, hd) contiguous; rows (B,) cache row of each input row; positions (B, T)
// Query (b, t) of head h attends slots 0..positions[b, t] of kv head h / (H / KV) (heads of a group are
// consecutive, as repeat_interleave). Arithmetic follows HF's eager attention in the activation dtype T:
//   s = round_T(q.k) (fp32 accumulation), s = round_T(s * scale), p = round_T(softmax_fp32(s)),
//   out = round_T(sum p v) (fp32 accumulation)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include "ops.h"
#include "simd.h"

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using pocketllama::load16;

template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

using pocketllama::round_vec;

// v[j] -> lane j of the result holds the sum of v[j]'s lanes: 16 horizontal sums as one transposed reduction.
__attribute__((always_inline)) inline __m512 hsum16(const __m512* v) {
  __m512 w[8], u[4], z[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: the four vectors' lane sums
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// e^x for x <= 0 (softmax numerators)
inline __m512 exp_neg(__m512 x) {
  return pocketllama::exp_ps(_mm512_max_ps(x, _mm512_set1_ps(-103.f)));  // e^-103 is below the smallest subnormal
}

// 16 keys' q.k partial sums (a[j]: 16 lanes each) -> scores round(round(q.k) * sc) at p; running maximum in top.
template <typename T>
__attribute__((always_inline)) inline void store_scores(const __m512* a, float sc, float* p, __m512& top) {
  const __m512 x = round_vec<T>(_mm512_mul_ps(round_vec<T>(hsum16(a)), _mm512_set1_ps(sc)));
  _mm512_storeu_ps(p, x);
  top = _mm512_max_ps(top, x);
}

// Softmax of one head's n scores (in pg, overwritten by the exponentials): e^(x - top) / sum, each probability
// rounded to T; store(at, mask, w) receives the rounded probabilities 16 at a time (lanes past n are 0).
template <typename T, typename Store>
inline void softmax_rounded(float* pg, int64_t n, float top, Store&& store) {
  const __m512 tv = _mm512_set1_ps(top);
  __m512 sums = _mm512_setzero_ps();
  for (int64_t s = 0; s < n; s += 16) {
    const __mmask16 m = pocketllama::tail(n - s);
    const __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, pg + s), tv));
    _mm512_mask_storeu_ps(pg + s, m, e);
    sums = _mm512_mask_add_ps(sums, m, sums, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sums));
  for (int64_t s = 0; s < n; s += 16) {
    const __mmask16 m = pocketllama::tail(n - s);
    store(s, m, round_vec<T>(_mm512_maskz_mul_ps(m, _mm512_maskz_loadu_ps(m, pg + s), inv)));
  }
}

// p v for E heads at once over kn keys: r (E x hd fp32 accumulators in memory) += p_e[j] * v[j], v rows already fp32
// in `vb`. E heads give E x chunks independent FMA chains.
template <int E, int HD>
inline void accumulate(float* acc, const float* p, int64_t np, const float* vb, int64_t kn, int64_t hd) {
  const int64_t chunks = HD ? HD : hd / 16;
  __m512 r[E][HD ? HD : 16];
  for (int e = 0; e < E; ++e)
    for (int64_t c = 0; c < chunks; ++c) r[e][c] = _mm512_loadu_ps(acc + e * hd + 16 * c);
  for (int64_t j = 0; j < kn; ++j)
    for (int e = 0; e < E; ++e) {
      const __m512 w = _mm512_set1_ps(p[e * np + j]);
      for (int64_t c = 0; c < chunks; ++c) r[e][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vb + j * hd + 16 * c), r[e][c]);
    }
  for (int e = 0; e < E; ++e)
    for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(acc + e * hd + 16 * c, r[e][c]);
}

// The G query heads of one kv head (GQA) against its n cached keys/values: per head
// out = softmax(round(round(q.k) * sc)) v, the probabilities rounded to T before the weighted sum (HF eager).
// Keys and values are converted to fp32 once per block of 16 and shared by the G heads.
// qf: G x hd query rows (fp32); p: G rows of np floats; kv: 16 x hd fp32; acc: G x hd fp32. HD: head_dim / 16
// (0: any).
template <typename T, int HD>
void attend_group(const float* qf, int64_t G, const T* keys, const T* vals, int64_t n, int64_t hd, float sc,
                  float* p, int64_t np, float* kv, float* acc, T* const* orows) {
  constexpr int MAX_G = 8;  // the caller splits larger groups
  const int64_t chunks = HD ? HD : hd / 16;
  __m512 tops[MAX_G];
  float tail_top[MAX_G];
  for (int64_t g = 0; g < G; ++g) tops[g] = _mm512_set1_ps(-INFINITY), tail_top[g] = -INFINITY;
  int64_t s = 0;
  for (; s + 16 <= n; s += 16) {  // scores, 16 keys at a time
    for (int j = 0; j < 16; ++j)
      for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(kv + j * hd + 16 * c, load16(keys + (s + j) * hd + 16 * c));
    for (int64_t g = 0; g < G; ++g) {
      const float* q = qf + g * hd;
      __m512 a[16];
      for (int j = 0; j < 16; ++j) {
        a[j] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c)
          a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), _mm512_loadu_ps(kv + j * hd + 16 * c), a[j]);
      }
      store_scores<T>(a, sc, p + g * np + s, tops[g]);
    }
  }
  for (; s < n; ++s)  // the last keys one at a time
    for (int64_t g = 0; g < G; ++g) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * hd + 16 * c), load16(keys + s * hd + 16 * c), a);
      const float x = round_to<T>(round_to<T>(_mm512_reduce_add_ps(a)) * sc);
      p[g * np + s] = x;
      tail_top[g] = x > tail_top[g] ? x : tail_top[g];
    }
  for (int64_t g = 0; g < G; ++g) {  // softmax per head, the probabilities rounded to T, in place
    float* pg = p + g * np;
    softmax_rounded<T>(pg, n, std::max(tail_top[g], _mm512_reduce_max_ps(tops[g])),
                       [&](int64_t at, __mmask16 m, __m512 w) { _mm512_mask_storeu_ps(pg + at, m, w); });
  }
  std::fill(acc, acc + G * hd, 0.f);
  for (s = 0; s < n; s += 16) {  // sum p v: values converted once per block, heads two at a time
    const int64_t kn = std::min<int64_t>(16, n - s);
    for (int64_t j = 0; j < kn; ++j)
      for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(kv + j * hd + 16 * c, load16(vals + (s + j) * hd + 16 * c));
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) accumulate<2, HD>(acc + g * hd, p + g * np + s, np, kv, kn, hd);
    if (g < G) accumulate<1, HD>(acc + g * hd, p + g * np + s, np, kv, kn, hd);
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < chunks; ++c) pocketllama::store16(orows[g] + 16 * c, _mm512_loadu_ps(acc + g * hd + 16 * c), 16);
}

#ifdef __AVX512BF16__
// p v for E heads over `pairs` key pairs: vp holds the values interleaved by key pair (32-bit lane = the same
// dimension of two keys), pb the heads' probabilities as bf16; acc per head in the pair-permuted order.
template <int E, int C2>
inline void accumulate_bf16(float* acc, const uint16_t* pb, int64_t np, const __m512i* vp, int64_t pairs) {
  constexpr int64_t hd = 32 * C2;
  __m512 r[E][2 * C2];
  for (int e = 0; e < E; ++e)
    for (int k = 0; k < 2 * C2; ++k) r[e][k] = _mm512_loadu_ps(acc + e * hd + 16 * k);
  for (int64_t j = 0; j < pairs; ++j)
    for (int e = 0; e < E; ++e) {
      int32_t two;  // p of keys 2j (low half) and 2j + 1 (high half)
      std::memcpy(&two, pb + e * np + 2 * j, 4);
      const __m512bh w = (__m512bh)_mm512_set1_epi32(two);
      for (int k = 0; k < 2 * C2; ++k) r[e][k] = _mm512_dpbf16_ps(r[e][k], (__m512bh)vp[j * 2 * C2 + k], w);
    }
  for (int e = 0; e < E; ++e)
    for (int k = 0; k < 2 * C2; ++k) _mm512_storeu_ps(acc + e * hd + 16 * k, r[e][k]);
}

// attend_group for bfloat16 caches: each vdpbf16ps does 32 multiply-adds on the stored bf16 values (products
// of bf16 values are exact in fp32; only the summation order differs), so keys need no conversion, and values
// are interleaved by key pair once per block of 16 for all G heads. q: the G query rows (bf16, consecutive).
// C2: head_dim / 32. pb: G rows of np bf16 probabilities; vp: 8 x 2 C2 vectors; acc: G x hd fp32.
template <int C2>
void attend_group_bf16(const c10::BFloat16* q, int64_t G, const c10::BFloat16* keys, const c10::BFloat16* vals,
                       int64_t n, float sc, float* p, uint16_t* pb, int64_t np, __m512i* vp, float* acc,
                       c10::BFloat16* const* orows) {
  constexpr int MAX_G = 8;
  constexpr int64_t hd = 32 * C2;
  using BF = c10::BFloat16;
  auto bh = [](const BF* ptr) { return (__m512bh)_mm512_loadu_si512(ptr); };
  __m512 tops[MAX_G];
  float tail_top[MAX_G];
  for (int64_t g = 0; g < G; ++g) tops[g] = _mm512_set1_ps(-INFINITY), tail_top[g] = -INFINITY;
  int64_t s = 0;
  for (; s + 16 <= n; s += 16)  // scores, 16 keys at a time
    for (int64_t g = 0; g < G; ++g) {
      __m512bh qv[C2];
      for (int c = 0; c < C2; ++c) qv[c] = bh(q + g * hd + 32 * c);
      __m512 a[16];
      for (int j = 0; j < 16; ++j) {
        a[j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), bh(keys + (s + j) * hd), qv[0]);
        for (int c = 1; c < C2; ++c) a[j] = _mm512_dpbf16_ps(a[j], bh(keys + (s + j) * hd + 32 * c), qv[c]);
      }
      store_scores<BF>(a, sc, p + g * np + s, tops[g]);
    }
  for (; s < n; ++s)  // the last keys one at a time
    for (int64_t g = 0; g < G; ++g) {
      __m512 a = _mm512_setzero_ps();
      for (int c = 0; c < C2; ++c) a = _mm512_dpbf16_ps(a, bh(keys + s * hd + 32 * c), bh(q + g * hd + 32 * c));
      const float x = round_to<BF>(round_to<BF>(_mm512_reduce_add_ps(a)) * sc);
      p[g * np + s] = x;
      tail_top[g] = x > tail_top[g] ? x : tail_top[g];
    }
  for (int64_t g = 0; g < G; ++g) {  // softmax per head; the probabilities rounded to bf16, kept as bf16 bits
    uint16_t* pbg = pb + g * np;  // whole 16-lane blocks: lanes past n store 0, so an odd last key's partner weighs 0
    softmax_rounded<BF>(p + g * np, n, std::max(tail_top[g], _mm512_reduce_max_ps(tops[g])),
                        [&](int64_t at, __mmask16, __m512 w) {
                          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pbg + at),
                                              _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(w), 16)));
                        });
  }
  std::fill(acc, acc + G * hd, 0.f);
  for (s = 0; s < n; s += 16) {  // sum p v
    const int64_t pairs = (std::min<int64_t>(16, n - s) + 1) / 2;
    for (int64_t j = 0; j < pairs; ++j) {
      const BF* a = vals + (s + 2 * j) * hd;
      const bool second = s + 2 * j + 1 < n;  // an odd last key pairs with zeros, never with unwritten slots
      for (int c = 0; c < C2; ++c) {
        const __m512i va = _mm512_loadu_si512(a + 32 * c);
        const __m512i vb = second ? _mm512_loadu_si512(a + hd + 32 * c) : _mm512_setzero_si512();
        vp[j * 2 * C2 + 2 * c] = _mm512_unpacklo_epi16(va, vb);
        vp[j * 2 * C2 + 2 * c + 1] = _mm512_unpackhi_epi16(va, vb);
      }
    }
    int64_t g = 0;
    for (; g + 2 <= G; g += 2) accumulate_bf16<2, C2>(acc + g * hd, pb + g * np + s, np, vp, pairs);
    if (g < G) accumulate_bf16<1, C2>(acc + g * hd, pb + g * np + s, np, vp, pairs);
  }
  // per 32 dimensions, unpacklo's lane 4L + i held dimension 8L + i and unpackhi's 8L + 4 + i
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int64_t g = 0; g < G; ++g)
    for (int c = 0; c < C2; ++c) {
      const __m512 lo = _mm512_loadu_ps(acc + g * hd + 32 * c), hi = _mm512_loadu_ps(acc + g * hd + 32 * c + 16);
      pocketllama::store16(orows[g] + 32 * c, _mm512_permutex2var_ps(lo, first, hi), 16);
      pocketllama::store16(orows[g] + 32 * c + 16, _mm512_permutex2var_ps(lo, second, hi), 16);
    }
}
#endif

template <typename T>
void attend_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& ck, at::Tensor& cv,
                 const at::Tensor& rows, const at::Tensor& positions, double scale, at::Tensor& out) {
  const int64_t B = q.size(0), T_ = q.size(1), KV = ck.size(1), S = ck.size(2), hd = ck.size(3);
  const int64_t H = q.size(2) / hd, G = H / KV;
  const int64_t* R = rows.data_ptr<int64_t>();
  const int64_t* P = positions.data_ptr<int64_t>();
  T* CK = reinterpret_cast<T*>(ck.data_ptr());
  T* CV = reinterpret_cast<T*>(cv.data_ptr());
  const T* Q = reinterpret_cast<const T*>(q.data_ptr());
  const T* Kn = reinterpret_cast<const T*>(k.data_ptr());
  const T* Vn = reinterpret_cast<const T*>(v.data_ptr());
  T* O = reinterpret_cast<T*>(out.data_ptr());
  auto slot = [&](T* buf, int64_t row, int64_t kvh, int64_t pos) { return buf + ((row * KV + kvh) * S + pos) * hd; };
  // 1. the new keys/values land in their slots first: query t also sees the tokens before it in this call
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T_; ++t)
      for (int64_t h = 0; h < KV; ++h) {
        const int64_t pos = P[b * T_ + t];
        std::memcpy(slot(CK, R[b], h, pos), Kn + b * k.stride(0) + t * k.stride(1) + h * hd, hd * sizeof(T));
        std::memcpy(slot(CV, R[b], h, pos), Vn + b * v.stride(0) + t * v.stride(1) + h * hd, hd * sizeof(T));
      }
  // 2. one work item per (row, query, kv head, group of at most 8 of its query heads); groups split in two
  //    when there would be fewer than 4 items (a small model's few kv heads still use both cores)
  int64_t longest = 1;
  for (int64_t i = 0; i < B * T_; ++i) longest = std::max(longest, P[i] + 1);
  int64_t gs = std::min<int64_t>(G, 8);
  if (B * T_ * KV * ((G + gs - 1) / gs) < 4 && gs > 1) gs = (gs + 1) / 2;
  const int64_t parts = (G + gs - 1) / gs, np = (longest + 15) / 16 * 16;
  const float sc = static_cast<float>(scale);
#ifdef __AVX512BF16__
  constexpr bool is_bf16 = std::is_same_v<T, c10::BFloat16>;
#else
  constexpr bool is_bf16 = false;
#endif
  const bool dp = is_bf16 && (hd == 64 || hd == 128);  // the vdpbf16ps kernel
  at::parallel_for(0, B * T_ * KV * parts, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(gs * hd), p(gs * np), kv(16 * hd), acc(gs * hd);
    std::vector<uint16_t> pb(dp ? gs * np : 0);
    std::vector<__m512i> vp(dp ? 8 * (hd / 16) : 0);
    std::vector<T*> orows(gs);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (T_ * KV * parts), t = i / (KV * parts) % T_, kvh = i / parts % KV;
      const int64_t h0 = kvh * G + i % parts * gs, g = std::min(gs, (kvh + 1) * G - h0);
      const int64_t n = P[b * T_ + t] + 1;
      const T* q0 = Q + b * q.stride(0) + t * q.stride(1) + h0 * hd;  // the group's query rows, consecutive
      for (int64_t e = 0; e < g; ++e) orows[e] = O + (b * T_ + t) * H * hd + (h0 + e) * hd;
      const T* keys = slot(CK, R[b], kvh, 0);
      const T* vals = slot(CV, R[b], kvh, 0);
#ifdef __AVX512BF16__
      if constexpr (is_bf16) {
        if (dp) {
          if (hd == 64) attend_group_bf16<2>(q0, g, keys, vals, n, sc, p.data(), pb.data(), np, vp.data(), acc.data(), orows.data());
          else attend_group_bf16<4>(q0, g, keys, vals, n, sc, p.data(), pb.data(), np, vp.data(), acc.data(), orows.data());
          continue;
        }
      }
#endif
      for (int64_t d = 0; d < g * hd; ++d) qf[d] = static_cast<float>(q0[d]);
      if (hd == 64) attend_group<T, 4>(qf.data(), g, keys, vals, n, hd, sc, p.data(), np, kv.data(), acc.data(), orows.data());
      else if (hd == 128) attend_group<T, 8>(qf.data(), g, keys, vals, n, hd, sc, p.data(), np, kv.data(), acc.data(), orows.data());
      else attend_group<T, 0>(qf.data(), g, keys, vals, n, hd, sc, p.data(), np, kv.data(), acc.data(), orows.data());
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor cache_k,
                            at::Tensor cache_v, const at::Tensor& rows, const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "decode_attention: q/k/v (B, T, heads * head_dim) with unit column stride");
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.is_contiguous() && cache_v.is_contiguous() &&
              cache_k.sizes() == cache_v.sizes(), "decode_attention: cache buffers (Bc, KV, S, hd), contiguous");
  const int64_t B = q.size(0), T_ = q.size(1), KV = cache_k.size(1), hd = cache_k.size(3);
  TORCH_CHECK(hd % 16 == 0 && hd <= 256 && q.size(2) % (KV * hd) == 0 && k.size(2) == KV * hd && v.size(2) == KV * hd &&
              k.size(0) == B && v.size(0) == B && k.size(1) == T_ && v.size(1) == T_,
              "decode_attention: head_dim % 16 == 0 (at most 256) and q/k/v heads matching the cache");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == B &&
              positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == B * T_,
              "decode_attention: rows (B,) and positions (B, T) int64, contiguous");
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && cache_k.scalar_type() == dt &&
              cache_v.scalar_type() == dt, "decode_attention: q, k, v and the cache must share a dtype");
  const int64_t* R = rows.data_ptr<int64_t>();
  const int64_t* P = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(R[b] >= 0 && R[b] < cache_k.size(0), "decode_attention: cache row ", R[b], " out of range");
    for (int64_t t = 0; t < T_; ++t)
      TORCH_CHECK(P[b * T_ + t] >= 0 && P[b * T_ + t] < cache_k.size(2), "decode_attention: position ",
                  P[b * T_ + t], " is outside the KV cache (max_len ", cache_k.size(2), ")");
  }
  at::Tensor out = at::empty({B, T_, q.size(2)}, q.options());
  switch (dt) {
    case at::kFloat: attend_impl<float>(q, k, v, cache_k, cache_v, rows, positions, scale, out); break;
    case at::kBFloat16: attend_impl<c10::BFloat16>(q, k, v, cache_k, cache_v, rows, positions, scale, out); break;
    case at::kHalf: attend_impl<c10::Half>(q, k, v, cache_k, cache_v, rows, positions, scale, out); break;
    default: TORCH_CHECK(false, "decode_attention: float32, bfloat16 or float16");
  }
  return out;
}

}  // namespace

at::Tensor pocketllama::ops::decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              at::Tensor cache_k, at::Tensor cache_v, const at::Tensor& rows,
                                              const at::Tensor& positions, double scale) {
  return ::decode_attention(q, k, v, cache_k, cache_v, rows, positions, scale);
}

TORCH_LIBRARY_FRAGMENT(pocketllama_quant, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor rows, "
        "Tensor positions, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pocketllama_quant, CPU, m) { m.impl("decode_attention", &decode_attention); }
