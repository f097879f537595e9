// CUDA row kernels for the dual masked KL (see dual_masked_kl.cuh).
//
// One block per row.  Each thread streams its share of the row in 16-byte vectors (4
// fp32 or 8 bf16/fp16 logits per load; two vectors of each tensor in flight per step)
// and keeps its own online state in float32:
//   ma, mb          running maxima of a = s/T and b = t/T
//   sa = sum e^(a-ma), sb = sum e^(b-mb), ks = sum K_V e^(b-mb),
//   w  = sum K_V e^(b-mb) ((b-mb) - (a-ma)),  e = sum K_V e^(b-mb) (b-mb)
// (shifted differences, so logits of +-1e4 never cancel in float32).  The states are
// merged by warp shuffles and once across warps; the merge moves both states to the
// larger maxima exactly as the per-chunk update does.  Forward reads both rows once;
// backward reads them once and writes the gradient once.  Rows whose length or pointers
// do not allow aligned 16-byte access run the same kernels with scalar loads.  Offsets
// are 64-bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>

#include "dual_masked_kl.cuh"

namespace uf_cuda {
namespace dmk {
namespace {

constexpr int kWarps = kThreads / 32;
// A finite "minus infinity": an empty state merges into any other as zeros, without
// 0 * inf = NaN in the shift terms (real logits / T are far above it).
constexpr float kNegBig = -1.0e30f;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// K consecutive values at p (p aligned to K * sizeof(T) bytes when that is a multiple of
// 16) as float.  Read-only path: each element is read exactly once.
template <typename T, int K>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float (&x)[K]) {
  if constexpr ((K * sizeof(T)) % 16 == 0) {
    constexpr int kVecs = K * sizeof(T) / 16;
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + j);
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPer; ++k) x[j * kPer + k] = to_f(v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = to_f(__ldg(p + k));
  }
}

template <typename T, int K>
__device__ __forceinline__ void store_from_float(T* __restrict__ p, const float (&x)[K]) {
  if constexpr ((K * sizeof(T)) % 16 == 0) {
    constexpr int kVecs = K * sizeof(T) / 16;
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      uint4 raw;
      T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kPer; ++k) v[k] = from_f<T>(x[j * kPer + k]);
      reinterpret_cast<uint4*>(p)[j] = raw;
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) p[k] = from_f<T>(x[k]);
  }
}

struct State {
  float ma, mb, sa, sb, ks, w, e;
};

__device__ __forceinline__ State empty_state() { return State{kNegBig, kNegBig, 0.f, 0.f, 0.f, 0.f, 0.f}; }

// Raise the state's maxima to (ma, mb) >= its own, rescaling the accumulators.
__device__ __forceinline__ void rebase(State& st, float ma, float mb) {
  const float rise_a = ma - st.ma;  // every (b - mb) - (a - ma) grows by rise_a
  const float rise_b = mb - st.mb;  // every e^(b - mb) shrinks by e^-rise_b, (b - mb) falls by rise_b
  const float rb = __expf(-rise_b);
  st.sa *= __expf(-rise_a);
  st.w = rb * (st.w + st.ks * (rise_a - rise_b));
  st.e = rb * (st.e - st.ks * rise_b);
  st.ks *= rb;
  st.sb *= rb;
  st.ma = ma;
  st.mb = mb;
}

__device__ __forceinline__ State merge(State x, const State& y) {
  State z = y;
  const float ma = fmaxf(x.ma, y.ma), mb = fmaxf(x.mb, y.mb);
  rebase(x, ma, mb);
  rebase(z, ma, mb);
  x.sa += z.sa;
  x.sb += z.sb;
  x.ks += z.ks;
  x.w += z.w;
  x.e += z.e;
  return x;
}

// Fold K values (already divided by T) into a thread's state.
template <int K, bool kHasKv>
__device__ __forceinline__ void accumulate(State& st, const float (&a)[K], const float (&b)[K], const float (&kv)[K]) {
  float cma = a[0], cmb = b[0];
#pragma unroll
  for (int k = 1; k < K; ++k) {
    cma = fmaxf(cma, a[k]);
    cmb = fmaxf(cmb, b[k]);
  }
  if (cma > st.ma || cmb > st.mb) rebase(st, fmaxf(cma, st.ma), fmaxf(cmb, st.mb));
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float da = a[k] - st.ma;
    const float db = b[k] - st.mb;
    const float eb = __expf(db);
    const float keb = kHasKv ? kv[k] * eb : eb;
    st.sa += __expf(da);
    st.sb += eb;
    st.ks += keb;
    // a teacher -inf logit (p = 0) adds nothing: 0 log 0 = 0, not 0 * -inf = NaN
    st.w += keb > 0.f ? keb * (db - da) : 0.f;
    st.e += keb > 0.f ? keb * db : 0.f;
  }
}

