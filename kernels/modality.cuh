// MultiDelete's modality-decoupling losses: CUDA kernels with plain launchers (torch-free;
// nvcc builds this file alone).  Semantics as csrc/cpu/modality.h:
//
// * decoupling_{forward,backward}: three (student, reference) pairs of (rows, dim)
//   embeddings in ONE launch, grid (blocks, 3).  Forward: partial[k * num_blocks + b] =
//   sum over block b's rows of pair k of sum (s - r)^2, or of 1 - cos(s, r), then one small
//   block sums each pair's partials in a fixed order (deterministic) and applies the means
//   and weights.  Backward: gradient rows, stored in the embeddings' dtype.
// * similarity panels (the CUDA policy of csrc/modality_panels.h): fused passes over a
//   float32 (n, bt) panel of S = a b^T / T and R = c d^T / T made by cuBLAS:
//     sim_kl_rows         whole rows: KL(softmax(r) || softmax(s)) and (max, log-sum) of s and r
//     sim_kl_cols_update  fold the panel into running per-column online-softmax states
//     sim_kl_cols_finalize  column KL and statistics
//     sim_kl_grad         in place: G = g_row (q - p) + g_col (q' - p'), g from device memory
//     sim_sq_rows         row sums of squares
//   Statistics are float32 (4, ld) structure-of-arrays: max_s, log_sum_s, max_r, log_sum_r.
//   Column states are float32 (5, bt): max_s, sum_s, max_r, sum_r, W.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace uf_cuda {
namespace modality {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct EmbeddingPair {
  const void* student;    // (rows, dim), contiguous
  const void* reference;  // (rows, dim), contiguous
  void* grad;             // (rows, dim) output of the backward; nullptr: no gradient
  int64_t rows, dim;
};

struct EmbeddingPairs {
  EmbeddingPair pair[3];
};

// term k = scale[k] * (pair k's sum); total = sum_k weight[k] * term k.
struct Coefficients {
  float scale[3];
  float weight[3];
};

// Blocks per pair (grid.x) used by both launchers: the partial buffer has 3 x this many floats.
int64_t decoupling_num_blocks(const EmbeddingPairs& pairs);

// out: 4 floats (L_MD, L_multi, L_uni, total); partial: 3 x decoupling_num_blocks scratch.
cudaError_t decoupling_forward(const EmbeddingPairs& pairs, DType dtype, bool cosine, Coefficients coef,
                               float* partial, float* out, cudaStream_t stream);

// grad: 4 float32 values in device memory (the gradient of `out`); pair k's rows are scaled
// by (grad[k] + weight[k] grad[3]) scale[k].  Pairs with grad == nullptr are skipped.
cudaError_t decoupling_backward(const float* grad, const EmbeddingPairs& pairs, DType dtype, bool cosine,
                                Coefficients coef, cudaStream_t stream);

// row_stats: (4, ld_stats); rows row0 .. row0 + n - 1 are written, and row_kl[row0 + i].
cudaError_t sim_kl_rows(const float* s, const float* r, int64_t n, int64_t bt, float* row_stats, int64_t ld_stats,
                        int64_t row0, float* row_kl, cudaStream_t stream);

// col_state: (5, bt); initialise with sim_kl_cols_init.
cudaError_t sim_kl_cols_init(float* col_state, int64_t bt, cudaStream_t stream);
cudaError_t sim_kl_cols_update(const float* s, const float* r, int64_t n, int64_t bt, float* col_state,
                               cudaStream_t stream);
cudaError_t sim_kl_cols_finalize(const float* col_state, int64_t bt, float* col_stats, float* col_kl,
                                 cudaStream_t stream);

// s <- G in place.  row_stats (4, ld_row) or nullptr (no row term), read at rows row0 + i;
// col_stats (4, bt) or nullptr (no column term); gw: (g_row, g_col) in device memory.
cudaError_t sim_kl_grad(float* s, const float* r, int64_t n, int64_t bt, const float* row_stats, int64_t ld_row,
                        int64_t row0, const float* col_stats, const float* gw, cudaStream_t stream);

cudaError_t sim_sq_rows(const float* e, int64_t n, int64_t bt, int64_t row0, float* row_vals, cudaStream_t stream);

}  // namespace modality
}  // namespace uf_cuda
