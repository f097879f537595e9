// Torch bindings of the CPU saliency kernels (csrc/cpu/saliency.h).
//
// Each op takes whole tensor lists (one call per dtype group, not one per parameter):
// the list is cut into chunks of kChunk elements and the chunks run in parallel with
// at::parallel_for.  Reductions keep one double partial per chunk and add them in chunk
// order, so results do not depend on the thread count.  Masks are int32 tensors of
// packed bits (ceil(numel / 32) words per tensor).  The Python layer
// (unlearn_fast/ops/saliency.py) validates, groups and flattens the inputs first; the
// checks here are a safety net.
//
//   torch.ops.unlearn_fast_cpu.saliency_fisher_accumulate(fisher!, grads, scale)
//   torch.ops.unlearn_fast_cpu.saliency_ratio_mask(words!, forget, preserve, threshold, eps)
//   torch.ops.unlearn_fast_cpu.saliency_abs_histogram(scores, shift, bits, prefix_shift, prefix) -> int64[2^bits]
//   torch.ops.unlearn_fast_cpu.saliency_count_equal(scores, key) -> int64[len(scores)]
//   torch.ops.unlearn_fast_cpu.saliency_topk_mask(words!, scores, key, tie_limits)
//   torch.ops.unlearn_fast_cpu.saliency_transform_reduce(grads, words, preserve, retain, lam) -> float64[3]
//   torch.ops.unlearn_fast_cpu.saliency_transform_apply(grads!, words, preserve, retain, lam, coef)
//   torch.ops.unlearn_fast_cpu.saliency_reset(params!, originals, words)
//   torch.ops.unlearn_fast_cpu.saliency_popcount(words) -> int64 scalar
#include <mutex>

#include "common.h"
#include "cpu/saliency.h"

namespace uf {
namespace {

using saliency::kChunk;

struct Chunk {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> out;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t s = 0; s < numels[t]; s += kChunk) out.push_back({t, s, std::min(kChunk, numels[t] - s)});
  }
  return out;
}

std::vector<int64_t> numels_of(at::TensorList ts) {
  std::vector<int64_t> n;
  n.reserve(ts.size());
  for (const auto& t : ts) n.push_back(t.numel());
  return n;
}

int64_t words_for(int64_t n) { return (n + 31) / 32; }

void check_list(at::TensorList ts, const char* fn, const char* name) {
  for (const auto& t : ts) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), fn, ": ", name, " must be contiguous CPU tensors");
  }
}

void check_pair(at::TensorList a, at::TensorList b, const char* fn, const char* na, const char* nb,
                bool allow_empty_b) {
  if (allow_empty_b && b.empty()) return;
  TORCH_CHECK(a.size() == b.size(), fn, ": ", na, " and ", nb, " have different lengths");
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK(a[i].numel() == b[i].numel(), fn, ": ", na, "[", i, "] and ", nb, "[", i, "] differ in size");
  }
  check_list(b, fn, nb);
}

void check_words(at::TensorList words, at::TensorList data, const char* fn, bool allow_empty) {
  if (allow_empty && words.empty()) return;
  TORCH_CHECK(words.size() == data.size(), fn, ": words and data lists have different lengths");
  for (size_t i = 0; i < words.size(); ++i) {
    TORCH_CHECK(words[i].scalar_type() == at::kInt && words[i].is_contiguous() && words[i].device().is_cpu() &&
                    words[i].numel() == words_for(data[i].numel()),
                fn, ": words[", i, "] must be a contiguous int32 CPU tensor of ceil(numel / 32) words");
  }
}

at::ScalarType list_dtype(at::TensorList ts, const char* fn, const char* name) {
  TORCH_CHECK(!ts.empty(), fn, ": empty ", name, " list");
  const auto dt = ts[0].scalar_type();
  for (const auto& t : ts) TORCH_CHECK(t.scalar_type() == dt, fn, ": ", name, " must share one dtype");
  return dt;
}

void check_float32(at::TensorList ts, const char* fn, const char* name) {
  for (const auto& t : ts) TORCH_CHECK(t.scalar_type() == at::kFloat, fn, ": ", name, " must be float32");
}

// Map at:: storage types to the torch-free kernel types.
template <typename T> struct Raw { using type = T; };
template <> struct Raw<c10::BFloat16> { using type = saliency::BF16; };
template <> struct Raw<c10::Half> { using type = saliency::F16; };

