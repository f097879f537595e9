// Torch bindings of the CUDA saliency kernels (kernels/saliency.cu).
//
// torch.ops.unlearn_fast_cuda.saliency_*: the same schemas as the CPU ops
// (csrc/saliency.cpp).  Each call builds one small multi-tensor table (6T + 1 int64:
// counts, pointers, first block per tensor) in pinned host memory, copies it to the
// device asynchronously, and makes one launch for the whole list.  Results that need a
// reduction come back as device tensors; nothing here synchronises with the host.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "saliency.cuh"

namespace uf {
namespace {

namespace sk = uf_cuda::saliency;

void check_cuda(cudaError_t err, const char* fn) {
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA launch failed: ", cudaGetErrorString(err));
}

sk::DType dtype_of(at::ScalarType st, const char* fn) {
  switch (st) {
    case at::kFloat: return sk::DType::kFloat32;
    case at::kBFloat16: return sk::DType::kBFloat16;
    case at::kHalf: return sk::DType::kFloat16;
    default: TORCH_CHECK(false, fn, ": unsupported dtype ", st, " (float32/bfloat16/float16)");
  }
}

at::ScalarType list_dtype(at::TensorList ts, const char* fn, const char* name) {
  TORCH_CHECK(!ts.empty(), fn, ": empty ", name, " list");
  const auto dt = ts[0].scalar_type();
  for (const auto& t : ts) TORCH_CHECK(t.scalar_type() == dt, fn, ": ", name, " must share one dtype");
  return dt;
}

void check_list(at::TensorList ts, const at::Device& dev, const char* fn, const char* name) {
  for (const auto& t : ts) {
    TORCH_CHECK(t.device() == dev && t.is_contiguous(), fn, ": ", name, " must be contiguous tensors on ", dev);
  }
}

void check_pair(at::TensorList a, at::TensorList b, const at::Device& dev, const char* fn, const char* na,
                const char* nb, bool allow_empty_b) {
  if (allow_empty_b && b.empty()) return;
  TORCH_CHECK(a.size() == b.size(), fn, ": ", na, " and ", nb, " have different lengths");
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].numel() == b[i].numel(), fn, ": ", na, "[", i, "] and ", nb, "[", i, "] differ in size");
  }
  check_list(b, dev, fn, nb);
}

void check_words(at::TensorList words, at::TensorList data, const at::Device& dev, const char* fn, bool allow_empty) {
  if (allow_empty && words.empty()) return;
  TORCH_CHECK(words.size() == data.size(), fn, ": words and data lists have different lengths");
  for (size_t i = 0; i < words.size(); ++i) {
    TORCH_CHECK(words[i].scalar_type() == at::kInt && words[i].is_contiguous() && words[i].device() == dev &&
                    words[i].numel() == (data[i].numel() + 31) / 32,
                fn, ": words[", i, "] must be a contiguous int32 tensor of ceil(numel / 32) words on ", dev);
  }
}

void check_float32(at::TensorList ts, const char* fn, const char* name) {
  for (const auto& t : ts) TORCH_CHECK(t.scalar_type() == at::kFloat, fn, ": ", name, " must be float32");
}

std::vector<int64_t> pointers(at::TensorList ts) {
  std::vector<int64_t> p;
  p.reserve(ts.size());
  for (const auto& t : ts) p.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  return p;
}

// The device table for tensors of `numels` (see kernels/saliency.cuh) and its launch info.
struct DeviceTable {
  at::Tensor storage;
  sk::Table table;
};