__device__ __forceinline__ State shfl_xor(const State& s, int off) {
  return State{__shfl_xor_sync(0xffffffffu, s.ma, off), __shfl_xor_sync(0xffffffffu, s.mb, off),
               __shfl_xor_sync(0xffffffffu, s.sa, off), __shfl_xor_sync(0xffffffffu, s.sb, off),
               __shfl_xor_sync(0xffffffffu, s.ks, off), __shfl_xor_sync(0xffffffffu, s.w, off),
               __shfl_xor_sync(0xffffffffu, s.e, off)};
}

// The merged state of the whole block, valid in thread 0.
__device__ __forceinline__ State block_merge(State st) {
  __shared__ State warp_states[kWarps];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = merge(st, shfl_xor(st, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) st = merge(st, warp_states[w]);
  }
  return st;
}

// K: logits per vector (16 / sizeof(T) on the aligned path, 1 otherwise).  V % K == 0.
template <typename T, int K, bool kHasKv>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const T* __restrict__ student, const T* __restrict__ teacher, int64_t V,
               const float* __restrict__ token_mask, const float* __restrict__ vocab_mask, float inv_t,
               bool cross_entropy, float* __restrict__ rows, float* __restrict__ stats) {
  const int64_t row = blockIdx.x;
  const float keep = token_mask != nullptr ? token_mask[row] : 1.f;
  if (keep == 0.f) {  // uniform across the block
    if (threadIdx.x < kStats) stats[kStats * row + threadIdx.x] = 0.f;
    if (threadIdx.x == 0) rows[row] = 0.f;
    return;
  }
  const T* s = student + row * V;
  const T* t = teacher + row * V;
  const int64_t nvec = V / K;
  State st = empty_state();
  float a0[K], b0[K], a1[K], b1[K], kv0[K], kv1[K];
  int64_t i = threadIdx.x;
  // Two vectors of each tensor in flight per step, then the remainder.
  for (; i + kThreads < nvec; i += 2 * kThreads) {
    load_as_float<T, K>(s + i * K, a0);
    load_as_float<T, K>(t + i * K, b0);
    load_as_float<T, K>(s + (i + kThreads) * K, a1);
    load_as_float<T, K>(t + (i + kThreads) * K, b1);
    if (kHasKv) {
      load_as_float<float, K>(vocab_mask + i * K, kv0);
      load_as_float<float, K>(vocab_mask + (i + kThreads) * K, kv1);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      a0[k] *= inv_t;
      b0[k] *= inv_t;
      a1[k] *= inv_t;
      b1[k] *= inv_t;
    }
    accumulate<K, kHasKv>(st, a0, b0, kv0);
    accumulate<K, kHasKv>(st, a1, b1, kv1);
  }
  for (; i < nvec; i += kThreads) {
    load_as_float<T, K>(s + i * K, a0);
    load_as_float<T, K>(t + i * K, b0);
    if (kHasKv) load_as_float<float, K>(vocab_mask + i * K, kv0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      a0[k] *= inv_t;
      b0[k] *= inv_t;
    }
    accumulate<K, kHasKv>(st, a0, b0, kv0);
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const float log_sa = logf(st.sa), log_sb = logf(st.sb);
    const float kept = st.ks / st.sb;
    float loss = st.w / st.sb + kept * (log_sa - log_sb);
    if (cross_entropy) loss -= st.e / st.sb - kept * log_sb;
    rows[row] = keep * loss;
    float* out = stats + kStats * row;
    out[0] = st.ma;
    out[1] = log_sa;
    out[2] = st.mb;
    out[3] = log_sb;
    out[4] = kept;
  }
}

template <typename T, int K, bool kHasKv>
__device__ __forceinline__ void grad_vector(const T* __restrict__ s, const T* __restrict__ t,
                                            const float* __restrict__ vocab_mask, T* __restrict__ g, int64_t i,
                                            float inv_t, float ma, float log_sa, float mb, float log_sb, float kept,
                                            float scale) {
  float a[K], b[K], kv[K], out[K];
  load_as_float<T, K>(s + i * K, a);
  load_as_float<T, K>(t + i * K, b);
  if (kHasKv) load_as_float<float, K>(vocab_mask + i * K, kv);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float q = __expf((a[k] * inv_t - ma) - log_sa);
    float p = __expf((b[k] * inv_t - mb) - log_sb);
    if (kHasKv) p *= kv[k];
    out[k] = scale * (q * kept - p);
  }
  store_from_float<T, K>(g + i * K, out);
}

