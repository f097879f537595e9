// Dual masked KL (SIU): CUDA row kernels with plain launchers (torch-free; nvcc builds
// this file alone).  Semantics and algorithm as csrc/cpu/dual_masked_kl.h; the torch
// binding is csrc/cuda/dual_masked_kl.cpp.
//
// For a row of student logits s and teacher logits t (length V), a = s/T, b = t/T,
// q = softmax(a), p = softmax(b), K_V the vocabulary mask, K_S the token mask:
//   rows[r]  = K_S * sum_v K_V p (log p - log q)       (KL form)
//            = K_S * -sum_v K_V p log q                 (cross-entropy form)
//   stats[r] = [max a, log sum e^(a - max a), max b, log sum e^(b - max b), S = sum K_V p]
//   grad     = go[r] * K_S / T * (q S - K_V p), formed in float32, stored in the logits' dtype.
// Masked rows (K_S = 0) read nothing and give a zero loss, zero statistics and (in
// backward) a zero gradient row.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace uf_cuda {
namespace dmk {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kStats = 5;
constexpr int kThreads = 256;

// student, teacher: n contiguous rows of V logits of `dtype`.  token_mask (n,) and
// vocab_mask (V,) are float32 0/1 or nullptr (all ones).  rows (n,), stats (n, 5) float32.
cudaError_t forward(const void* student, const void* teacher, DType dtype, int64_t n, int64_t V,
                    const float* token_mask, const float* vocab_mask, float inv_temperature, bool cross_entropy,
                    float* rows, float* stats, cudaStream_t stream);

// grad_rows (n,) float32: d loss / d rows[r].  grad: n x V of `dtype` (may not alias the inputs).
cudaError_t backward(const float* grad_rows, const void* student, const void* teacher, DType dtype, int64_t n,
                     int64_t V, const float* token_mask, const float* vocab_mask, const float* stats,
                     float inv_temperature, void* grad, cudaStream_t stream);

}  // namespace dmk
}  // namespace uf_cuda
