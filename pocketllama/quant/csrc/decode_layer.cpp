// pocketllama: one Llama decoder layer for a few new tokens (decode, speculative verification) in one call.
// Eager PyTorch runs ~25 dispatcher calls and as many Python module calls per layer and step (~0.3 ms on
// these CPUs, a third of a small model's step); this chains the same kernels from C++:
//   x = rms_norm(h); q, k, v = split(qkv(x)); rotary(q, k); a = attention(q, k, v; cache)   (writes K/V)
//   h = h + o(a); x = rms_norm(h); g, u = split(gate_up(x)); h = h + down(silu(g) * u)
// with the exact ops (and rounding) of models/llama.py, so both paths give the same bits.
// `decode_layers` runs a whole trunk of such layers in one call (a small model's step spends ~20 us of Python
// per layer around each call).
// A projection is (kind, weight, scales, zeros, bias) as held by the Python modules (zeros None: symmetric int4):
//   0 float weight (N, K): the bf16 / fp32 GEMVs (M <= 8), else at::linear
//   1 int8 interleaved rows   2 int4 interleaved rows   3 int4 "groups" layout with int8 activations
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

namespace {

enum Kind : int64_t { FLOAT = 0, INT8 = 1, INT4 = 2, INT4_A8 = 3 };

// Projection i of the list p (4 tensors each, from index 4 * i).
at::Tensor project(const at::Tensor& x, int64_t kind, const c10::List<std::optional<at::Tensor>>& p, int64_t i) {
  const at::Tensor w = p.get(4 * i).value();
  const std::optional<at::Tensor> bias = p.get(4 * i + 3);
  at::Tensor y;
  switch (kind) {
    case FLOAT:
#ifdef __AVX512BF16__
      if (x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && x.size(1) % 32 == 0 &&
          w.is_contiguous()) {
        y = pocketllama::ops::bf16_gemv(x, w);
        break;
      }
#endif
      if (x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.size(1) % 16 == 0 && w.is_contiguous()) {
        y = pocketllama::ops::f32_gemv(x, w);
        break;
      }
      return at::linear(x, w, bias);
    case INT8: y = pocketllama::ops::int8_gemv(x, w, p.get(4 * i + 1).value()); break;
    case INT4: y = pocketllama::ops::int4_gemv(x, w, p.get(4 * i + 1).value(), p.get(4 * i + 2).value_or(at::Tensor())); break;
#ifdef __AVX512VNNI__
    case INT4_A8:
      y = pocketllama::ops::int4g_gemv_a8(x, w, p.get(4 * i + 1).value(), p.get(4 * i + 2).value_or(at::Tensor()));
      break;
#endif
    default: TORCH_CHECK(false, "decode_layer: unknown projection kind ", kind);
  }
  return bias.has_value() ? y + *bias : y;
}

// h (B, T, D) -> (B, T, D). cos/sin (B, T, hd); cache_k/cache_v (Bc, KV, S, hd); rows (B,); positions (B, T);
// proj: projections (qkv, o, gate_up, down) x (weight, scales, zeros, bias) of this layer from index 4 * first;
// kinds: their 4 kinds.
at::Tensor layer(const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache_k,
                 const at::Tensor& cache_v, const at::Tensor& rows, const at::Tensor& positions, const at::Tensor& norm1,
                 const at::Tensor& norm2, double eps, const c10::List<std::optional<at::Tensor>>& proj, int64_t first,
                 const int64_t* kinds, int64_t head_dim, double scale) {
  TORCH_CHECK(h.dim() == 3, "decode_layer: h (B, T, D)");
  const int64_t B = h.size(0), T = h.size(1), D = h.size(2), M = B * T;
  const int64_t kvw = cache_k.size(1) * head_dim;
  const at::Tensor x = h.reshape({M, D});
  const at::Tensor qkv = project(pocketllama::ops::rms_norm(x, norm1, eps), kinds[0], proj, first);  // (M, qw + 2 kvw)
  const int64_t qw = qkv.size(1) - 2 * kvw;
  TORCH_CHECK(qw > 0 && qw % head_dim == 0, "decode_layer: q/k/v widths do not match the cache's heads");
  const at::Tensor q = qkv.narrow(1, 0, qw), k = qkv.narrow(1, qw, kvw), v = qkv.narrow(1, qw + kvw, kvw);
  const at::Tensor c = cos.reshape({M, head_dim}).contiguous(), s = sin.reshape({M, head_dim}).contiguous();
  pocketllama::ops::rotary_(q, c, s, head_dim);
  pocketllama::ops::rotary_(k, c, s, head_dim);
  const at::Tensor a = pocketllama::ops::decode_attention(q.view({B, T, qw}), k.view({B, T, kvw}), v.view({B, T, kvw}),
                                                         cache_k, cache_v, rows, positions, scale);  // (B, T, qw)
  const at::Tensor h1 = x + project(a.view({M, qw}), kinds[1], proj, first + 1);  // (M, D)
  const at::Tensor gu = project(pocketllama::ops::rms_norm(h1, norm2, eps), kinds[2], proj, first + 2);  // (M, 2I)
  const int64_t I = gu.size(1) / 2;
  const at::Tensor act = pocketllama::ops::silu_mul(gu.narrow(1, 0, I), gu.narrow(1, I, I));
  return (h1 + project(act, kinds[3], proj, first + 3)).view({B, T, D});
}

at::Tensor decode_layer(const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin, at::Tensor cache_k,
                        at::Tensor cache_v, const at::Tensor& rows, const at::Tensor& positions, const at::Tensor& norm1,
                        const at::Tensor& norm2, double eps, const c10::List<std::optional<at::Tensor>>& proj,
                        at::IntArrayRef kinds, int64_t head_dim, double scale) {
  TORCH_CHECK(proj.size() == 16 && kinds.size() == 4, "decode_layer: 4 projections");
  return layer(h, cos, sin, cache_k, cache_v, rows, positions, norm1, norm2, eps, proj, 0, kinds.data(), head_dim, scale);
}

// L layers in a row: cache_k/cache_v L tensors, norms 2L (input, post-attention), proj 16L, kinds 4L.
at::Tensor decode_layers(const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin, at::TensorList cache_k,
                         at::TensorList cache_v, const at::Tensor& rows, const at::Tensor& positions, at::TensorList norms,
                         double eps, const c10::List<std::optional<at::Tensor>>& proj, at::IntArrayRef kinds,
                         int64_t head_dim, double scale) {
  const int64_t L = static_cast<int64_t>(cache_k.size());
  TORCH_CHECK(static_cast<int64_t>(cache_v.size()) == L && static_cast<int64_t>(norms.size()) == 2 * L &&
              static_cast<int64_t>(proj.size()) == 16 * L && static_cast<int64_t>(kinds.size()) == 4 * L,
              "decode_layers: per layer a K and a V cache, 2 norms, 4 projections of 4 tensors and 4 kinds");
  at::Tensor x = h;
  for (int64_t l = 0; l < L; ++l)
    x = layer(x, cos, sin, cache_k[l], cache_v[l], rows, positions, norms[2 * l], norms[2 * l + 1], eps, proj, 4 * l,
              kinds.data() + 4 * l, head_dim, scale);
  return x;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketllama_quant, m) {
  m.def("decode_layer(Tensor h, Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor rows, "
        "Tensor positions, Tensor norm1, Tensor norm2, float eps, Tensor?[] proj, int[] kinds, int head_dim, "
        "float scale) -> Tensor");
  m.def("decode_layers(Tensor h, Tensor cos, Tensor sin, Tensor(a!)[] cache_k, Tensor(b!)[] cache_v, Tensor rows, "
        "Tensor positions, Tensor[] norms, float eps, Tensor?[] proj, int[] kinds, int head_dim, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pocketllama_quant, CPU, m) {
  m.impl("decode_layer", &decode_layer);
  m.impl("decode_layers", &decode_layers);
}