template <typename T>
const typename Raw<T>::type* raw(const at::Tensor& t) {
  return reinterpret_cast<const typename Raw<T>::type*>(t.data_ptr());
}
template <typename T>
typename Raw<T>::type* raw_mut(const at::Tensor& t) {
  return reinterpret_cast<typename Raw<T>::type*>(t.data_ptr());
}
inline const uint32_t* words_ptr(const at::Tensor& w) { return reinterpret_cast<const uint32_t*>(w.data_ptr<int32_t>()); }
inline uint32_t* words_mut(const at::Tensor& w) { return reinterpret_cast<uint32_t*>(w.data_ptr<int32_t>()); }

// Run body(chunk) over every chunk in parallel.
template <typename F>
void for_chunks(const std::vector<Chunk>& chunks, F&& body) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) body(chunks[c]);
  });
}

// ------------------------------------------------------------------------------------
void fisher_accumulate(at::TensorList fisher, at::TensorList grads, double scale) {
  const char* fn = "saliency_fisher_accumulate";
  check_list(fisher, fn, "fisher");
  check_float32(fisher, fn, "fisher");
  check_pair(fisher, grads, fn, "fisher", "grads", false);
  if (fisher.empty()) return;
  const auto chunks = make_chunks(numels_of(fisher));
  const float s = static_cast<float>(scale);
  UF_DISPATCH_FLOAT(list_dtype(grads, fn, "grads"), fn, [&] {
    for_chunks(chunks, [&](const Chunk& c) {
      saliency::fisher_accumulate(fisher[c.tensor].data_ptr<float>() + c.start, raw<scalar_t>(grads[c.tensor]) + c.start,
                                  c.len, s);
    });
  });
}

void ratio_mask(at::TensorList words, at::TensorList forget, at::TensorList preserve, double threshold, double eps) {
  const char* fn = "saliency_ratio_mask";
  check_list(forget, fn, "forget");
  check_float32(forget, fn, "forget");
  check_float32(preserve, fn, "preserve");
  check_pair(forget, preserve, fn, "forget", "preserve", false);
  check_words(words, forget, fn, false);
  const auto chunks = make_chunks(numels_of(forget));
  const float thr = static_cast<float>(threshold), e = static_cast<float>(eps);
  for_chunks(chunks, [&](const Chunk& c) {
    saliency::ratio_mask(forget[c.tensor].data_ptr<float>() + c.start, preserve[c.tensor].data_ptr<float>() + c.start,
                         c.len, thr, e, words_mut(words[c.tensor]) + c.start / 32);
  });
}

at::Tensor abs_histogram(at::TensorList scores, int64_t shift, int64_t bits, int64_t prefix_shift, int64_t prefix) {
  const char* fn = "saliency_abs_histogram";
  TORCH_CHECK(bits >= 0 && bits <= 16 && shift >= 0 && shift + bits <= 31 && prefix_shift >= shift + bits &&
                  prefix_shift <= 31 && prefix >= 0,
              fn, ": bad digit (shift=", shift, ", bits=", bits, ", prefix_shift=", prefix_shift, ")");
  check_list(scores, fn, "scores");
  const int64_t nb = int64_t(1) << bits;
  at::Tensor hist = at::zeros({nb}, at::TensorOptions().dtype(at::kLong));
  if (scores.empty()) return hist;
  const auto chunks = make_chunks(numels_of(scores));
  int64_t* out = hist.data_ptr<int64_t>();
  std::mutex lock;
  UF_DISPATCH_FLOAT(list_dtype(scores, fn, "scores"), fn, [&] {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
      std::vector<uint32_t> local(4 * nb, 0);  // 32-bit counters: L1-sized; flushed before 2^31 elements
      std::vector<int64_t> total(nb, 0);
      int64_t pending = 0;
      auto flush = [&] {
        for (int64_t i = 0; i < nb; ++i) {
          total[i] += int64_t(local[i]) + local[nb + i] + local[2 * nb + i] + local[3 * nb + i];
        }
        std::fill(local.begin(), local.end(), 0u);
        pending = 0;
      };
      for (int64_t c = b; c < e; ++c) {
        const Chunk& ch = chunks[c];
        if (pending + ch.len >= (int64_t(1) << 31)) flush();
        saliency::abs_histogram(raw<scalar_t>(scores[ch.tensor]) + ch.start, ch.len, static_cast<int>(shift),
                                static_cast<int>(bits), static_cast<int>(prefix_shift),
                                static_cast<uint32_t>(prefix), local.data());
        pending += ch.len;
      }
      flush();
      std::lock_guard<std::mutex> guard(lock);  // integer counts: merge order does not matter
      for (int64_t i = 0; i < nb; ++i) out[i] += total[i];
    });
  });
  return hist;
}

