// modlora::topk: torch.topk(values, k) along the last dim (largest, sorted) for float32 on CPU, with
// the same values and indices, ties included. Where k * 64 <= n torch's CPU kernel
// (ATen/native/TopKImpl.h) copies every element into a vector of (value, index) pairs and runs
// std::partial_sort on it, which libstdc++ runs as a heap of the first k pairs, each later pair
// that compares above the heap's top swapped in (__pop_heap with that pair as the value to sift
// down), then std::sort_heap. That result depends only on the first k pairs and the pairs swapped
// in, in order; here the same heap runs over the same pairs, and a block of elements none of which
// compares above the top (so none is swapped in) is skipped with one vectorisable test, without
// torch's copy of every element (a fresh 12 MB vector per call at beam 5 over Qwen2.5's
// vocabulary). Elsewhere (k * 64 > n: torch's nth_element, whose result depends on every element;
// another C++ library, whose partial_sort orders ties otherwise) this is at::topk itself. Rows in
// parallel; no autograd.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

namespace modlora_cpu {
namespace {

using Pair = std::pair<float, int64_t>;

// torch's comparator for largest = true: NaN above every number, then by value.
bool above(const Pair& x, const Pair& y) {
  return (std::isnan(x.first) && !std::isnan(y.first)) || x.first > y.first;
}

// Whether some v[j] may compare above a pair of value t: !(v <= t) holds where v > t or either is
// NaN, so a block where it never holds swaps nothing in.
bool any_above(const float* v, int64_t n, float t) {
  int hit = 0;  // int, not bool: GCC 12 vectorises this reduction, not a bool one (nor under omp simd)
  for (int64_t j = 0; j < n; ++j) hit |= !(v[j] <= t);
  return hit != 0;
}

void topk_row(const float* v, int64_t n, int64_t k, float* values, int64_t* indices) {
  constexpr int64_t kBlock = 256;
  std::vector<Pair> heap(k + 1);  // the heap, then slot k: the pair offered to it
  for (int64_t j = 0; j < k; ++j) heap[j] = {v[j], j};
  std::make_heap(heap.begin(), heap.begin() + k, above);
  for (int64_t j0 = k; j0 < n; j0 += kBlock) {
    const int64_t j1 = std::min(n, j0 + kBlock);
    if (!any_above(v + j0, j1 - j0, heap[0].first)) continue;
    for (int64_t j = j0; j < j1; ++j) {
      heap[k] = {v[j], j};
      // libstdc++'s pop_heap over k + 1 slots is __pop_heap(first, first + k, slot k): the top to
      // slot k, the offered pair sifted down from the root, as partial_sort swaps it in. The
      // standard asks for a heap of k + 1 there, which this is not: hence libstdc++ only, and
      // not its debug mode, which checks.
      if (above(heap[k], heap[0])) std::pop_heap(heap.begin(), heap.end(), above);
    }
  }
  std::sort_heap(heap.begin(), heap.begin() + k, above);
  for (int64_t j = 0; j < k; ++j) {
    values[j] = heap[j].first;
    indices[j] = heap[j].second;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> topk_cpu(const at::Tensor& values, int64_t k) {
  TORCH_CHECK(values.scalar_type() == at::kFloat, "topk: values must be float32, got ", values.scalar_type());
  TORCH_CHECK(values.dim() >= 1, "topk: values must have at least one dim, got a scalar");
  const int64_t n = values.size(-1);
  TORCH_CHECK(k >= 0 && k <= n, "topk: k must be in [0, ", n, "] for values of shape ", values.sizes(), ", got ", k);
#if defined(__GLIBCXX__) && !defined(_GLIBCXX_DEBUG)
  constexpr bool kHeapSelection = true;
#else
  constexpr bool kHeapSelection = false;
#endif
  // k == 0 too: the heap would have no top to compare with.
  if (!kHeapSelection || k == 0 || k * 64 > n) return at::topk(values, k);
  const at::Tensor v = values.contiguous();
  std::vector<int64_t> shape = values.sizes().vec();
  shape.back() = k;
  at::Tensor out = at::empty(shape, v.options());
  at::Tensor idx = at::empty(shape, v.options().dtype(at::kLong));
  const int64_t rows = v.numel() / n;
  const float* src = v.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  int64_t* dst_idx = idx.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) topk_row(src + r * n, n, k, dst + r * k, dst_idx + r * k);
  });
  return {out, idx};
}

}  // namespace modlora_cpu

TORCH_LIBRARY_FRAGMENT(modlora, m) { m.def("topk(Tensor values, int k) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(modlora, CPU, m) { m.impl("topk", &modlora_cpu::topk_cpu); }
