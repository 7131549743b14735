// modlora::rms_norm: HF's Qwen2 RMSNorm in one call, weight * to_dtype(x / sqrt(mean(x^2) + eps)),
// the statistics in fp32 and the two roundings to x's dtype where torch's ops make them (the norm's
// eight small torch ops are 2-3 us each at decode sizes; this is one). Rows in parallel; no autograd.
// Plain loops, compiled for the baseline ISA: a row is a few KB.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstring>

namespace modlora_cpu {
namespace {

float widen(float v) { return v; }
float widen(c10::BFloat16 v) { return static_cast<float>(v); }
template <typename T>
T narrow(float v) {
  return static_cast<T>(v);  // c10::BFloat16: round to nearest even, as torch's casts
}

template <typename T>
void norm_rows(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, double eps) {
  const int64_t C = x.size(-1), rows = C ? x.numel() / C : 0;
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const float epsf = static_cast<float>(eps);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, C));  // ~32K elements a task
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = xp + r * C;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < C; ++c) ss += widen(xr[c]) * widen(xr[c]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + epsf);
      for (int64_t c = 0; c < C; ++c) yp[r * C + c] = narrow<T>(widen(wp[c]) * widen(narrow<T>(widen(xr[c]) * inv)));
    }
  });
}

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "rms_norm: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: weight must be [",
              x.dim() ? x.size(-1) : 0, "] for x of shape ", x.sizes(), ", got ", weight.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "rms_norm: eps must be finite and >= 0, got ", eps);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc);
  if (x.scalar_type() == at::kFloat)
    norm_rows<float>(xc, wc, out, eps);
  else
    norm_rows<c10::BFloat16>(xc, wc, out, eps);
  return out;
}

}  // namespace modlora_cpu

TORCH_LIBRARY_FRAGMENT(modlora, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor"); }

TORCH_LIBRARY_IMPL(modlora, CPU, m) { m.impl("rms_norm", &modlora_cpu::rms_norm_cpu); }