at::Tensor count_equal(at::TensorList scores, int64_t key) {
  const char* fn = "saliency_count_equal";
  check_list(scores, fn, "scores");
  at::Tensor counts = at::zeros({static_cast<int64_t>(scores.size())}, at::TensorOptions().dtype(at::kLong));
  if (scores.empty()) return counts;
  const auto chunks = make_chunks(numels_of(scores));
  std::vector<int64_t> per_chunk(chunks.size(), 0);
  UF_DISPATCH_FLOAT(list_dtype(scores, fn, "scores"), fn, [&] {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const Chunk& ch = chunks[c];
        per_chunk[c] = saliency::count_equal(raw<scalar_t>(scores[ch.tensor]) + ch.start, ch.len,
                                             static_cast<uint32_t>(key));
      }
    });
  });
  int64_t* out = counts.data_ptr<int64_t>();
  for (size_t c = 0; c < chunks.size(); ++c) out[chunks[c].tensor] += per_chunk[c];
  return counts;
}

void topk_mask(at::TensorList words, at::TensorList scores, int64_t key, at::IntArrayRef tie_limits) {
  const char* fn = "saliency_topk_mask";
  check_list(scores, fn, "scores");
  check_words(words, scores, fn, false);
  TORCH_CHECK(tie_limits.size() == scores.size(), fn, ": one tie limit per tensor expected");
  if (scores.empty()) return;
  const auto chunks = make_chunks(numels_of(scores));
  UF_DISPATCH_FLOAT(list_dtype(scores, fn, "scores"), fn, [&] {
    for_chunks(chunks, [&](const Chunk& c) {
      saliency::topk_mask(raw<scalar_t>(scores[c.tensor]) + c.start, c.len, c.start, static_cast<uint32_t>(key),
                          tie_limits[c.tensor], words_mut(words[c.tensor]) + c.start / 32);
    });
  });
}

// Compile-time flags (mask?, geometry?, retain?) from run-time ones.
template <typename F>
void dispatch_flags(bool mask, bool geom, bool retain, F&& f) {
#define UF_CASE(a, b, c) \
  if (mask == a && geom == b && retain == c) return f(std::integral_constant<bool, a>{}, std::integral_constant<bool, b>{}, std::integral_constant<bool, c>{})
  UF_CASE(false, false, false); UF_CASE(false, false, true); UF_CASE(false, true, false); UF_CASE(false, true, true);
  UF_CASE(true, false, false); UF_CASE(true, false, true); UF_CASE(true, true, false); UF_CASE(true, true, true);
#undef UF_CASE
}

void check_transform(at::TensorList grads, at::TensorList words, at::TensorList preserve, at::TensorList retain,
                     const char* fn) {
  check_list(grads, fn, "grads");
  check_words(words, grads, fn, true);
  check_float32(preserve, fn, "preserve");
  check_pair(grads, preserve, fn, "grads", "preserve", true);
  check_pair(grads, retain, fn, "grads", "retain", true);
  if (!retain.empty() && !grads.empty()) {
    TORCH_CHECK(list_dtype(retain, fn, "retain") == list_dtype(grads, fn, "grads"), fn,
                ": retain must have the gradients' dtype");
  }
}

at::Tensor transform_reduce(at::TensorList grads, at::TensorList words, at::TensorList preserve, at::TensorList retain,
                            double lam) {
  const char* fn = "saliency_transform_reduce";
  check_transform(grads, words, preserve, retain, fn);
  at::Tensor sums = at::zeros({3}, at::TensorOptions().dtype(at::kDouble));
  if (grads.empty()) return sums;
  const auto chunks = make_chunks(numels_of(grads));
  std::vector<double> partial(3 * chunks.size(), 0.0);
  const float l = static_cast<float>(lam);
  UF_DISPATCH_FLOAT(list_dtype(grads, fn, "grads"), fn, [&] {
    dispatch_flags(!words.empty(), !preserve.empty(), !retain.empty(), [&](auto km, auto kg, auto kr) {
      at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
        for (int64_t ci = b; ci < e; ++ci) {
          const Chunk& c = chunks[ci];
          saliency::transform_reduce<decltype(km)::value, decltype(kg)::value, decltype(kr)::value>(
              raw<scalar_t>(grads[c.tensor]) + c.start,
              decltype(km)::value ? words_ptr(words[c.tensor]) + c.start / 32 : nullptr,
              decltype(kg)::value ? preserve[c.tensor].data_ptr<float>() + c.start : nullptr,
              decltype(kr)::value ? raw<scalar_t>(retain[c.tensor]) + c.start : nullptr, c.len, l, &partial[3 * ci]);
        }
      });
    });
  });
  double* out = sums.data_ptr<double>();
  for (size_t c = 0; c < chunks.size(); ++c) {
    for (int k = 0; k < 3; ++k) out[k] += partial[3 * c + k];
  }
  return sums;
}

