// CUDA row kernels for token statistics (see token_stats.cuh).  One block per row:
// pass 1 max + first argmax, pass 2 s = sum e^d, A1 = sum e^d d, A2 = sum e^d d^2 with
// d = z - m, all in float32; block reductions through warp shuffles.  64-bit offsets.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>

#include "token_stats.cuh"

namespace uf_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// (value, index) max with the smaller index on ties; result in every thread.
__device__ __forceinline__ void block_argmax(float& v, int64_t& i, float* sv, int64_t* si) {
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const long long oi = __shfl_xor_sync(0xffffffffu, static_cast<long long>(i), off);
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { sv[warp] = v; si[warp] = i; }
  __syncthreads();
  v = sv[0];
  i = si[0];
  for (int w = 1; w < kWarps; ++w) {
    if (sv[w] > v || (sv[w] == v && si[w] < i)) { v = sv[w]; i = si[w]; }
  }
  __syncthreads();
}

__device__ __forceinline__ float block_sum(float x, float* sh) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += sh[w];
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rows_fwd_kernel(const T* __restrict__ logits, int64_t V, int64_t ld,
                                                            const int64_t* __restrict__ targets, int64_t ignore_index,
                                                            float* __restrict__ logprob, float* __restrict__ row_stats,
                                                            int64_t* __restrict__ argmax) {
  __shared__ float sv[kWarps];
  __shared__ int64_t si[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t t = targets[row];
  if (t == ignore_index) {  // uniform across the block
    if (threadIdx.x == 0) {
      logprob[row] = 0.f;
      for (int k = 0; k < 4; ++k) row_stats[4 * row + k] = 0.f;
      argmax[row] = 0;
    }
    return;
  }
  const T* z = logits + row * ld;
  float m = -FLT_MAX;
  int64_t idx = INT64_MAX;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float x = to_f(z[v]);
    if (x > m) { m = x; idx = v; }  // strided ascending: first occurrence per thread
  }
  block_argmax(m, idx, sv, si);
  float s = 0.f, a1 = 0.f, a2 = 0.f;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float d = to_f(z[v]) - m;
    const float e = __expf(d);
    s += e;
    const float ed = e > 0.f ? e * d : 0.f;  // a -inf logit adds nothing (not 0 * -inf = NaN)
    a1 += ed;
    a2 += e > 0.f ? ed * d : 0.f;
  }
  s = block_sum(s, sv);
  a1 = block_sum(a1, sv);
  a2 = block_sum(a2, sv);
  if (threadIdx.x == 0) {
    const float log_s = logf(s);
    const float mean_d = a1 / s;
    const float var = fmaxf(a2 / s - mean_d * mean_d, 0.f);
    logprob[row] = (t >= 0 && t < V) ? (to_f(z[t]) - m) - log_s : NAN;
    row_stats[4 * row] = m;
    row_stats[4 * row + 1] = log_s;
    row_stats[4 * row + 2] = log_s - mean_d;
    row_stats[4 * row + 3] = sqrtf(var);
    argmax[row] = idx == INT64_MAX ? 0 : idx;
  }
}

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads) rows_bwd_kernel(const float* __restrict__ grad, const T* logits, int64_t V,
                                                            int64_t ld, const int64_t* __restrict__ targets,
                                                            int64_t ignore_index, const float* __restrict__ row_stats,
                                                            O* out, int64_t out_ld) {
  const int64_t row = blockIdx.x;
  const int64_t t = targets[row];
  const T* z = logits + row * ld;
  O* g = out + row * out_ld;
  const float go = grad[row];
  if (t == ignore_index || t < 0 || t >= V || go == 0.f) {
    for (int64_t v = threadIdx.x; v < V; v += kThreads) g[v] = from_f<O>(0.f);
    return;
  }
  const float m = row_stats[4 * row], log_s = row_stats[4 * row + 1];
  const float pt = expf((to_f(z[t]) - m) - log_s);  // true class in float32, read before any write
  __syncthreads();                                   // out may alias logits
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float p = __expf((to_f(z[v]) - m) - log_s);
    g[v] = from_f<O>(v == t ? go * (1.f - pt) : -go * p);
  }
}

template <typename T>
cudaError_t launch_fwd(const void* logits, int64_t n, int64_t V, int64_t ld, const int64_t* targets, int64_t ignore_index,
                       float* lp, float* st, int64_t* am, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  rows_fwd_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(static_cast<const T*>(logits), V, ld, targets,
                                                                         ignore_index, lp, st, am);
  return cudaGetLastError();
}

template <typename T, typename O>
cudaError_t launch_bwd(const float* grad, const void* logits, int64_t n, int64_t V, int64_t ld, const int64_t* targets,
                       int64_t ignore_index, const float* st, void* out, int64_t out_ld, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  rows_bwd_kernel<T, O><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      grad, static_cast<const T*>(logits), V, ld, targets, ignore_index, st, static_cast<O*>(out), out_ld);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd_out(DType out_dtype, const float* grad, const void* logits, int64_t n, int64_t V, int64_t ld,
                           const int64_t* targets, int64_t ignore_index, const float* st, void* out, int64_t out_ld,
                           cudaStream_t stream) {
  switch (out_dtype) {
    case DType::kFloat32: return launch_bwd<T, float>(grad, logits, n, V, ld, targets, ignore_index, st, out, out_ld, stream);
    case DType::kBFloat16:
      return launch_bwd<T, __nv_bfloat16>(grad, logits, n, V, ld, targets, ignore_index, st, out, out_ld, stream);
    case DType::kFloat16: return launch_bwd<T, __half>(grad, logits, n, V, ld, targets, ignore_index, st, out, out_ld, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t token_stats_rows_fwd(const void* logits, DType dtype, int64_t n, int64_t V, int64_t ld,
                                 const int64_t* targets, int64_t ignore_index, float* logprob, float* row_stats,
                                 int64_t* argmax, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_fwd<float>(logits, n, V, ld, targets, ignore_index, logprob, row_stats, argmax, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(logits, n, V, ld, targets, ignore_index, logprob, row_stats, argmax, stream);
    case DType::kFloat16: return launch_fwd<__half>(logits, n, V, ld, targets, ignore_index, logprob, row_stats, argmax, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t token_stats_rows_bwd(const float* grad, const void* logits, DType dtype, int64_t n, int64_t V, int64_t ld,
                                 const int64_t* targets, int64_t ignore_index, const float* row_stats, void* out,
                                 DType out_dtype, int64_t out_ld, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd_out<float>(out_dtype, grad, logits, n, V, ld, targets, ignore_index, row_stats, out, out_ld, stream);
    case DType::kBFloat16:
      return launch_bwd_out<__nv_bfloat16>(out_dtype, grad, logits, n, V, ld, targets, ignore_index, row_stats, out, out_ld,
                                           stream);
    case DType::kFloat16:
      return launch_bwd_out<__half>(out_dtype, grad, logits, n, V, ld, targets, ignore_index, row_stats, out, out_ld, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace uf_cuda
