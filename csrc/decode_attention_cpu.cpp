// modlora::decode_attention: one decode step of one layer's attention on the CPU (decode_attention.h),
// one call instead of the ~25 small torch ops of modlora/model.py's torch path. Parallel over
// (sentence, kv head); no autograd (generation only).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "decode_attention.h"

namespace modlora_cpu {
namespace {

constexpr const char* kWho = "decode_attention: ";

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols && t.stride(1) == 1, kWho, name,
              " must be [", rows, ", ", cols, "] with unit stride along its last dimension, got ", t.sizes(),
              " strides ", t.strides());
}

void check_cache(const at::Tensor& t, const char* name, int64_t n, int64_t Hkv, int64_t len, int64_t D) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == n && t.size(1) == Hkv && t.size(3) == D && (len < 0 || t.size(2) == len),
              kWho, name, " must be [", n, ", ", Hkv, ", ", len < 0 ? "T" : std::to_string(len), ", ", D, "], got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), kWho, name, " must be contiguous");
}

}  // namespace

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                const at::Tensor& sin, const at::Tensor& prompt_k, const at::Tensor& prompt_v,
                                const at::Tensor& prompt_mask, at::Tensor& gen_k, at::Tensor& gen_v, int64_t step,
                                int64_t num_beams) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, kWho, "q must be float32 or bfloat16, got ", dtype);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&k, &v, &cos, &sin, &prompt_k, &prompt_v, &gen_k, &gen_v})
    TORCH_CHECK(t->scalar_type() == dtype, kWho, "every tensor must have q's dtype ", dtype, ", got ",
                t->scalar_type());
  TORCH_CHECK(prompt_k.dim() == 4, kWho, "prompt_k must be [B, Hkv, P, D], got ", prompt_k.sizes());
  TORCH_CHECK(num_beams >= 1, kWho, "num_beams must be >= 1, got ", num_beams);
  const int64_t B = prompt_k.size(0), Hkv = prompt_k.size(1), P = prompt_k.size(2), D = prompt_k.size(3);
  const int64_t rows = B * num_beams;
  TORCH_CHECK(D > 0 && D % 2 == 0, kWho, "head_dim must be even and positive, got ", D);
  TORCH_CHECK(Hkv > 0, kWho, "prompt_k must have at least one key/value head, got ", prompt_k.sizes());
  TORCH_CHECK(q.dim() == 2 && q.size(1) % (Hkv * D) == 0, kWho, "q must be [rows, H * ", D, "] with H a multiple of ",
              Hkv, ", got ", q.sizes());
  const int64_t H = q.size(1) / D;
  check_rows(q, "q", rows, H * D);
  check_rows(k, "k", rows, Hkv * D);
  check_rows(v, "v", rows, Hkv * D);
  check_rows(cos, "cos", rows, D);
  TORCH_CHECK(sin.sizes() == cos.sizes() && sin.strides() == cos.strides(), kWho, "sin must be laid out as cos");
  check_cache(prompt_k, "prompt_k", B, Hkv, P, D);
  check_cache(prompt_v, "prompt_v", B, Hkv, P, D);
  check_cache(gen_k, "gen_k", rows, Hkv, -1, D);
  check_cache(gen_v, "gen_v", rows, Hkv, gen_k.size(2), D);
  TORCH_CHECK(prompt_mask.scalar_type() == at::kBool && prompt_mask.dim() == 2 && prompt_mask.size(0) == B &&
                  prompt_mask.size(1) == P,
              kWho, "prompt_mask must be bool [", B, ", ", P, "], got ", prompt_mask.scalar_type(), " ",
              prompt_mask.sizes());
  TORCH_CHECK(step >= 0 && step < gen_k.size(2), kWho, "step ", step, " is outside the cache's ", gen_k.size(2),
              " generated positions");

  at::Tensor out = at::empty({rows, H * D}, q.options());
  const at::Tensor mask = prompt_mask.contiguous();
  AttnArgs a;
  a.beams = num_beams;
  a.H = H;
  a.Hkv = Hkv;
  a.D = D;
  a.P = P;
  a.T = gen_k.size(2);
  a.step = step;
  a.bf16 = dtype == at::kBFloat16;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.ldq = q.stride(0);
  a.ldk = k.stride(0);
  a.ldv = v.stride(0);
  a.cos = cos.data_ptr();
  a.sin = sin.data_ptr();
  a.ldr = cos.stride(0);
  a.prompt_k = prompt_k.data_ptr();
  a.prompt_v = prompt_v.data_ptr();
  a.prompt_mask = mask.data_ptr<bool>();
  a.gen_k = gen_k.data_ptr();
  a.gen_v = gen_v.data_ptr();
  a.out = out.data_ptr();
  const int64_t tasks = B * Hkv;
  a.scratch_per_task = scratch_shape(a, kMaxLanes).floats();
  at::Tensor scratch = at::empty({tasks * a.scratch_per_task}, q.options().dtype(at::kFloat));
  a.scratch = scratch.data_ptr<float>();
  const AttnFn task = attention_kernel();
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) task(a, t);
  });
  return out;
}

}  // namespace modlora_cpu

TORCH_LIBRARY_FRAGMENT(modlora, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor prompt_k, Tensor prompt_v, "
      "Tensor prompt_mask, Tensor(a!) gen_k, Tensor(b!) gen_v, int step, int num_beams) -> Tensor");
}

TORCH_LIBRARY_IMPL(modlora, CPU, m) { m.impl("decode_attention", &modlora_cpu::decode_attention_cpu); }
