// modlora._C: the CPU "LoRA bank" linear for small M (decode), registered as modlora::lora_bank_linear.
//
//   y[m] = x[m] W^T + b + (x[m] A_bank[p]^T) B_bank[p]^T,   p = row_pair[m] (0 when row_pair is None)
//
//   x        [M, K]     fp32 or bf16 (output has x's dtype; accumulation is fp32)
//   weight   [N, K]     fp32 or bf16, unit stride along K
//   bias     [N]        any float dtype, or None
//   A_bank   [P, R, K]  fp32 or bf16, or None (no adapters: a plain small-M linear, e.g. lm_head)
//   B_bank   [P, N, R]  fp32 or bf16, coefficients folded in (see modlora/_ext.py pack_bank)
//   row_pair [M]        int64 in [0, P), or None
//
// Two phases, each parallel over threads (at::parallel_for, OpenMP in torch's CPU builds):
//   1. shrink: u[m] = A_bank[p_m] x[m] ([M, R], tiny), rows grouped by pair so each A_p is read once;
//   2. main: threads own contiguous ranges of W's rows, stream them once, and for each block of W
//      rows compute the dot products against all M rows of x (fp32 copy, in cache); the epilogue
//      adds the bias and u[m] . B_bank[p_m][n, :] and stores y once.
// The vector code lives in kernels_*.cpp, one ISA per file; the ISA is chosen at run time.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <string>
#include <vector>

#include "lora_bank.h"

namespace modlora_cpu {
namespace {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512", "avx512_bf16"};

int detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    if (__builtin_cpu_supports("avx512bf16")) return kAvx512Bf16;
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

const int kBestIsa = detect_isa();
std::atomic<int> g_isa{kBestIsa};

RowsFn rows_for(int isa, bool bf16_dot) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case kAvx512Bf16:
      return bf16_dot ? rows_avx512bf16 : rows_avx512;
    case kAvx512:
      return rows_avx512;
    case kAvx2:
      return rows_avx2;
    default:
      break;
  }
#endif
  return rows_scalar;
}

bool is_f32_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

// Run `rows` over output columns [0, N) in blocks of 4, in parallel when there is enough work.
void run_parallel(RowsFn rows, const BankArgs& a) {
  const int64_t blocks = (a.N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, 4 * a.K));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    rows(a, b0 * 4, std::min(a.N, b1 * 4));
  });
}

}  // namespace

