// Torch binding of the CUDA decode op (csrc/cuda/lora_decode.cu): modlora::lora_decode, CUDA only.
// Built by setup.py only when nvcc and a CUDA build of torch are both present.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstdint>

#include "lora_decode.h"

namespace modlora_cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "lora_decode: unsupported dtype ", t.scalar_type(), " (float32, float16, bfloat16)");
  }
}

// An operand on x's device, of x's dtype, contiguous; `vectors`: read with 16-byte loads, so aligned
// (the bias is read one element at a time: any offset).
void check_operand(const at::Tensor& t, const at::Tensor& x, const char* name, bool vectors = true) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "lora_decode: ", name, " must be on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lora_decode: ", name, " is ", t.scalar_type(), ", x is ",
              x.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "lora_decode: ", name, " must be contiguous");
  TORCH_CHECK(!vectors || reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, "lora_decode: ", name,
              " must be 16-byte aligned");
}

// y = x w^T + bias + ((x a^T) * coef) b^T: x [M, K] (M <= 16), w [N, K], a [R, K], b [N, R], coef [R] fp32.
at::Tensor lora_decode_cuda(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& a, const at::Tensor& b, const at::Tensor& coef) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && a.dim() == 2 && b.dim() == 2 && coef.dim() == 1,
              "lora_decode: expected x [M, K], w [N, K], a [R, K], b [N, R], coef [R]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), R = a.size(0);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "lora_decode: M = ", M, " rows, expected 1..", kMaxRows);
  TORCH_CHECK(R <= kMaxRank, "lora_decode: total rank ", R, " > ", kMaxRank);
  TORCH_CHECK(K % 8 == 0, "lora_decode: in_features ", K, " is not a multiple of 8");
  TORCH_CHECK(w.size(1) == K && a.size(1) == K && b.size(0) == N && b.size(1) == R && coef.size(0) == R,
              "lora_decode: shape mismatch: x ", x.sizes(), ", w ", w.sizes(), ", a ", a.sizes(), ", b ", b.sizes(),
              ", coef ", coef.sizes());
  check_operand(x, x, "x");
  check_operand(w, x, "weight");
  check_operand(a, x, "A");
  check_operand(b, x, "B");
  TORCH_CHECK(coef.is_cuda() && coef.device() == x.device() && coef.scalar_type() == at::kFloat &&
                  coef.is_contiguous(),
              "lora_decode: coef must be a contiguous float32 tensor on ", x.device());
  const void* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "lora_decode: bias must be [", N, "]");
    check_operand(*bias, x, "bias", /*vectors=*/false);
    bias_ptr = bias->data_ptr();
  }
  // x's device, not the current one: its stream, and the launch's device.
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty({M, N}, x.options());
  auto v = at::empty({M, std::max<int64_t>(R, 1)}, x.options().dtype(at::kFloat));
  const int err = lora_decode(dtype_of(x), x.data_ptr(), w.data_ptr(), bias_ptr, a.data_ptr(), b.data_ptr(),
                              coef.data_ptr<float>(), v.data_ptr<float>(), y.data_ptr(), static_cast<int>(M),
                              static_cast<int>(N), static_cast<int>(K), static_cast<int>(R),
                              c10::cuda::getCurrentCUDAStream(x.get_device()).stream());
  TORCH_CHECK(err == 0, "lora_decode: CUDA error ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return y;
}

}  // namespace
}  // namespace modlora_cuda

TORCH_LIBRARY_FRAGMENT(modlora, m) {
  m.def("lora_decode(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor b, Tensor coef) -> Tensor");
}

TORCH_LIBRARY_IMPL(modlora, CUDA, m) { m.impl("lora_decode", &modlora_cuda::lora_decode_cuda); }
