// Token statistics: CUDA row kernels with plain launchers (torch-free; nvcc builds this
// file alone).  Semantics as csrc/cpu/token_stats.h: for a row of logits z, target t,
//   row_stats = [m, log s, entropy, std_logp],  lse = m + log s,  logprob = (z_t - m) - log s
// (m and log s kept apart so the backward's (z - m) - log s is exact for |z| ~ 1e4);
// ignored rows (t == ignore_index) give zeros; out-of-range targets give a NaN log-prob.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace uf_cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// logits: n rows of V entries, row stride ld (elements).  Outputs: logprob (n,),
// row_stats (n, 4) float32, argmax (n,) int64.
cudaError_t token_stats_rows_fwd(const void* logits, DType dtype, int64_t n, int64_t V, int64_t ld,
                                 const int64_t* targets, int64_t ignore_index, float* logprob, float* row_stats,
                                 int64_t* argmax, cudaStream_t stream);

// out[r, v] = grad[r] * (1[v == t_r] - exp((z - m) - log s)), stored as out_dtype with row
// stride out_ld; out may alias logits when both are float32 with the same stride.
cudaError_t token_stats_rows_bwd(const float* grad, const void* logits, DType dtype, int64_t n, int64_t V, int64_t ld,
                                 const int64_t* targets, int64_t ignore_index, const float* row_stats, void* out,
                                 DType out_dtype, int64_t out_ld, cudaStream_t stream);

}  // namespace uf_cuda