at::Tensor lora_bank_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& A_bank, const c10::optional<at::Tensor>& B_bank,
                                const c10::optional<at::Tensor>& row_pair) {
  TORCH_CHECK(x.dim() == 2, "lora_bank_linear: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, "lora_bank_linear: weight must be [N, K], got ", weight.sizes());
  TORCH_CHECK(is_f32_or_bf16(x), "lora_bank_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(is_f32_or_bf16(weight), "lora_bank_linear: weight must be float32 or bfloat16, got ",
              weight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "lora_bank_linear: x is [", M, ", ", K, "] but weight is ", weight.sizes(),
              " (expected [N, ", K, "])");
  const bool has_a = A_bank.has_value() && A_bank->defined();
  const bool has_b = B_bank.has_value() && B_bank->defined();
  TORCH_CHECK(has_a == has_b, "lora_bank_linear: A_bank and B_bank must both be given or both be None");

  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;

  at::Tensor w = weight.stride(1) == 1 && weight.stride(0) >= K ? weight : weight.contiguous();
  at::Tensor xc = x.contiguous();
  at::Tensor xf = x.scalar_type() == at::kFloat ? xc : xc.to(at::kFloat);
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "lora_bank_linear: bias must be [N] = [", N, "], got ",
                bias->sizes());
    bf = bias->to(at::kFloat).contiguous();
  }

  const int isa = g_isa.load(std::memory_order_relaxed);
  BankArgs a;
  a.M = M;
  a.N = N;
  a.K = K;
  a.w = w.data_ptr();
  a.w_bf16 = w.scalar_type() == at::kBFloat16;
  a.ldw = w.stride(0);
  a.xf = xf.data_ptr<float>();
  a.bias = bf.defined() ? bf.data_ptr<float>() : nullptr;
  a.y = out.data_ptr();
  a.y_bf16 = out.scalar_type() == at::kBFloat16;
  const bool bf16_dot = isa == kAvx512Bf16 && a.w_bf16 && x.scalar_type() == at::kBFloat16;
  if (bf16_dot) a.xb = reinterpret_cast<const uint16_t*>(xc.data_ptr());

  at::Tensor Ab, Bb, u, pairs;
  if (has_a) {
    Ab = A_bank->contiguous();
    Bb = B_bank->contiguous();
    TORCH_CHECK(Ab.dim() == 3 && Ab.size(2) == K, "lora_bank_linear: A_bank must be [P, R, K] with K = ", K,
                ", got ", Ab.sizes());
    const int64_t P = Ab.size(0), R = Ab.size(1);
    TORCH_CHECK(Bb.dim() == 3 && Bb.size(0) == P && Bb.size(1) == N && Bb.size(2) == R,
                "lora_bank_linear: B_bank must be [P, N, R] = [", P, ", ", N, ", ", R, "], got ", Bb.sizes());
    TORCH_CHECK(is_f32_or_bf16(Ab) && is_f32_or_bf16(Bb),
                "lora_bank_linear: A_bank and B_bank must be float32 or bfloat16, got ", Ab.scalar_type(), " and ",
                Bb.scalar_type());
    const int64_t* pp = nullptr;
    if (row_pair.has_value() && row_pair->defined()) {
      TORCH_CHECK(row_pair->scalar_type() == at::kLong && row_pair->dim() == 1 && row_pair->size(0) == M,
                  "lora_bank_linear: row_pair must be int64 [M] = [", M, "], got ", row_pair->scalar_type(), " ",
                  row_pair->sizes());
      pairs = row_pair->contiguous();
      pp = pairs.data_ptr<int64_t>();
      for (int64_t m = 0; m < M; ++m)
        TORCH_CHECK(pp[m] >= 0 && pp[m] < P, "lora_bank_linear: row_pair[", m, "] = ", pp[m],
                    " is out of range for a bank of ", P, " pairs");
    } else {
      TORCH_CHECK(P >= 1, "lora_bank_linear: an empty bank (P = 0) needs A_bank = B_bank = None");
    }
    if (R > 0 && P > 0) {
      // Shrink: group rows by pair (counting sort) so that each A_p is streamed once.
      std::vector<int64_t> count(P + 1, 0), order(M);
      for (int64_t m = 0; m < M; ++m) ++count[(pp ? pp[m] : 0) + 1];
      for (int64_t p = 0; p < P; ++p) count[p + 1] += count[p];
      {
        std::vector<int64_t> next(count.begin(), count.end() - 1);
        for (int64_t m = 0; m < M; ++m) order[next[pp ? pp[m] : 0]++] = m;
      }
      bool identity = true;
      for (int64_t m = 0; m < M; ++m) identity = identity && order[m] == m;
      at::Tensor xs = identity ? xf : xf.index_select(0, torch::from_blob(order.data(), {M}, at::kLong));
      at::Tensor us = at::empty({M, R}, x.options().dtype(at::kFloat));
      struct Item {
        int64_t p, r0, r1;
      };
      std::vector<Item> items;
      for (int64_t p = 0; p < P; ++p)
        if (count[p + 1] > count[p])
          for (int64_t r0 = 0; r0 < R; r0 += 4) items.push_back({p, r0, std::min(R, r0 + 4)});
      const RowsFn shrink = rows_for(isa, false);
      const float* xs_ptr = xs.data_ptr<float>();
      float* us_ptr = us.data_ptr<float>();
      const auto* a_base = static_cast<const char*>(Ab.data_ptr());
      const int64_t a_elem = Ab.element_size();
      const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, 4 * K));
      at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const Item& it = items[i];
          BankArgs s;
          s.M = count[it.p + 1] - count[it.p];
          s.N = R;
          s.K = K;
          s.w = a_base + it.p * R * K * a_elem;
          s.w_bf16 = Ab.scalar_type() == at::kBFloat16;
          s.ldw = K;
          s.xf = xs_ptr + count[it.p] * K;
          s.y = us_ptr + count[it.p] * R;
          shrink(s, it.r0, it.r1);
        }
      });
      if (identity) {
        u = us;
      } else {
        u = at::empty_like(us);
        u.index_copy_(0, torch::from_blob(order.data(), {M}, at::kLong), us);
      }
      a.R = R;
      a.u = u.data_ptr<float>();
      a.bank_b = Bb.data_ptr();
      a.b_bf16 = Bb.scalar_type() == at::kBFloat16;
      a.pair = pp;
    }
  }
  run_parallel(rows_for(isa, bf16_dot), a);
  return out;
}