template <typename T, int K, bool kHasKv>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const float* __restrict__ grad_rows, const T* __restrict__ student, const T* __restrict__ teacher,
               int64_t V, const float* __restrict__ token_mask, const float* __restrict__ vocab_mask,
               const float* __restrict__ stats, float inv_t, T* __restrict__ grad) {
  const int64_t row = blockIdx.x;
  const int64_t nvec = V / K;
  T* g = grad + row * V;
  const float scale = grad_rows[row] * inv_t * (token_mask != nullptr ? token_mask[row] : 1.f);
  if (scale == 0.f) {  // masked row or zero incoming gradient (its statistics are zeros)
    float zeros[K];
#pragma unroll
    for (int k = 0; k < K; ++k) zeros[k] = 0.f;
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) store_from_float<T, K>(g + i * K, zeros);
    return;
  }
  const float* st = stats + kStats * row;
  const float ma = st[0], log_sa = st[1], mb = st[2], log_sb = st[3], kept = st[4];
  const T* s = student + row * V;
  const T* t = teacher + row * V;
  int64_t i = threadIdx.x;
  for (; i + kThreads < nvec; i += 2 * kThreads) {
    grad_vector<T, K, kHasKv>(s, t, vocab_mask, g, i, inv_t, ma, log_sa, mb, log_sb, kept, scale);
    grad_vector<T, K, kHasKv>(s, t, vocab_mask, g, i + kThreads, inv_t, ma, log_sa, mb, log_sb, kept, scale);
  }
  for (; i < nvec; i += kThreads) {
    grad_vector<T, K, kHasKv>(s, t, vocab_mask, g, i, inv_t, ma, log_sa, mb, log_sb, kept, scale);
  }
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Vectors of 16 bytes when every row starts 16-byte aligned, else scalar access.
template <typename T>
bool use_vectors(int64_t V, std::initializer_list<const void*> ptrs) {
  if ((V * static_cast<int64_t>(sizeof(T))) % 16 != 0) return false;
  for (const void* p : ptrs) {
    if (!aligned16(p)) return false;
  }
  return true;
}

template <typename T>
cudaError_t launch_fwd(const void* student, const void* teacher, int64_t n, int64_t V, const float* ks,
                       const float* kv, float inv_t, bool ce, float* rows, float* stats, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > 0x7fffffff || V <= 0) return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(T);
  const T* s = static_cast<const T*>(student);
  const T* t = static_cast<const T*>(teacher);
  const dim3 grid(static_cast<unsigned>(n));
  if (use_vectors<T>(V, {student, teacher, kv})) {
    if (kv != nullptr) {
      fwd_kernel<T, kVec, true><<<grid, kThreads, 0, stream>>>(s, t, V, ks, kv, inv_t, ce, rows, stats);
    } else {
      fwd_kernel<T, kVec, false><<<grid, kThreads, 0, stream>>>(s, t, V, ks, kv, inv_t, ce, rows, stats);
    }
  } else if (kv != nullptr) {
    fwd_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(s, t, V, ks, kv, inv_t, ce, rows, stats);
  } else {
    fwd_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(s, t, V, ks, kv, inv_t, ce, rows, stats);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const float* go, const void* student, const void* teacher, int64_t n, int64_t V,
                       const float* ks, const float* kv, const float* stats, float inv_t, void* grad,
                       cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > 0x7fffffff || V <= 0) return cudaErrorInvalidValue;
  constexpr int kVec = 16 / sizeof(T);
  const T* s = static_cast<const T*>(student);
  const T* t = static_cast<const T*>(teacher);
  T* g = static_cast<T*>(grad);
  const dim3 grid(static_cast<unsigned>(n));
  if (use_vectors<T>(V, {student, teacher, kv, grad})) {
    if (kv != nullptr) {
      bwd_kernel<T, kVec, true><<<grid, kThreads, 0, stream>>>(go, s, t, V, ks, kv, stats, inv_t, g);
    } else {
      bwd_kernel<T, kVec, false><<<grid, kThreads, 0, stream>>>(go, s, t, V, ks, kv, stats, inv_t, g);
    }
  } else if (kv != nullptr) {
    bwd_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(go, s, t, V, ks, kv, stats, inv_t, g);
  } else {
    bwd_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(go, s, t, V, ks, kv, stats, inv_t, g);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t forward(const void* student, const void* teacher, DType dtype, int64_t n, int64_t V,
                    const float* token_mask, const float* vocab_mask, float inv_temperature, bool cross_entropy,
                    float* rows, float* stats, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_fwd<float>(student, teacher, n, V, token_mask, vocab_mask, inv_temperature, cross_entropy, rows,
                               stats, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(student, teacher, n, V, token_mask, vocab_mask, inv_temperature,
                                       cross_entropy, rows, stats, stream);
    case DType::kFloat16:
      return launch_fwd<__half>(student, teacher, n, V, token_mask, vocab_mask, inv_temperature, cross_entropy, rows,
                                stats, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t backward(const float* grad_rows, const void* student, const void* teacher, DType dtype, int64_t n,
                     int64_t V, const float* token_mask, const float* vocab_mask, const float* stats,
                     float inv_temperature, void* grad, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_bwd<float>(grad_rows, student, teacher, n, V, token_mask, vocab_mask, stats, inv_temperature,
                               grad, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(grad_rows, student, teacher, n, V, token_mask, vocab_mask, stats,
                                       inv_temperature, grad, stream);
    case DType::kFloat16:
      return launch_bwd<__half>(grad_rows, student, teacher, n, V, token_mask, vocab_mask, stats, inv_temperature,
                                grad, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dmk
}  // namespace uf_cuda
