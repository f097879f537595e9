// Saliency ops: CUDA multi-tensor kernels (see saliency.cuh for the table layout and
// the semantics of each launcher).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "saliency.cuh"

namespace uf_cuda {
namespace saliency {
namespace {

struct TableView {
  const int64_t* data;
  int64_t T;

  __device__ int64_t numel(int64_t t) const { return data[t]; }
  __device__ int64_t item(int list, int64_t t) const { return data[(1 + list) * T + t]; }
  template <typename P>
  __device__ P* ptr(int list, int64_t t) const {
    return reinterpret_cast<P*>(static_cast<uintptr_t>(item(list, t)));
  }
  __device__ int64_t first_block(int64_t t) const { return data[(1 + kLists) * T + t]; }

  // The tensor of block b: the last t with first_block(t) <= b (empty tensors own no block).
  __device__ int64_t tensor_of(int64_t b) const {
    int64_t lo = 0, hi = T;  // invariant: first_block(lo) <= b < first_block(hi)
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (first_block(mid) <= b) lo = mid; else hi = mid;
    }
    return lo;
  }
};

// This block's tensor, first element and end.
struct Work {
  int64_t t, start, end, n;
};

__device__ __forceinline__ Work locate(const TableView& tv) {
  const int64_t b = blockIdx.x;
  const int64_t t = tv.tensor_of(b);
  const int64_t n = tv.numel(t);
  const int64_t start = (b - tv.first_block(t)) * kChunk;
  const int64_t end = start + kChunk < n ? start + kChunk : n;
  return {t, start, end, n};
}

__device__ __forceinline__ float ld(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float ld(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void st(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void st(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

__device__ __forceinline__ uint32_t abs_key(float v) { return __float_as_uint(v) & 0x7fffffffu; }

__device__ __forceinline__ bool mask_bit(const uint32_t* words, int64_t i) {
  return (words[i >> 5] >> (i & 31)) & 1u;
}

// Sum over the block; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? scratch[threadIdx.x] : 0.f;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

__device__ __forceinline__ long long block_sum_ll(long long v, long long* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? scratch[threadIdx.x] : 0;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// ------------------------------------------------------------------------------------
template <typename G>
__global__ void fisher_kernel(TableView tv, float scale) {
  const Work w = locate(tv);
  float* f = tv.ptr<float>(0, w.t);
  const G* g = tv.ptr<const G>(1, w.t);
  for (int64_t i = w.start + threadIdx.x; i < w.end; i += blockDim.x) {
    const float x = ld(g, i);
    f[i] = f[i] + scale * (x * x);
  }
}

// Each warp writes whole words: lane j decides element 32 q + j, __ballot_sync packs them.
template <typename Pred>
__device__ __forceinline__ void write_words(const Work& w, uint32_t* words, Pred pred) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t base = w.start + 32 * warp; base < w.end; base += 32 * warps) {
    const int64_t i = base + lane;
    const bool bit = i < w.end && pred(i);
    const uint32_t word = __ballot_sync(0xffffffffu, bit);
    if (lane == 0) words[base >> 5] = word;
  }
}

__global__ void ratio_kernel(TableView tv, float threshold, float eps) {
  const Work w = locate(tv);
  const float* a = tv.ptr<const float>(1, w.t);
  const float* b = tv.ptr<const float>(2, w.t);
  write_words(w, tv.ptr<uint32_t>(0, w.t),
              [&](int64_t i) { return __fdiv_rn(__fadd_rn(a[i], eps), __fadd_rn(b[i], eps)) >= threshold; });
}

template <typename S>
__global__ void histogram_kernel(TableView tv, int shift, int bits, int prefix_shift, uint32_t prefix,
                                 unsigned long long* hist) {
  extern __shared__ uint32_t local[];
  const int nb = 1 << bits;
  for (int i = threadIdx.x; i < nb; i += blockDim.x) local[i] = 0;
  __syncthreads();
  const Work w = locate(tv);
  const S* x = tv.ptr<const S>(0, w.t);
  const uint32_t digit_mask = static_cast<uint32_t>(nb - 1);
  for (int64_t i = w.start + threadIdx.x; i < w.end; i += blockDim.x) {
    const uint32_t k = abs_key(ld(x, i));
    // prefix_shift == 31 selects everything (keys are below 2^31)
    if ((k >> prefix_shift) == prefix) atomicAdd(&local[(k >> shift) & digit_mask], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nb; i += blockDim.x) {
    if (local[i]) atomicAdd(&hist[i], static_cast<unsigned long long>(local[i]));
  }
}

template <typename S>
__global__ void count_equal_kernel(TableView tv, uint32_t key, unsigned long long* counts) {
  __shared__ long long scratch[32];
  const Work w = locate(tv);
  const S* x = tv.ptr<const S>(0, w.t);
  long long c = 0;
  for (int64_t i = w.start + threadIdx.x; i < w.end; i += blockDim.x) c += abs_key(ld(x, i)) == key;
  c = block_sum_ll(c, scratch);
  if (threadIdx.x == 0 && c) atomicAdd(&counts[w.t], static_cast<unsigned long long>(c));
}

template <typename S>
__global__ void topk_mask_kernel(TableView tv, uint32_t key) {
  const Work w = locate(tv);
  const S* x = tv.ptr<const S>(1, w.t);
  const int64_t limit = tv.item(2, w.t);
  write_words(w, tv.ptr<uint32_t>(0, w.t), [&](int64_t i) {
    const uint32_t k = abs_key(ld(x, i));
    return k > key || (k == key && i < limit);
  });
}

template <bool kMask, bool kGeom, typename G>
__device__ __forceinline__ float transformed(float g, const uint32_t* words, const float* fisher, int64_t i,
                                             float lam) {
  if (kGeom) g = __fdiv_rn(g, fisher[i] + lam);
  if (kMask) g = mask_bit(words, i) ? g : 0.f;
  return g;
}

template <typename G, bool kMask, bool kGeom, bool kRetain>
__global__ void reduce_kernel(TableView tv, float lam, float* partials) {
  __shared__ float scratch[32];
  const Work w = locate(tv);
  const G* g = tv.ptr<const G>(0, w.t);
  const uint32_t* words = kMask ? tv.ptr<const uint32_t>(1, w.t) : nullptr;
  const float* fisher = kGeom ? tv.ptr<const float>(2, w.t) : nullptr;
  const G* r = kRetain ? tv.ptr<const G>(3, w.t) : nullptr;
  float s0 = 0.f, s1 = 0.f, s2 = 0.f;
  for (int64_t i = w.start + threadIdx.x; i < w.end; i += blockDim.x) {
    const float x = ld(g, i);
    s0 += x * x;
    if (kRetain) {
      const float rv = ld(r, i);
      s1 += transformed<kMask, kGeom, G>(x, words, fisher, i, lam) * rv;
      s2 += rv * rv;
    }
  }
  s0 = block_sum(s0, scratch);
  s1 = block_sum(s1, scratch);
  s2 = block_sum(s2, scratch);
  if (threadIdx.x == 0) {
    partials[3 * blockIdx.x] = s0;
    partials[3 * blockIdx.x + 1] = s1;
    partials[3 * blockIdx.x + 2] = s2;
  }
}

template <typename G, bool kMask, bool kGeom, bool kRetain>
__global__ void apply_kernel(TableView tv, float lam, const float* coef) {
  const Work w = locate(tv);
  G* g = tv.ptr<G>(0, w.t);
  const uint32_t* words = kMask ? tv.ptr<const uint32_t>(1, w.t) : nullptr;
  const float* fisher = kGeom ? tv.ptr<const float>(2, w.t) : nullptr;
  const G* r = kRetain ? tv.ptr<const G>(3, w.t) : nullptr;
  const float clip = coef[0];
  const float alpha = kRetain ? coef[1] : 0.f;
  for (int64_t i = w.start + threadIdx.x; i < w.end; i += blockDim.x) {
    float out = clip * transformed<kMask, kGeom, G>(ld(g, i), words, fisher, i, lam);
    if (kRetain) out -= alpha * ld(r, i);
    st(g, i, out);
  }
}

template <typename T>
__global__ void reset_kernel(TableView tv) {
  const Work w = locate(tv);
  T* p = tv.ptr<T>(0, w.t);
  const T* o = tv.ptr<const T>(1, w.t);
  const uint32_t* words = tv.ptr<const uint32_t>(2, w.t);
  for (int64_t i = w.start + threadIdx.x; i < w.end; i += blockDim.x) {
    if (!mask_bit(words, i)) p[i] = o[i];
  }
}

__global__ void popcount_kernel(TableView tv, unsigned long long* total) {
  __shared__ long long scratch[32];
  const Work w = locate(tv);
  const uint32_t* words = tv.ptr<const uint32_t>(0, w.t);
  long long c = 0;
  for (int64_t i = w.start + threadIdx.x; i < w.end; i += blockDim.x) c += __popc(words[i]);
  c = block_sum_ll(c, scratch);
  if (threadIdx.x == 0 && c) atomicAdd(total, static_cast<unsigned long long>(c));
}

// ------------------------------------------------------------------------------------
template <typename F>
cudaError_t dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

bool empty(const Table& t) { return t.num_tensors == 0 || t.num_blocks == 0; }
TableView view(const Table& t) { return TableView{t.data, t.num_tensors}; }

// Grid x is limited to 2^31 - 1 blocks: 1.7e13 elements at kChunk, never reached.
dim3 grid(const Table& t) { return dim3(static_cast<unsigned>(t.num_blocks)); }

template <typename G, bool M, bool Gm>
cudaError_t launch_reduce_r(const Table& t, bool retain, float lam, float* partials, cudaStream_t s) {
  if (retain) reduce_kernel<G, M, Gm, true><<<grid(t), kThreads, 0, s>>>(view(t), lam, partials);
  else reduce_kernel<G, M, Gm, false><<<grid(t), kThreads, 0, s>>>(view(t), lam, partials);
  return cudaGetLastError();
}

template <typename G, bool M, bool Gm>
cudaError_t launch_apply_r(const Table& t, bool retain, float lam, const float* coef, cudaStream_t s) {
  if (retain) apply_kernel<G, M, Gm, true><<<grid(t), kThreads, 0, s>>>(view(t), lam, coef);
  else apply_kernel<G, M, Gm, false><<<grid(t), kThreads, 0, s>>>(view(t), lam, coef);
  return cudaGetLastError();
}

}  // namespace

cudaError_t fisher_accumulate(Table table, DType gdt, float scale, cudaStream_t stream) {
  if (empty(table)) return cudaSuccess;
  return dispatch_dtype(gdt, [&](auto tag) {
    fisher_kernel<decltype(tag)><<<grid(table), kThreads, 0, stream>>>(view(table), scale);
    return cudaGetLastError();
  });
}

cudaError_t ratio_mask(Table table, float threshold, float eps, cudaStream_t stream) {
  if (empty(table)) return cudaSuccess;
  ratio_kernel<<<grid(table), kThreads, 0, stream>>>(view(table), threshold, eps);
  return cudaGetLastError();
}

cudaError_t abs_histogram(Table table, DType sdt, int shift, int bits, int prefix_shift, uint32_t prefix,
                          int64_t* hist, cudaStream_t stream) {
  if (bits < 0 || bits > kMaxHistogramBits || shift < 0 || shift + bits > 31 || prefix_shift > 31) {
    return cudaErrorInvalidValue;
  }
  if (empty(table)) return cudaSuccess;
  const size_t smem = sizeof(uint32_t) << bits;
  return dispatch_dtype(sdt, [&](auto tag) {
    histogram_kernel<decltype(tag)><<<grid(table), kThreads, smem, stream>>>(
        view(table), shift, bits, prefix_shift, prefix, reinterpret_cast<unsigned long long*>(hist));
    return cudaGetLastError();
  });
}

cudaError_t count_equal(Table table, DType sdt, uint32_t key, int64_t* counts, cudaStream_t stream) {
  if (empty(table)) return cudaSuccess;
  return dispatch_dtype(sdt, [&](auto tag) {
    count_equal_kernel<decltype(tag)><<<grid(table), kThreads, 0, stream>>>(
        view(table), key, reinterpret_cast<unsigned long long*>(counts));
    return cudaGetLastError();
  });
}

cudaError_t topk_mask(Table table, DType sdt, uint32_t key, cudaStream_t stream) {
  if (empty(table)) return cudaSuccess;
  return dispatch_dtype(sdt, [&](auto tag) {
    topk_mask_kernel<decltype(tag)><<<grid(table), kThreads, 0, stream>>>(view(table), key);
    return cudaGetLastError();
  });
}

cudaError_t transform_reduce(Table table, DType gdt, bool has_mask, bool geometry, bool retain, float lam,
                             float* partials, cudaStream_t stream) {
  if (empty(table)) return cudaSuccess;
  return dispatch_dtype(gdt, [&](auto tag) {
    using G = decltype(tag);
    if (has_mask) {
      return geometry ? launch_reduce_r<G, true, true>(table, retain, lam, partials, stream)
                      : launch_reduce_r<G, true, false>(table, retain, lam, partials, stream);
    }
    return geometry ? launch_reduce_r<G, false, true>(table, retain, lam, partials, stream)
                    : launch_reduce_r<G, false, false>(table, retain, lam, partials, stream);
  });
}

cudaError_t transform_apply(Table table, DType gdt, bool has_mask, bool geometry, bool retain, float lam,
                            const float* coef, cudaStream_t stream) {
  if (empty(table)) return cudaSuccess;
  return dispatch_dtype(gdt, [&](auto tag) {
    using G = decltype(tag);
    if (has_mask) {
      return geometry ? launch_apply_r<G, true, true>(table, retain, lam, coef, stream)
                      : launch_apply_r<G, true, false>(table, retain, lam, coef, stream);
    }
    return geometry ? launch_apply_r<G, false, true>(table, retain, lam, coef, stream)
                    : launch_apply_r<G, false, false>(table, retain, lam, coef, stream);
  });
}

cudaError_t reset_unmasked(Table table, int element_size, cudaStream_t stream) {
  if (empty(table)) return cudaSuccess;
  switch (element_size) {
    case 2: reset_kernel<uint16_t><<<grid(table), kThreads, 0, stream>>>(view(table)); break;
    case 4: reset_kernel<uint32_t><<<grid(table), kThreads, 0, stream>>>(view(table)); break;
    case 8: reset_kernel<uint64_t><<<grid(table), kThreads, 0, stream>>>(view(table)); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t popcount(Table table, int64_t* total, cudaStream_t stream) {
  if (empty(table)) return cudaSuccess;
  popcount_kernel<<<grid(table), kThreads, 0, stream>>>(view(table), reinterpret_cast<unsigned long long*>(total));
  return cudaGetLastError();
}

}  // namespace saliency
}  // namespace uf_cuda
