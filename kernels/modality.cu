// CUDA kernels for MultiDelete's losses (see modality.cuh).  float32 accumulation,
// 64-bit offsets, deterministic reductions (fixed shapes, no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "modality.cuh"

namespace uf_cuda {
namespace modality {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kCosineEps = 1e-8f;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// Block-wide sum / max of one value per thread; the result in every thread.
__device__ __forceinline__ float block_sum(float x, float* sh) {
  x = warp_sum(x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += sh[w];
  __syncthreads();
  return total;
}

__device__ __forceinline__ float block_max(float x, float* sh) {
  x = warp_max(x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  float m = sh[0];
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, sh[w]);
  __syncthreads();
  return m;
}

// ---------------------------------------------------------------------------------------
// Modality decoupling: one warp per embedding row, kWarps rows per block, grid (blocks, 3)
// ---------------------------------------------------------------------------------------
struct CosineTerms {
  float dot, ss, rr;
};

template <typename T>
__device__ __forceinline__ CosineTerms warp_row_terms(const T* s, const T* r, int64_t dim, int lane, bool cosine) {
  float dot = 0.f, ss = 0.f, rr = 0.f;
  for (int64_t k = lane; k < dim; k += 32) {
    const float sv = to_f(s[k]), rv = to_f(r[k]);
    if (cosine) {
      dot += sv * rv;
      ss += sv * sv;
      rr += rv * rv;
    } else {
      const float e = sv - rv;
      dot += e * e;  // the squared error, in the dot slot
    }
  }
  return {warp_sum(dot), warp_sum(ss), warp_sum(rr)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads) md_fwd_kernel(EmbeddingPairs pairs, bool cosine, float* partial) {
  __shared__ float sh[kWarps];
  const EmbeddingPair p = pairs.pair[blockIdx.y];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  float val = 0.f;
  if (row < p.rows) {
    const T* s = static_cast<const T*>(p.student) + row * p.dim;
    const T* r = static_cast<const T*>(p.reference) + row * p.dim;
    const CosineTerms t = warp_row_terms(s, r, p.dim, lane, cosine);
    if (cosine) {
      val = 1.f - t.dot / (fmaxf(sqrtf(t.ss), kCosineEps) * fmaxf(sqrtf(t.rr), kCosineEps));
    } else {
      val = t.dot;
    }
  }
  if (lane == 0) sh[warp] = val;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += sh[w];
    partial[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
  }
}

// One block: out[k] = scale[k] * sum_b partial[k, b] (in double, fixed order), out[3] = weighted total.
__global__ void md_finalize_kernel(const float* __restrict__ partial, int64_t num_blocks, Coefficients coef,
                                   float* __restrict__ out) {
  __shared__ double sh[kThreads];
  double terms[3];
  for (int k = 0; k < 3; ++k) {
    double acc = 0.0;
    for (int64_t b = threadIdx.x; b < num_blocks; b += kThreads) acc += partial[k * num_blocks + b];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) sh[threadIdx.x] += sh[threadIdx.x + stride];
      __syncthreads();
    }
    terms[k] = coef.scale[k] * sh[0];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int k = 0; k < 3; ++k) {
      out[k] = static_cast<float>(terms[k]);
      total += coef.weight[k] * terms[k];
    }
    out[3] = static_cast<float>(total);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) md_bwd_kernel(const float* __restrict__ grad, EmbeddingPairs pairs,
                                                          bool cosine, Coefficients coef) {
  const int k = blockIdx.y;
  const EmbeddingPair p = pairs.pair[k];
  if (p.grad == nullptr) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= p.rows) return;  // whole warps leave together: no block-level sync below
  const float go = (grad[k] + coef.weight[k] * grad[3]) * coef.scale[k];
  const T* s = static_cast<const T*>(p.student) + row * p.dim;
  const T* r = static_cast<const T*>(p.reference) + row * p.dim;
  T* g = static_cast<T*>(p.grad) + row * p.dim;
  float a, b;  // gradient = a * r + b * s
  if (cosine) {
    const CosineTerms t = warp_row_terms(s, r, p.dim, lane, true);
    const float norm_s = sqrtf(t.ss);
    const float ns = fmaxf(norm_s, kCosineEps), nr = fmaxf(sqrtf(t.rr), kCosineEps);
    const float inv = 1.f / (ns * nr);
    a = -go * inv;
    b = norm_s > kCosineEps ? go * (t.dot * inv) / (ns * ns) : 0.f;
  } else {
    a = -2.f * go;
    b = 2.f * go;
  }
  for (int64_t k = lane; k < p.dim; k += 32) g[k] = from_f<T>(a * to_f(r[k]) + b * to_f(s[k]));
}

// ---------------------------------------------------------------------------------------
// Similarity panels
// ---------------------------------------------------------------------------------------
// One block per panel row: (max, sum) of both softmaxes and the shifted cross term.
__global__ void __launch_bounds__(kThreads) kl_rows_kernel(const float* __restrict__ s, const float* __restrict__ r,
                                                           int64_t bt, float* __restrict__ stats, int64_t ld,
                                                           int64_t row0, float* __restrict__ row_kl) {
  __shared__ float sh[kWarps];
  const int64_t i = blockIdx.x;
  const float* si = s + i * bt;
  const float* ri = r + i * bt;
  float ms = -FLT_MAX, mr = -FLT_MAX;
  for (int64_t j = threadIdx.x; j < bt; j += kThreads) {
    ms = fmaxf(ms, si[j]);
    mr = fmaxf(mr, ri[j]);
  }
  ms = block_max(ms, sh);
  mr = block_max(mr, sh);
  float ss = 0.f, sr = 0.f, w = 0.f;
  for (int64_t j = threadIdx.x; j < bt; j += kThreads) {
    const float ds = si[j] - ms, dr = ri[j] - mr;
    const float er = __expf(dr);
    ss += __expf(ds);
    sr += er;
    w += er * (dr - ds);
  }
  ss = block_sum(ss, sh);
  sr = block_sum(sr, sh);
  w = block_sum(w, sh);
  if (threadIdx.x == 0) {
    const float lss = logf(ss), lsr = logf(sr);
    const int64_t row = row0 + i;
    stats[row] = ms;
    stats[ld + row] = lss;
    stats[2 * ld + row] = mr;
    stats[3 * ld + row] = lsr;
    row_kl[row] = w / sr + lss - lsr;
  }
}

// Merge state b into a (see csrc/cpu/modality.h, sim_kl_merge).
__device__ __forceinline__ void merge_state(float& ms, float& ss, float& mr, float& sr, float& w, float bms, float bss,
                                            float bmr, float bsr, float bw) {
  if (bsr <= 0.f) return;
  if (sr <= 0.f) {
    ms = bms; ss = bss; mr = bmr; sr = bsr; w = bw;
    return;
  }
  const float nms = fmaxf(ms, bms), nmr = fmaxf(mr, bmr);
  const float fa_r = __expf(mr - nmr), fb_r = __expf(bmr - nmr);
  w = fa_r * (w + sr * ((mr - nmr) - (ms - nms))) + fb_r * (bw + bsr * ((bmr - nmr) - (bms - nms)));
  ss = __expf(ms - nms) * ss + __expf(bms - nms) * bss;
  sr = fa_r * sr + fb_r * bsr;
  ms = nms;
  mr = nmr;
}

constexpr int kColTile = 32;              // columns per block (threadIdx.x)
constexpr int kRowGroups = kThreads / kColTile;  // row stripes per block (threadIdx.y)

// Block (kColTile x kRowGroups): each thread folds the rows y, y + kRowGroups, ... of its
// column into a private state, the kRowGroups states of a column are merged in shared
// memory, and the result is merged into the running state in global memory.
__global__ void __launch_bounds__(kThreads) kl_cols_update_kernel(const float* __restrict__ s,
                                                                  const float* __restrict__ r, int64_t n, int64_t bt,
                                                                  float* __restrict__ state) {
  __shared__ float sh[5][kRowGroups][kColTile];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  float ms = -FLT_MAX, mr = -FLT_MAX, ss = 0.f, sr = 0.f, w = 0.f;
  if (j < bt) {
    for (int64_t i = threadIdx.y; i < n; i += kRowGroups) {
      ms = fmaxf(ms, s[i * bt + j]);
      mr = fmaxf(mr, r[i * bt + j]);
    }
    for (int64_t i = threadIdx.y; i < n; i += kRowGroups) {
      const float ds = s[i * bt + j] - ms, dr = r[i * bt + j] - mr;
      const float er = __expf(dr);
      ss += __expf(ds);
      sr += er;
      w += er * (dr - ds);
    }
  }
  sh[0][threadIdx.y][threadIdx.x] = ms;
  sh[1][threadIdx.y][threadIdx.x] = ss;
  sh[2][threadIdx.y][threadIdx.x] = mr;
  sh[3][threadIdx.y][threadIdx.x] = sr;
  sh[4][threadIdx.y][threadIdx.x] = w;
  __syncthreads();
  if (threadIdx.y == 0 && j < bt) {
    for (int y = 1; y < kRowGroups; ++y) {
      merge_state(ms, ss, mr, sr, w, sh[0][y][threadIdx.x], sh[1][y][threadIdx.x], sh[2][y][threadIdx.x],
                  sh[3][y][threadIdx.x], sh[4][y][threadIdx.x]);
    }
    float gms = state[j], gss = state[bt + j], gmr = state[2 * bt + j], gsr = state[3 * bt + j],
          gw = state[4 * bt + j];
    merge_state(gms, gss, gmr, gsr, gw, ms, ss, mr, sr, w);
    state[j] = gms;
    state[bt + j] = gss;
    state[2 * bt + j] = gmr;
    state[3 * bt + j] = gsr;
    state[4 * bt + j] = gw;
  }
}

__global__ void cols_init_kernel(float* state, int64_t bt) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= bt) return;
  state[j] = -FLT_MAX;
  state[bt + j] = 0.f;
  state[2 * bt + j] = -FLT_MAX;
  state[3 * bt + j] = 0.f;
  state[4 * bt + j] = 0.f;
}

