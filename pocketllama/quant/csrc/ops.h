// The CPU kernels other kernels call directly (decode_layer.cpp chains them for one decoder layer without
// going back to Python). Each is also registered as a torch op (torch.ops.pocketllama_quant.<name>).
// An undefined `z` (zeros) means symmetric int4 weights.
#pragma once
#include <ATen/ATen.h>

namespace pocketllama::ops {

#ifdef __AVX512BF16__
at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& w);
#endif
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s);
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z);
#ifdef __AVX512VNNI__
at::Tensor int4g_gemv_a8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const at::Tensor& z);
#endif
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w);
void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor cache_k,
                            at::Tensor cache_v, const at::Tensor& rows, const at::Tensor& positions, double scale);

}  // namespace pocketllama::ops
