// Saliency ops: CUDA multi-tensor kernels with plain launchers (torch-free; nvcc builds
// this file alone).  Semantics as csrc/cpu/saliency.h; the torch binding is
// csrc/cuda/saliency.cpp.
//
// Multi-tensor table: one device array of int64 for a list of T tensors,
//   [0, T)                 element count of each tensor
//   [(1 + k) T, (2 + k) T)  list k (k < kLists): a data pointer per tensor (or, for the
//                          top-k tie limits, an integer per tensor)
//   [5T, 6T + 1)           first block of each tensor (prefix sum of ceil(numel / kChunk)),
//                          the last entry the total number of blocks
// Block b finds its tensor by binary search over the prefix and processes kChunk
// elements from (b - first[t]) * kChunk, so a launch needs no per-block table and the
// host copies 6T + 1 integers, not one entry per block.  kChunk is a multiple of 32:
// a block owns whole words of a packed mask.  Masks: element i is bit i % 32 of word
// i / 32 (uint32 words stored as int32).  Reductions write per-block float partials
// that the binding sums in float64 (deterministic); histograms and counts are integer
// atomics.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace uf_cuda {
namespace saliency {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kLists = 4;
constexpr int64_t kChunk = 8192;
constexpr int kThreads = 256;
constexpr int kMaxHistogramBits = 12;  // shared-memory histogram of 2^bits uint32 counters

inline int64_t table_size(int64_t num_tensors) { return (2 + kLists) * num_tensors + 1; }

struct Table {
  const int64_t* data;  // device pointer, table_size(num_tensors) entries (layout above)
  int64_t num_tensors;
  int64_t num_blocks;  // == data[(1 + kLists) * num_tensors + num_tensors] (host copy)
};

// list 0: float32 Fisher (updated), list 1: gradients (gdt).  F += scale * g^2.
cudaError_t fisher_accumulate(Table table, DType gdt, float scale, cudaStream_t stream);

// list 0: words (written), list 1: forget Fisher, list 2: preserve Fisher (float32).
// bit = __fdiv_rn(F_f + eps, F_p + eps) >= threshold (IEEE: matches eager float32).
cudaError_t ratio_mask(Table table, float threshold, float eps, cudaStream_t stream);

// list 0: scores.  hist[2^bits] (int64, zeroed by the caller) += digit counts of the keys
// with key >> prefix_shift == prefix.  bits <= kMaxHistogramBits.
cudaError_t abs_histogram(Table table, DType sdt, int shift, int bits, int prefix_shift, uint32_t prefix,
                          int64_t* hist, cudaStream_t stream);

// list 0: scores.  counts[t] (int64, zeroed by the caller) += #(key == key) in tensor t.
cudaError_t count_equal(Table table, DType sdt, uint32_t key, int64_t* counts, cudaStream_t stream);

// list 0: words (written), list 1: scores, list 2: tie limit per tensor (an integer).
// bit = key > K or (key == K and index < limit).
cudaError_t topk_mask(Table table, DType sdt, uint32_t key, cudaStream_t stream);

// list 0: gradients (gdt), list 1: words, list 2: preserve Fisher (float32), list 3: retain
// gradients (gdt); the flags say which of lists 1-3 are present.  partials[3 * num_blocks]
// receives per block [sum g^2, sum t r, sum r^2], t = m g (/ (F + lam)).
cudaError_t transform_reduce(Table table, DType gdt, bool has_mask, bool geometry, bool retain, float lam,
                             float* partials, cudaStream_t stream);

// Same lists; g <- coef[0] * t - coef[1] * r (coef: 2 floats on the device).
cudaError_t transform_apply(Table table, DType gdt, bool has_mask, bool geometry, bool retain, float lam,
                            const float* coef, cudaStream_t stream);

// list 0: parameters (updated), list 1: originals, list 2: words; element_size 2, 4 or 8.
// param <- original where the bit is 0.
cudaError_t reset_unmasked(Table table, int element_size, cudaStream_t stream);

// list 0: words (numel = word counts).  *total (int64, zeroed by the caller) += set bits.
cudaError_t popcount(Table table, int64_t* total, cudaStream_t stream);

}  // namespace saliency
}  // namespace uf_cuda