__global__ void cols_finalize_kernel(const float* __restrict__ state, int64_t bt, float* __restrict__ stats,
                                     float* __restrict__ col_kl) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= bt) return;
  const float lss = logf(state[bt + j]), lsr = logf(state[3 * bt + j]);
  stats[j] = state[j];
  stats[bt + j] = lss;
  stats[2 * bt + j] = state[2 * bt + j];
  stats[3 * bt + j] = lsr;
  col_kl[j] = state[4 * bt + j] / state[3 * bt + j] + lss - lsr;
}

// grid (column blocks, row groups); rows strided by gridDim.y.
__global__ void __launch_bounds__(kThreads) kl_grad_kernel(float* __restrict__ s, const float* __restrict__ r,
                                                           int64_t n, int64_t bt, const float* __restrict__ row_stats,
                                                           int64_t ld_row, int64_t row0,
                                                           const float* __restrict__ col_stats,
                                                           const float* __restrict__ gw) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= bt) return;
  const float g_row = gw[0], g_col = gw[1];
  float cms = 0.f, clss = 0.f, cmr = 0.f, clsr = 0.f;
  if (col_stats != nullptr) {
    cms = col_stats[j];
    clss = col_stats[bt + j];
    cmr = col_stats[2 * bt + j];
    clsr = col_stats[3 * bt + j];
  }
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const int64_t idx = i * bt + j;
    const float sv = s[idx], rv = r[idx];
    float g = 0.f;
    if (row_stats != nullptr) {
      const int64_t row = row0 + i;
      g += g_row * (__expf((sv - row_stats[row]) - row_stats[ld_row + row]) -
                    __expf((rv - row_stats[2 * ld_row + row]) - row_stats[3 * ld_row + row]));
    }
    if (col_stats != nullptr) g += g_col * (__expf((sv - cms) - clss) - __expf((rv - cmr) - clsr));
    s[idx] = g;
  }
}