DeviceTable make_table(const std::vector<int64_t>& numels, const std::vector<std::vector<int64_t>>& lists,
                       const at::Device& dev) {
  const int64_t T = static_cast<int64_t>(numels.size());
  at::Tensor host = at::empty({sk::table_size(T)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::fill(h, h + sk::table_size(T), int64_t(0));
  for (int64_t t = 0; t < T; ++t) h[t] = numels[t];
  for (size_t k = 0; k < lists.size(); ++k) {
    TORCH_CHECK(k < static_cast<size_t>(sk::kLists) && static_cast<int64_t>(lists[k].size()) == T,
                "saliency: bad table list");
    std::copy(lists[k].begin(), lists[k].end(), h + (1 + k) * T);
  }
  int64_t blocks = 0;
  int64_t* first = h + (1 + sk::kLists) * T;
  for (int64_t t = 0; t < T; ++t) {
    first[t] = blocks;
    blocks += (numels[t] + sk::kChunk - 1) / sk::kChunk;
  }
  first[T] = blocks;
  at::Tensor device = host.to(dev, /*non_blocking=*/true);
  return {device, sk::Table{device.data_ptr<int64_t>(), T, blocks}};
}

std::vector<int64_t> numels_of(at::TensorList ts) {
  std::vector<int64_t> n;
  for (const auto& t : ts) n.push_back(t.numel());
  return n;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// ------------------------------------------------------------------------------------
void fisher_accumulate(at::TensorList fisher, at::TensorList grads, double scale) {
  const char* fn = "saliency_fisher_accumulate";
  if (fisher.empty()) return;
  const at::Device dev = fisher[0].device();
  TORCH_CHECK(dev.is_cuda(), fn, ": CUDA tensors expected");
  c10::cuda::CUDAGuard guard(dev);
  check_list(fisher, dev, fn, "fisher");
  check_float32(fisher, fn, "fisher");
  check_pair(fisher, grads, dev, fn, "fisher", "grads", false);
  auto tab = make_table(numels_of(fisher), {pointers(fisher), pointers(grads)}, dev);
  check_cuda(sk::fisher_accumulate(tab.table, dtype_of(list_dtype(grads, fn, "grads"), fn), static_cast<float>(scale),
                                   stream()),
             fn);
}

void ratio_mask(at::TensorList words, at::TensorList forget, at::TensorList preserve, double threshold, double eps) {
  const char* fn = "saliency_ratio_mask";
  if (forget.empty()) return;
  const at::Device dev = forget[0].device();
  TORCH_CHECK(dev.is_cuda(), fn, ": CUDA tensors expected");
  c10::cuda::CUDAGuard guard(dev);
  check_list(forget, dev, fn, "forget");
  check_float32(forget, fn, "forget");
  check_float32(preserve, fn, "preserve");
  check_pair(forget, preserve, dev, fn, "forget", "preserve", false);
  check_words(words, forget, dev, fn, false);
  auto tab = make_table(numels_of(forget), {pointers(words), pointers(forget), pointers(preserve)}, dev);
  check_cuda(sk::ratio_mask(tab.table, static_cast<float>(threshold), static_cast<float>(eps), stream()), fn);
}

at::Tensor abs_histogram(at::TensorList scores, int64_t shift, int64_t bits, int64_t prefix_shift, int64_t prefix) {
  const char* fn = "saliency_abs_histogram";
  TORCH_CHECK(!scores.empty(), fn, ": empty scores list");
  TORCH_CHECK(bits >= 0 && bits <= sk::kMaxHistogramBits && shift >= 0 && shift + bits <= 31 &&
                  prefix_shift >= shift + bits && prefix_shift <= 31 && prefix >= 0,
              fn, ": bad digit (shift=", shift, ", bits=", bits, ", prefix_shift=", prefix_shift, ")");
  const at::Device dev = scores[0].device();
  TORCH_CHECK(dev.is_cuda(), fn, ": CUDA tensors expected");
  c10::cuda::CUDAGuard guard(dev);
  check_list(scores, dev, fn, "scores");
  at::Tensor hist = at::zeros({int64_t(1) << bits}, at::TensorOptions().dtype(at::kLong).device(dev));
  auto tab = make_table(numels_of(scores), {pointers(scores)}, dev);
  check_cuda(sk::abs_histogram(tab.table, dtype_of(list_dtype(scores, fn, "scores"), fn), static_cast<int>(shift),
                               static_cast<int>(bits), static_cast<int>(prefix_shift), static_cast<uint32_t>(prefix),
                               hist.data_ptr<int64_t>(), stream()),
             fn);
  return hist;
}

at::Tensor count_equal(at::TensorList scores, int64_t key) {
  const char* fn = "saliency_count_equal";
  TORCH_CHECK(!scores.empty(), fn, ": empty scores list");
  const at::Device dev = scores[0].device();
  TORCH_CHECK(dev.is_cuda(), fn, ": CUDA tensors expected");
  c10::cuda::CUDAGuard guard(dev);
  check_list(scores, dev, fn, "scores");
  at::Tensor counts = at::zeros({static_cast<int64_t>(scores.size())}, at::TensorOptions().dtype(at::kLong).device(dev));
  auto tab = make_table(numels_of(scores), {pointers(scores)}, dev);
  check_cuda(sk::count_equal(tab.table, dtype_of(list_dtype(scores, fn, "scores"), fn), static_cast<uint32_t>(key),
                             counts.data_ptr<int64_t>(), stream()),
             fn);
  return counts;
}

void topk_mask(at::TensorList words, at::TensorList scores, int64_t key, at::IntArrayRef tie_limits) {
  const char* fn = "saliency_topk_mask";
  if (scores.empty()) return;
  const at::Device dev = scores[0].device();
  TORCH_CHECK(dev.is_cuda(), fn, ": CUDA tensors expected");
  c10::cuda::CUDAGuard guard(dev);
  check_list(scores, dev, fn, "scores");
  check_words(words, scores, dev, fn, false);
  TORCH_CHECK(tie_limits.size() == scores.size(), fn, ": one tie limit per tensor expected");
  auto tab = make_table(numels_of(scores), {pointers(words), pointers(scores), tie_limits.vec()}, dev);
  check_cuda(sk::topk_mask(tab.table, dtype_of(list_dtype(scores, fn, "scores"), fn), static_cast<uint32_t>(key),
                           stream()),
             fn);
}

DeviceTable transform_table(at::TensorList grads, at::TensorList words, at::TensorList preserve, at::TensorList retain,
                            const char* fn) {
  const at::Device dev = grads[0].device();
  TORCH_CHECK(dev.is_cuda(), fn, ": CUDA tensors expected");
  check_list(grads, dev, fn, "grads");
  check_words(words, grads, dev, fn, true);
  check_float32(preserve, fn, "preserve");
  check_pair(grads, preserve, dev, fn, "grads", "preserve", true);
  check_pair(grads, retain, dev, fn, "grads", "retain", true);
  if (!retain.empty()) {
    TORCH_CHECK(list_dtype(retain, fn, "retain") == list_dtype(grads, fn, "grads"), fn,
                ": retain must have the gradients' dtype");
  }
  const std::vector<int64_t> none(grads.size(), 0);
  return make_table(numels_of(grads),
                    {pointers(grads), words.empty() ? none : pointers(words),
                     preserve.empty() ? none : pointers(preserve), retain.empty() ? none : pointers(retain)},
                    dev);
}

at::Tensor transform_reduce(at::TensorList grads, at::TensorList words, at::TensorList preserve, at::TensorList retain,
                            double lam) {
  const char* fn = "saliency_transform_reduce";
  TORCH_CHECK(!grads.empty(), fn, ": empty grads list");
  c10::cuda::CUDAGuard guard(grads[0].device());
  auto tab = transform_table(grads, words, preserve, retain, fn);
  at::Tensor partials = at::zeros({std::max<int64_t>(tab.table.num_blocks, 1), 3},
                                  at::TensorOptions().dtype(at::kFloat).device(grads[0].device()));
  check_cuda(sk::transform_reduce(tab.table, dtype_of(list_dtype(grads, fn, "grads"), fn), !words.empty(),
                                  !preserve.empty(), !retain.empty(), static_cast<float>(lam),
                                  partials.data_ptr<float>(), stream()),
             fn);
  return partials.to(at::kDouble).sum(0);  // float64 over the per-block partials, deterministic
}

void transform_apply(at::TensorList grads, at::TensorList words, at::TensorList preserve, at::TensorList retain,
                     double lam, const at::Tensor& coef) {
  const char* fn = "saliency_transform_apply";
  if (grads.empty()) return;
  c10::cuda::CUDAGuard guard(grads[0].device());
  auto tab = transform_table(grads, words, preserve, retain, fn);
  at::Tensor c = coef.to(grads[0].device(), at::kFloat).contiguous();
  TORCH_CHECK(c.numel() == 2, fn, ": coef must hold [clip, alpha]");
  check_cuda(sk::transform_apply(tab.table, dtype_of(list_dtype(grads, fn, "grads"), fn), !words.empty(),
                                 !preserve.empty(), !retain.empty(), static_cast<float>(lam), c.data_ptr<float>(),
                                 stream()),
             fn);
}

void reset_unmasked(at::TensorList params, at::TensorList originals, at::TensorList words) {
  const char* fn = "saliency_reset";
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  TORCH_CHECK(dev.is_cuda(), fn, ": CUDA tensors expected");
  c10::cuda::CUDAGuard guard(dev);
  check_list(params, dev, fn, "params");
  check_pair(params, originals, dev, fn, "params", "originals", false);
  check_words(words, params, dev, fn, false);
  TORCH_CHECK(list_dtype(originals, fn, "originals") == list_dtype(params, fn, "params"), fn,
              ": originals must have the parameters' dtype");
  auto tab = make_table(numels_of(params), {pointers(params), pointers(originals), pointers(words)}, dev);
  check_cuda(sk::reset_unmasked(tab.table, static_cast<int>(params[0].element_size()), stream()), fn);
}

at::Tensor popcount(at::TensorList words) {
  const char* fn = "saliency_popcount";
  TORCH_CHECK(!words.empty(), fn, ": empty words list");
  const at::Device dev = words[0].device();
  TORCH_CHECK(dev.is_cuda(), fn, ": CUDA tensors expected");
  c10::cuda::CUDAGuard guard(dev);
  for (const auto& w : words) {
    TORCH_CHECK(w.scalar_type() == at::kInt && w.is_contiguous() && w.device() == dev, fn,
                ": words must be contiguous int32 tensors on one device");
  }
  at::Tensor total = at::zeros({}, at::TensorOptions().dtype(at::kLong).device(dev));
  auto tab = make_table(numels_of(words), {pointers(words)}, dev);
  check_cuda(sk::popcount(tab.table, total.data_ptr<int64_t>(), stream()), fn);
  return total;
}

}  // namespace
}  // namespace uf

TORCH_LIBRARY_FRAGMENT(unlearn_fast_cuda, m) {
  m.def("saliency_fisher_accumulate(Tensor(a!)[] fisher, Tensor[] grads, float scale) -> ()", &uf::fisher_accumulate);
  m.def("saliency_ratio_mask(Tensor(a!)[] words, Tensor[] forget, Tensor[] preserve, float threshold, float eps) -> ()",
        &uf::ratio_mask);
  m.def("saliency_abs_histogram(Tensor[] scores, int shift, int bits, int prefix_shift, int prefix) -> Tensor",
        &uf::abs_histogram);
  m.def("saliency_count_equal(Tensor[] scores, int key) -> Tensor", &uf::count_equal);
  m.def("saliency_topk_mask(Tensor(a!)[] words, Tensor[] scores, int key, int[] tie_limits) -> ()", &uf::topk_mask);
  m.def("saliency_transform_reduce(Tensor[] grads, Tensor[] words, Tensor[] preserve, Tensor[] retain, float lam) -> Tensor",
        &uf::transform_reduce);
  m.def("saliency_transform_apply(Tensor(a!)[] grads, Tensor[] words, Tensor[] preserve, Tensor[] retain, float lam, "
        "Tensor coef) -> ()",
        &uf::transform_apply);
  m.def("saliency_reset(Tensor(a!)[] params, Tensor[] originals, Tensor[] words) -> ()", &uf::reset_unmasked);
  m.def("saliency_popcount(Tensor[] words) -> Tensor", &uf::popcount);
}