void transform_apply(at::TensorList grads, at::TensorList words, at::TensorList preserve, at::TensorList retain,
                     double lam, const at::Tensor& coef) {
  const char* fn = "saliency_transform_apply";
  check_transform(grads, words, preserve, retain, fn);
  TORCH_CHECK(coef.device().is_cpu() && coef.numel() == 2, fn, ": coef must be a CPU tensor [clip, alpha]");
  if (grads.empty()) return;
  at::Tensor c32 = coef.to(at::kFloat).contiguous();
  const float clip = c32.data_ptr<float>()[0], alpha = c32.data_ptr<float>()[1];
  const auto chunks = make_chunks(numels_of(grads));
  const float l = static_cast<float>(lam);
  UF_DISPATCH_FLOAT(list_dtype(grads, fn, "grads"), fn, [&] {
    dispatch_flags(!words.empty(), !preserve.empty(), !retain.empty(), [&](auto km, auto kg, auto kr) {
      for_chunks(chunks, [&](const Chunk& c) {
        saliency::transform_apply<decltype(km)::value, decltype(kg)::value, decltype(kr)::value>(
            raw_mut<scalar_t>(grads[c.tensor]) + c.start,
            decltype(km)::value ? words_ptr(words[c.tensor]) + c.start / 32 : nullptr,
            decltype(kg)::value ? preserve[c.tensor].data_ptr<float>() + c.start : nullptr,
            decltype(kr)::value ? raw<scalar_t>(retain[c.tensor]) + c.start : nullptr, c.len, l, clip, alpha);
      });
    });
  });
}

void reset_unmasked(at::TensorList params, at::TensorList originals, at::TensorList words) {
  const char* fn = "saliency_reset";
  check_list(params, fn, "params");
  check_pair(params, originals, fn, "params", "originals", false);
  check_words(words, params, fn, false);
  if (params.empty()) return;
  const auto dt = list_dtype(params, fn, "params");
  TORCH_CHECK(list_dtype(originals, fn, "originals") == dt, fn, ": originals must have the parameters' dtype");
  const auto chunks = make_chunks(numels_of(params));
  const int64_t esize = params[0].element_size();
  // A bitwise select: only the element size matters.
  for_chunks(chunks, [&](const Chunk& c) {
    const uint32_t* w = words_ptr(words[c.tensor]) + c.start / 32;
    if (esize == 4) {
      saliency::reset_unmasked(reinterpret_cast<uint32_t*>(params[c.tensor].data_ptr()) + c.start,
                               reinterpret_cast<const uint32_t*>(originals[c.tensor].data_ptr()) + c.start, w, c.len);
    } else if (esize == 2) {
      saliency::reset_unmasked(reinterpret_cast<uint16_t*>(params[c.tensor].data_ptr()) + c.start,
                               reinterpret_cast<const uint16_t*>(originals[c.tensor].data_ptr()) + c.start, w, c.len);
    } else {
      TORCH_CHECK(esize == 8, fn, ": unsupported element size ", esize);
      saliency::reset_unmasked(reinterpret_cast<uint64_t*>(params[c.tensor].data_ptr()) + c.start,
                               reinterpret_cast<const uint64_t*>(originals[c.tensor].data_ptr()) + c.start, w, c.len);
    }
  });
}

at::Tensor popcount(at::TensorList words) {
  const char* fn = "saliency_popcount";
  std::vector<int64_t> nwords;
  for (const auto& w : words) {
    TORCH_CHECK(w.scalar_type() == at::kInt && w.is_contiguous() && w.device().is_cpu(), fn,
                ": words must be contiguous int32 CPU tensors");
    nwords.push_back(w.numel());
  }
  const auto chunks = make_chunks(nwords);
  std::vector<int64_t> per_chunk(chunks.size(), 0);
  for_chunks(chunks, [&](const Chunk& c) {
    per_chunk[&c - chunks.data()] = saliency::popcount(words_ptr(words[c.tensor]) + c.start, c.len);
  });
  int64_t total = 0;
  for (int64_t v : per_chunk) total += v;
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kLong));
}

}  // namespace
}  // namespace uf

TORCH_LIBRARY_FRAGMENT(unlearn_fast_cpu, m) {
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