__global__ void __launch_bounds__(kThreads) sq_rows_kernel(const float* __restrict__ e, int64_t bt, int64_t row0,
                                                           float* __restrict__ out) {
  __shared__ float sh[kWarps];
  const int64_t i = blockIdx.x;
  const float* ei = e + i * bt;
  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < bt; j += kThreads) acc += ei[j] * ei[j];
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) out[row0 + i] = acc;
}

template <typename F>
cudaError_t dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

constexpr int64_t kMaxGridY = 65535;

}  // namespace

int64_t decoupling_num_blocks(const EmbeddingPairs& pairs) {
  int64_t blocks = 1;
  for (int k = 0; k < 3; ++k) blocks = std::max<int64_t>(blocks, (pairs.pair[k].rows + kWarps - 1) / kWarps);
  return blocks;
}

cudaError_t decoupling_forward(const EmbeddingPairs& pairs, DType dtype, bool cosine, Coefficients coef,
                               float* partial, float* out, cudaStream_t stream) {
  const int64_t num_blocks = decoupling_num_blocks(pairs);
  const dim3 grid(static_cast<unsigned>(num_blocks), 3);
  const cudaError_t err = dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    md_fwd_kernel<T><<<grid, kThreads, 0, stream>>>(pairs, cosine, partial);
  });
  if (err != cudaSuccess) return err;
  md_finalize_kernel<<<1, kThreads, 0, stream>>>(partial, num_blocks, coef, out);
  return cudaGetLastError();
}