namespace {

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (int i = 0; i <= kBestIsa; ++i) names.emplace_back(kIsaNames[i]);
  return names;
}

void set_isa(const std::string& name) {
  if (name == "auto") {
    g_isa = kBestIsa;
    return;
  }
  for (int i = 0; i <= kAvx512Bf16; ++i)
    if (name == kIsaNames[i]) {
      TORCH_CHECK(i <= kBestIsa, "modlora._C.set_isa: '", name, "' is not supported on this CPU (supported: auto, ",
                  c10::Join(", ", supported_isas()), ")");
      g_isa = i;
      return;
    }
  TORCH_CHECK(false, "modlora._C.set_isa: unknown ISA '", name, "', expected one of auto, ",
              c10::Join(", ", std::vector<std::string>(std::begin(kIsaNames), std::end(kIsaNames))));
}

// Memory-read probe: reads every byte of `t` once across the threads (a checksum keeps the loads).
int64_t read_probe(const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "read_probe: needs a contiguous CPU tensor");
  const auto* p = static_cast<const uint64_t*>(t.data_ptr());
  const int64_t n = t.nbytes() / 8;
  std::vector<uint64_t> partial(at::get_num_threads() + 1, 0);
  at::parallel_for(0, n, 1 << 16, [&](int64_t i0, int64_t i1) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = i0;
    for (; i + 4 <= i1; i += 4) {
      s0 += p[i];
      s1 += p[i + 1];
      s2 += p[i + 2];
      s3 += p[i + 3];
    }
    for (; i < i1; ++i) s0 += p[i];
    partial[at::get_thread_num()] += s0 + s1 + s2 + s3;
  });
  uint64_t s = 0;
  for (auto v : partial) s += v;
  return static_cast<int64_t>(s);
}

}  // namespace
}  // namespace modlora_cpu

TORCH_LIBRARY_FRAGMENT(modlora, m) {
  m.def(
      "lora_bank_linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? A_bank=None, Tensor? B_bank=None, "
      "Tensor? row_pair=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(modlora, CPU, m) { m.impl("lora_bank_linear", &modlora_cpu::lora_bank_linear_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "modlora C++ ops: the CPU LoRA-bank linear (torch.ops.modlora.lora_bank_linear)";
  m.def("isa", []() { return std::string(modlora_cpu::kIsaNames[modlora_cpu::g_isa.load()]); },
        "The vector ISA the CPU op uses now.");
  m.def("best_isa", []() { return std::string(modlora_cpu::kIsaNames[modlora_cpu::kBestIsa]); },
        "The best vector ISA this CPU supports.");
  m.def("supported_isas", &modlora_cpu::supported_isas, "ISAs this CPU can run, worst first.");
  m.def("set_isa", &modlora_cpu::set_isa, "Force an ISA ('scalar', 'avx2', 'avx512', 'avx512_bf16') or 'auto'.");
  m.def("read_probe", &modlora_cpu::read_probe, "Read every byte of a tensor once (memory bandwidth probe).");
}