cudaError_t decoupling_backward(const float* grad, const EmbeddingPairs& pairs, DType dtype, bool cosine,
                                Coefficients coef, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(decoupling_num_blocks(pairs)), 3);
  return dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    md_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(grad, pairs, cosine, coef);
  });
}

cudaError_t sim_kl_rows(const float* s, const float* r, int64_t n, int64_t bt, float* row_stats, int64_t ld_stats,
                        int64_t row0, float* row_kl, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  kl_rows_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(s, r, bt, row_stats, ld_stats, row0, row_kl);
  return cudaGetLastError();
}

cudaError_t sim_kl_cols_init(float* col_state, int64_t bt, cudaStream_t stream) {
  if (bt <= 0) return cudaSuccess;
  cols_init_kernel<<<static_cast<unsigned>((bt + kThreads - 1) / kThreads), kThreads, 0, stream>>>(col_state, bt);
  return cudaGetLastError();
}

cudaError_t sim_kl_cols_update(const float* s, const float* r, int64_t n, int64_t bt, float* col_state,
                               cudaStream_t stream) {
  if (n <= 0 || bt <= 0) return cudaSuccess;
  const dim3 block(kColTile, kRowGroups);
  kl_cols_update_kernel<<<static_cast<unsigned>((bt + kColTile - 1) / kColTile), block, 0, stream>>>(s, r, n, bt,
                                                                                                    col_state);
  return cudaGetLastError();
}

cudaError_t sim_kl_cols_finalize(const float* col_state, int64_t bt, float* col_stats, float* col_kl,
                                 cudaStream_t stream) {
  if (bt <= 0) return cudaSuccess;
  cols_finalize_kernel<<<static_cast<unsigned>((bt + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      col_state, bt, col_stats, col_kl);
  return cudaGetLastError();
}

cudaError_t sim_kl_grad(float* s, const float* r, int64_t n, int64_t bt, const float* row_stats, int64_t ld_row,
                        int64_t row0, const float* col_stats, const float* gw, cudaStream_t stream) {
  if (n <= 0 || bt <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((bt + kThreads - 1) / kThreads), static_cast<unsigned>(std::min(n, kMaxGridY)));
  kl_grad_kernel<<<grid, kThreads, 0, stream>>>(s, r, n, bt, row_stats, ld_row, row0, col_stats, gw);
  return cudaGetLastError();
}

cudaError_t sim_sq_rows(const float* e, int64_t n, int64_t bt, int64_t row0, float* row_vals, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  sq_rows_kernel<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(e, bt, row0, row_vals);
  return cudaGetLastError();
}

}  // namespace modality
}  // namespace uf_cuda
