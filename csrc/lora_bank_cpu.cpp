// modlora._C: the CPU "LoRA bank" linear for small M (decode), registered as modlora::lora_bank_linear.
//
//   y[m] = x[m] W^T + b + (x[m] A_bank[p]^T) B_bank[p]^T,   p = row_pair[m] (0 when row_pair is None)
//
//   x        [M, K]     fp32 or bf16 (output has x's dtype; accumulation is fp32)
//   weight   [N, K]     fp32 or bf16, unit stride along K
//   bias     [N]        any float dtype, or None
//   A_bank   [P, R, K]  fp32 or bf16, or None (no adapters: a plain small-M linear, e.g. lm_head)
//   B_bank   [P, N, R]  fp32 or bf16 ([P, N, widest part's ranks] with rank_parts)
//            Each pair is one adapter of coefficient 1 (modlora/cpu.py pack_bank, via
//            kernels/reference.py merge_pair): "output" folds w*scale into A's rows, "ab" folds
//            sqrt(w*scale) into both A and B; the kernel applies no coefficient.
//   row_pair [M]        int64 in [0, P), or None
//   rank_parts [Q, 3]   int64 (n_end, r_lo, r_hi) per part of the output columns, or None: columns
//                       [previous n_end, n_end) read only ranks [r_lo, r_hi) of u, against the first
//                       r_hi - r_lo entries of their B_bank rows (a grouped call's block-diagonal B,
//                       stored without its zeros: no work and no bytes for them)
//   isa                 the ISA for this call ("avx2", "amx", ...), or None: the one set by set_isa
//   prefetch            "l1" (None) or "l2": where W is prefetched ahead of its reads (kernel_body.h,
//                       prefetch_w and prefetch_block; modlora.dispatch measures both)
//   k_chunk             K in chunks of this many elements (None or 0: all at once): with more rows
//                       of x than L1 holds at K (down_proj at beam 5), a chunk's x stays in L1
//                       while the thread's W rows pass (kernel_body.h, rows_blocked; dispatch
//                       measures it where x's register block does not fit in L1); the tile
//                       kernel reads whole rows and ignores it
//
// Two phases, each parallel over threads (at::parallel_for, OpenMP in torch's CPU builds):
//   1. shrink: u[m] = A_bank[p_m] x[m] ([M, R], tiny), rows grouped by pair so each A_p is read once;
//   2. main: threads own contiguous ranges of W's rows, stream them once, and for each block of W
//      rows compute the dot products against all M rows of x (fp32 copy, in cache); the epilogue
//      adds the bias and u[m] . B_bank[p_m][n, :] and stores y once.
// The vector code lives in kernels_*.cpp, one ISA per file; the ISA is chosen at run time. For bf16
// x and W, avx512_bf16 runs vdpbf16ps and amx the tile driver of amx_body.h (x repacked per call by
// pack_x_tiles, W read in place); for other dtypes both run the AVX-512 FMA kernel.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <array>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <emmintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "bf16.h"
#include "decode_attention.h"
#include "lora_bank.h"

namespace modlora_cpu {
namespace {

enum Isa : int { kScalar, kAvx2, kAvx512, kAvx512Bf16, kAmx, kAmxEmulated, kIsaCount };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512", "avx512_bf16", "amx", "amx_emulated"};

#if defined(__x86_64__)
// AMX-BF16 and AMX-TILE (CPUID.(EAX=7, ECX=0):EDX bits 22 and 24), and the tile state granted:
// Linux gives a process the 8 KB of tile data only on request (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA), once per process; refused or another OS: no AMX.
bool amx_granted() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !((edx >> 22) & 1) || !((edx >> 24) & 1)) return false;
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

// Rows [m0, m1) of bf16 x [M, K] into the AMX B-tile layout (amx_body.h), out zeroed beforehand:
// tile (mt, ks) holds 16 pairs (rows) of 16 rows of x, pair kp of row i at [kp][i] =
// x[16 mt + i][32 ks + 2 kp + {0, 1}]; past M and K it stays zero.
void pack_x_pairs(const uint16_t* x, int64_t K, uint16_t* out, int64_t m0, int64_t m1) {
  const int64_t k_steps = (K + kTileK - 1) / kTileK;
  for (int64_t m = m0; m < m1; ++m) {
    uint16_t* row = out + (m / kTileRows) * k_steps * kTileRows * kTileK + (m % kTileRows) * 2;
    for (int64_t k = 0; k < K; ++k)
      row[(k / kTileK) * kTileRows * kTileK + (k % kTileK) / 2 * kTileK + (k & 1)] = x[m * K + k];
  }
}

int64_t x_tiles_elems(int64_t M, int64_t K) {
  return (M + kTileRows - 1) / kTileRows * ((K + kTileK - 1) / kTileK) * kTileRows * kTileK;
}

// A tile kernel against exact integer arithmetic, on 70 x 70 x 21 (x tiles over all four C tiles
// and a second pass, a K tail, a partial block of W rows): small integers make every sum exact in
// any order, so a layout, tail or operand-order mistake shows as a mismatch. The hardware AMX path
// runs it once before it is offered (it was written on CPUs without AMX); the tests run it on the
// emulated tiles.
bool tiles_self_check(RowsFn rows) {
  constexpr int64_t M = 70, K = 70, N = 21;
  const auto bf16 = [](int v) {  // small integers are exact in bf16: the top half of their fp32 bits
    const float f = static_cast<float>(v);
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    return static_cast<uint16_t>(bits >> 16);
  };
  const auto xv = [](int64_t m, int64_t k) { return static_cast<int>((m * 7 + k * 3) % 9) - 4; };
  const auto wv = [](int64_t n, int64_t k) { return static_cast<int>((n * 5 + k) % 7) - 3; };
  std::vector<uint16_t> x(M * K), w(N * K), xt(x_tiles_elems(M, K), 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) x[m * K + k] = bf16(xv(m, k));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) w[n * K + k] = bf16(wv(n, k));
  pack_x_pairs(x.data(), K, xt.data(), 0, M);
  std::vector<float> y(M * N, -1.f);
  BankArgs a;
  a.M = M;
  a.N = N;
  a.K = K;
  a.w = w.data();
  a.w_bf16 = true;
  a.ldw = K;
  a.xt = xt.data();
  a.y = y.data();
  rows(a, 0, N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t want = 0;
      for (int64_t k = 0; k < K; ++k) want += xv(m, k) * wv(n, k);
      if (y[m * N + n] != static_cast<float>(want)) return false;
    }
  return true;
}

// Which ISAs this CPU runs (amx_emulated: none, until a test allows it).
std::array<bool, kIsaCount> detect_isas() {
  std::array<bool, kIsaCount> ok{};
  ok[kScalar] = true;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  ok[kAvx2] = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  ok[kAvx512] = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl");
  ok[kAvx512Bf16] = ok[kAvx512] && __builtin_cpu_supports("avx512bf16");
#endif
#if defined(__x86_64__)
  ok[kAmx] = ok[kAvx512] && amx_granted();  // the AMX file's epilogue is AVX-512 code
  if (ok[kAmx] && !tiles_self_check(rows_amx)) {
    ok[kAmx] = false;
    std::fprintf(stderr, "modlora._C: the AMX kernel failed its self-check against integer arithmetic; "
                         "AMX is not used (please report this CPU)\n");
  }
#endif
  return ok;
}

const std::array<bool, kIsaCount> kSupported = detect_isas();
std::atomic<bool> g_emulation{false};  // "amx_emulated" accepted (tests only)

int best_isa() {
  int best = kScalar;
  for (int i = 0; i < kAmxEmulated; ++i)
    if (kSupported[i]) best = i;
  return best;
}

const int kBestIsa = best_isa();
std::atomic<int> g_isa{kBestIsa};

bool runs(int isa) { return isa == kAmxEmulated ? g_emulation.load() : kSupported[isa]; }

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (int i = 0; i < kAmxEmulated; ++i)
    if (kSupported[i]) names.emplace_back(kIsaNames[i]);
  return names;
}

bool known_isa(int isa) { return isa != kAmxEmulated || g_emulation.load(); }

// The ISA named `name` ("auto": the best), checked against this CPU (no allocation unless it fails).
int isa_index(c10::string_view name, const char* who) {
  if (name == "auto") return kBestIsa;
  for (int i = 0; i < kIsaCount; ++i)
    if (known_isa(i) && name == kIsaNames[i]) {
      TORCH_CHECK(runs(i), who, ": '", name, "' is not supported on this CPU (supported: auto, ",
                  c10::Join(", ", supported_isas()), ")");
      return i;
    }
  std::vector<std::string> known{"auto"};
  for (int i = 0; i < kIsaCount; ++i)
    if (known_isa(i)) known.emplace_back(kIsaNames[i]);
  TORCH_CHECK(false, who, ": unknown ISA '", name, "', expected one of ", c10::Join(", ", known));
}

// The main phase's kernel for an ISA and the case's dtypes (bf16: x and W both bf16).
struct Kernel {
  RowsFn rows;
  int64_t block = 4;    // output columns per parallel task
  bool bf16_x = false;  // reads x as bf16 (BankArgs::xb)
  bool tiles = false;   // reads x in the AMX B-tile layout (BankArgs::xt)
};

Kernel kernel_for(int isa, bool bf16) {
  if (isa == kAmxEmulated) return bf16 ? Kernel{rows_amx_emulated, kTileRows, false, true} : Kernel{rows_scalar};
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
#if defined(__x86_64__)
    case kAmx:
      return bf16 ? Kernel{rows_amx, kTileRows, false, true} : Kernel{rows_avx512};
#endif
    case kAvx512Bf16:
      return bf16 ? Kernel{rows_avx512bf16, 4, true} : Kernel{rows_avx512};
    case kAvx512:
      return {rows_avx512};
    case kAvx2:
      return {rows_avx2};
    default:
      break;
  }
#endif
  return {rows_scalar};
}

bool is_f32_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

// Threads take output columns in blocks; a grain of about 16K multiply-adds per task.
int64_t grain_for(int64_t K, int64_t block) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, block * K));
}

// Run the kernel over output columns [0, N) in its blocks, in parallel when there is enough work.
void run_parallel(const Kernel& kernel, const BankArgs& a) {
  const int64_t blk = kernel.block;
  at::parallel_for(0, (a.N + blk - 1) / blk, grain_for(a.K, blk), [&](int64_t b0, int64_t b1) {
    kernel.rows(a, b0 * blk, std::min(a.N, b1 * blk));
  });
}

at::Tensor pack_x_tiles(const at::Tensor& xb) {
  const int64_t M = xb.size(0), K = xb.size(1);
  at::Tensor out = at::zeros({x_tiles_elems(M, K)}, xb.options());
  const auto* x = static_cast<const uint16_t*>(xb.data_ptr());
  auto* o = static_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, M, grain_for(K, 1), [&](int64_t m0, int64_t m1) { pack_x_pairs(x, K, o, m0, m1); });
  return out;
}

void check_x_weight(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2, "lora_bank_linear: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, "lora_bank_linear: weight must be [N, K], got ", weight.sizes());
  TORCH_CHECK(is_f32_or_bf16(x), "lora_bank_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(is_f32_or_bf16(weight), "lora_bank_linear: weight must be float32 or bfloat16, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.size(1) == x.size(1), "lora_bank_linear: x is [", x.size(0), ", ", x.size(1),
              "] but weight is ", weight.sizes(), " (expected [N, ", x.size(1), "])");
}

// A contiguous fp32 or bf16 tensor's elements as fp32: its own data, or a copy in `copy`. A plain
// loop, not aten's to() (dispatch, allocation): with it for x, the bias and u a call's fixed cost
// was 7-20 us, now 4-5 (8 x 64 W, 5 rows, bias and bank, one Zen 3 core).
const float* as_f32(const at::Tensor& t, std::vector<float>& copy) {
  if (t.scalar_type() == at::kFloat) return t.data_ptr<float>();
  const auto* h = static_cast<const uint16_t*>(t.data_ptr());
  copy.resize(t.numel());
  for (size_t i = 0; i < copy.size(); ++i) copy[i] = bf16_to_f32(h[i]);
  return copy.data();
}

// The bias as fp32 [N] (its data, or a copy in `copy`), or null.
const float* float_bias(const c10::optional<at::Tensor>& bias, at::Tensor& keep, std::vector<float>& copy) {
  if (!(bias.has_value() && bias->defined())) return nullptr;
  keep = is_f32_or_bf16(*bias) ? bias->contiguous() : bias->to(at::kFloat).contiguous();
  return as_f32(keep, copy);
}

// The adapter bank, checked: A [P, R, K], B [P, N, R], pair [M] (pp null: every row uses pair 0).
struct Bank {
  at::Tensor A, B, pairs;
  int64_t P = 0, R = 0;
  const int64_t* pp = nullptr;
};

const int64_t* checked_pairs(const at::Tensor& row_pair, int64_t M, int64_t P) {
  TORCH_CHECK(row_pair.scalar_type() == at::kLong && row_pair.dim() == 1 && row_pair.size(0) == M,
              "lora_bank_linear: row_pair must be int64 [M] = [", M, "], got ", row_pair.scalar_type(), " ",
              row_pair.sizes());
  const int64_t* pp = row_pair.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(pp[m] >= 0 && pp[m] < P, "lora_bank_linear: row_pair[", m, "] = ", pp[m],
                " is out of range for a bank of ", P, " pairs");
  return pp;
}

// B_bank's last dim is R, or with rank_parts (`parts`) the widest part's ranks (checked_parts).
Bank checked_bank(const at::Tensor& A_bank, const at::Tensor& B_bank, const c10::optional<at::Tensor>& row_pair,
                  int64_t M, int64_t N, int64_t K, bool parts) {
  Bank bank;
  bank.A = A_bank.contiguous();
  bank.B = B_bank.contiguous();
  TORCH_CHECK(bank.A.dim() == 3 && bank.A.size(2) == K, "lora_bank_linear: A_bank must be [P, R, K] with K = ", K,
              ", got ", bank.A.sizes());
  bank.P = bank.A.size(0);
  bank.R = bank.A.size(1);
  const bool b_ok = bank.B.dim() == 3 && bank.B.size(0) == bank.P && bank.B.size(1) == N;
  TORCH_CHECK(b_ok && (parts || bank.B.size(2) == bank.R), "lora_bank_linear: B_bank must be [P, N, R] = [", bank.P,
              ", ", N, ", ", bank.R, "] ([P, N, widest part's ranks] with rank_parts), got ", bank.B.sizes());
  TORCH_CHECK(is_f32_or_bf16(bank.A) && is_f32_or_bf16(bank.B),
              "lora_bank_linear: A_bank and B_bank must be float32 or bfloat16, got ", bank.A.scalar_type(), " and ",
              bank.B.scalar_type());
  if (row_pair.has_value() && row_pair->defined()) {
    bank.pairs = row_pair->contiguous();
    bank.pp = checked_pairs(bank.pairs, M, bank.P);
  } else {
    TORCH_CHECK(bank.P >= 1, "lora_bank_linear: an empty bank (P = 0) needs A_bank = B_bank = None");
  }
  return bank;
}

// Rows grouped by pair (counting sort): rows of pair p are order[start[p] .. start[p + 1]).
struct PairGroups {
  std::vector<int64_t> start, order;
  bool identity = true;  // order[m] == m for every m
};

PairGroups group_by_pair(const int64_t* pp, int64_t M, int64_t P) {
  PairGroups g;
  g.start.assign(P + 1, 0);
  g.order.resize(M);
  for (int64_t m = 0; m < M; ++m) ++g.start[(pp ? pp[m] : 0) + 1];
  for (int64_t p = 0; p < P; ++p) g.start[p + 1] += g.start[p];
  std::vector<int64_t> next(g.start.begin(), g.start.end() - 1);
  for (int64_t m = 0; m < M; ++m) g.order[next[pp ? pp[m] : 0]++] = m;
  for (int64_t m = 0; m < M; ++m) g.identity = g.identity && g.order[m] == m;
  return g;
}

// The shrink's kernel: bf16 dot products (vdpbf16ps) where x and A_bank are both bf16 and the ISA
// has them, as the main phase reads W (AMX's tile driver is laid out for W's rows: its CPUs' AVX-512
// BF16 serves); else the FMA kernel on the fp32 copy of x. Through the FMA kernel the shrink of a
// k/v call (N = 128, R = 32) took as long as its main phase (in cache, 40 rows: 76 against 39 us).
Kernel shrink_kernel_for(int isa, bool bf16) {
  if (bf16 && (isa == kAvx512Bf16 || isa == kAmx)) return kernel_for(kAvx512Bf16, true);
  return kernel_for(isa, false);
}

// x's rows in pair order (g.order), unless they are in it already (then x itself).
template <typename T>
const T* rows_in_pair_order(const T* x, int64_t M, int64_t K, const PairGroups& g, std::vector<T>& copy) {
  if (g.identity) return x;
  copy.resize(M * K);
  for (int64_t i = 0; i < M; ++i) std::memcpy(&copy[i * K], x + g.order[i] * K, K * sizeof(T));
  return copy.data();
}

// Shrink: u[m] = A_bank[p_m] x[m] as fp32 [M, R] (x: fp32 [M, K], and bf16 for a kernel that reads
// it). Rows are grouped by pair so that each A_p is streamed once; the tasks are (pair, 4 rank rows),
// each a small-M linear of `kernel`.
std::vector<float> shrink(const Kernel& kernel, const float* xf, const uint16_t* xb, int64_t M, int64_t K,
                          const Bank& bank) {
  const int64_t R = bank.R;
  PairGroups g = group_by_pair(bank.pp, M, bank.P);
  std::vector<float> copy_f;
  std::vector<uint16_t> copy_b;
  const float* xs_f = kernel.bf16_x ? nullptr : rows_in_pair_order(xf, M, K, g, copy_f);
  const uint16_t* xs_b = kernel.bf16_x ? rows_in_pair_order(xb, M, K, g, copy_b) : nullptr;
  std::vector<float> us(M * R);
  struct Task {
    int64_t p, r0, r1;
  };
  std::vector<Task> tasks;
  for (int64_t p = 0; p < bank.P; ++p)
    if (g.start[p + 1] > g.start[p])
      for (int64_t r0 = 0; r0 < R; r0 += 4) tasks.push_back({p, r0, std::min(R, r0 + 4)});
  const auto* a_base = static_cast<const char*>(bank.A.data_ptr());
  const int64_t a_elem = bank.A.element_size();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain_for(K, 4), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Task& t = tasks[i];
      BankArgs s;
      s.M = g.start[t.p + 1] - g.start[t.p];
      s.N = R;
      s.K = K;
      s.w = a_base + t.p * R * K * a_elem;
      s.w_bf16 = bank.A.scalar_type() == at::kBFloat16;
      s.ldw = K;
      if (kernel.bf16_x)
        s.xb = xs_b + g.start[t.p] * K;
      else
        s.xf = xs_f + g.start[t.p] * K;
      s.y = us.data() + g.start[t.p] * R;
      kernel.rows(s, t.r0, t.r1);
    }
  });
  if (g.identity) return us;
  std::vector<float> u(M * R);  // back to the rows' order
  for (int64_t i = 0; i < M; ++i) std::memcpy(&u[g.order[i] * R], &us[i * R], R * sizeof(float));
  return u;
}

// rank_parts [Q, 3] int64 (n_end, r_lo, r_hi) per part of the output columns, checked: n_end rising
// to N, 0 <= r_lo <= r_hi <= R, and B_bank's rows `ldb` wide: the widest part's r_hi - r_lo (a
// block-diagonal B with its zeros, ldb = R, would be read at the wrong ranks).
at::Tensor checked_parts(const at::Tensor& parts, int64_t N, int64_t R, int64_t ldb) {
  TORCH_CHECK(parts.scalar_type() == at::kLong && parts.dim() == 2 && parts.size(1) == 3 && parts.size(0) >= 1,
              "lora_bank_linear: rank_parts must be int64 [Q, 3] (n_end, r_lo, r_hi), got ", parts.scalar_type(),
              " ", parts.sizes());
  at::Tensor c = parts.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  int64_t prev = 0, widest = 0;
  for (int64_t q = 0; q < c.size(0); ++q) {
    TORCH_CHECK(p[3 * q] > prev && p[3 * q] <= N, "lora_bank_linear: rank_parts n_end must rise to N = ", N,
                ", got ", p[3 * q], " after ", prev);
    TORCH_CHECK(p[3 * q + 1] >= 0 && p[3 * q + 1] <= p[3 * q + 2] && p[3 * q + 2] <= R, "lora_bank_linear: rank_parts[",
                q, "] ranks [", p[3 * q + 1], ", ", p[3 * q + 2], ") are not inside [0, R = ", R, ")");
    prev = p[3 * q];
    widest = std::max(widest, p[3 * q + 2] - p[3 * q + 1]);
  }
  TORCH_CHECK(prev == N, "lora_bank_linear: rank_parts must end at N = ", N, ", got ", prev);
  TORCH_CHECK(ldb == widest, "lora_bank_linear: with rank_parts B_bank must be [P, N, ", widest,
              "] (the widest part's ranks), got last dim ", ldb);
  return c;
}

// The cache level W is prefetched into ahead of its reads: "l1" (the default) or "l2".
bool prefetch_to_l2(const std::optional<c10::string_view>& prefetch) {
  if (!prefetch.has_value() || *prefetch == "l1") return false;
  TORCH_CHECK(*prefetch == "l2", "lora_bank_linear: unknown prefetch '", *prefetch, "', expected 'l1' or 'l2'");
  return true;
}

}  // namespace

at::Tensor lora_bank_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& A_bank, const c10::optional<at::Tensor>& B_bank,
                                const c10::optional<at::Tensor>& row_pair,
                                const std::optional<c10::string_view>& isa_name,
                                const c10::optional<at::Tensor>& rank_parts,
                                const std::optional<c10::string_view>& prefetch, std::optional<int64_t> k_chunk) {
  check_x_weight(x, weight);
  const bool prefetch_l2 = prefetch_to_l2(prefetch);
  TORCH_CHECK(k_chunk.value_or(0) >= 0, "lora_bank_linear: k_chunk must be >= 0 (0 or None: all of K), got ",
              k_chunk.value_or(0));
  const bool has_a = A_bank.has_value() && A_bank->defined();
  const bool has_b = B_bank.has_value() && B_bank->defined();
  TORCH_CHECK(has_a == has_b, "lora_bank_linear: A_bank and B_bank must both be given or both be None");
  const bool has_parts = rank_parts.has_value() && rank_parts->defined();
  TORCH_CHECK(has_a || !(has_parts || (row_pair.has_value() && row_pair->defined())),
              "lora_bank_linear: row_pair or rank_parts given without an adapter bank");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == N), "lora_bank_linear: bias must be [N] = [", N,
              "], got ", bias->sizes());
  TORCH_CHECK(!has_bias || at::isFloatingType(bias->scalar_type()),
              "lora_bank_linear: bias must be a floating-point tensor, got ", bias->scalar_type());
  Bank bank;
  if (has_a) bank = checked_bank(*A_bank, *B_bank, row_pair, M, N, K, has_parts);
  const at::Tensor parts = has_parts ? checked_parts(*rank_parts, N, bank.R, bank.B.size(2)) : at::Tensor();
  const int isa = isa_name.has_value() ? isa_index(*isa_name, "lora_bank_linear") : g_isa.load(std::memory_order_relaxed);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;

  const at::Tensor w = weight.stride(1) == 1 && weight.stride(0) >= K ? weight : weight.contiguous();
  const at::Tensor xc = x.contiguous();
  const bool bf16_x = x.scalar_type() == at::kBFloat16;
  const Kernel kernel = kernel_for(isa, w.scalar_type() == at::kBFloat16 && bf16_x);
  // The tile kernel reads whole rows of W: it ignores k_chunk (a speed hint, as prefetch is).
  const int64_t chunk = !kernel.tiles && k_chunk.value_or(0) < K ? k_chunk.value_or(0) : 0;
  const bool shrinks = bank.R > 0 && bank.P > 0;
  const Kernel shrinker = shrink_kernel_for(isa, bf16_x && shrinks && bank.A.scalar_type() == at::kBFloat16);
  // An fp32 copy of x only for a kernel that reads one: the bf16-dot and tile kernels read x as it is.
  std::vector<float> x_copy, bias_copy;
  const bool reads_f32 = !(kernel.bf16_x || kernel.tiles) || (shrinks && !shrinker.bf16_x);
  const float* xf = reads_f32 ? as_f32(xc, x_copy) : nullptr;
  const uint16_t* xb = bf16_x ? static_cast<const uint16_t*>(xc.data_ptr()) : nullptr;
  const at::Tensor xt = kernel.tiles ? pack_x_tiles(xc) : at::Tensor();
  at::Tensor bias_kept;
  BankArgs a;
  a.M = M;
  a.N = N;
  a.K = K;
  a.w = w.data_ptr();
  a.w_bf16 = w.scalar_type() == at::kBFloat16;
  a.ldw = w.stride(0);
  a.xf = xf;
  a.xb = kernel.bf16_x ? xb : nullptr;
  a.xt = kernel.tiles ? static_cast<const uint16_t*>(xt.data_ptr()) : nullptr;
  a.bias = float_bias(bias, bias_kept, bias_copy);
  a.y = out.data_ptr();
  a.y_bf16 = out.scalar_type() == at::kBFloat16;
  a.prefetch_l2 = prefetch_l2;
  std::vector<float> partial(chunk ? M * N : 0);
  a.k_chunk = chunk;
  a.partial = partial.data();

  std::vector<float> u;
  if (has_parts) {
    a.parts = parts.data_ptr<int64_t>();
    a.n_parts = parts.size(0);
  }
  if (shrinks) {
    u = shrink(shrinker, xf, xb, M, K, bank);
    a.R = bank.R;
    a.u = u.data();
    a.bank_b = bank.B.data_ptr();
    a.b_bf16 = bank.B.scalar_type() == at::kBFloat16;
    a.ldb = bank.B.size(2);
    a.pair = bank.pp;
  }
  run_parallel(kernel, a);
  return out;
}

AttnFn attention_kernel() {
#if defined(__x86_64__) || defined(__i386__)
  switch (g_isa.load(std::memory_order_relaxed)) {
    case kAvx512:
    case kAvx512Bf16:
    case kAmx:
      return attention_avx512;
    case kAvx2:
      return attention_avx2;
    default:
      break;
  }
#endif
  return attention_scalar;
}

namespace {

void set_isa(const std::string& name) { g_isa = isa_index(name, "modlora._C.set_isa"); }

// Flush the cache lines of t's bytes from every cache level (clflush), so its next read comes from
// memory while everything else stays cached: how a decode step meets a weight (modlora.dispatch
// calibrates so). False where the CPU has no such instruction here (non-x86): nothing done.
bool evict(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "modlora._C.evict: expected a contiguous CPU tensor, got ",
              t.device(), t.is_contiguous() ? "" : " (not contiguous)");
#if defined(__x86_64__) || defined(__i386__)
  const auto* p = static_cast<const char*>(t.data_ptr());
  const int64_t bytes = t.numel() * t.element_size();
  for (int64_t b = 0; b < bytes; b += 64) _mm_clflush(p + b);
  if (bytes > 0) _mm_clflush(p + bytes - 1);
  _mm_mfence();
  return true;
#else
  (void)t;
  return false;
#endif
}

}  // namespace
}  // namespace modlora_cpu

TORCH_LIBRARY_FRAGMENT(modlora, m) {
  m.def(
      "lora_bank_linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? A_bank=None, Tensor? B_bank=None, "
      "Tensor? row_pair=None, str? isa=None, Tensor? rank_parts=None, str? prefetch=None, int? k_chunk=None) "
      "-> Tensor");
}

TORCH_LIBRARY_IMPL(modlora, CPU, m) { m.impl("lora_bank_linear", &modlora_cpu::lora_bank_linear_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "modlora C++ ops: the CPU LoRA-bank linear, decode attention and RMSNorm (torch.ops.modlora.*)";
  m.def("isa", []() { return std::string(modlora_cpu::kIsaNames[modlora_cpu::g_isa.load()]); },
        "The vector ISA the CPU op uses now.");
  m.def("best_isa", []() { return std::string(modlora_cpu::kIsaNames[modlora_cpu::kBestIsa]); },
        "The best vector ISA this CPU supports.");
  m.def("supported_isas", &modlora_cpu::supported_isas, "ISAs this CPU can run, worst first.");
  m.def("set_isa", &modlora_cpu::set_isa,
        "The ISA used when a call names none: 'scalar', 'avx2', 'avx512', 'avx512_bf16', 'amx' or 'auto'.");
  m.def("evict", &modlora_cpu::evict, py::arg("tensor"),
        "Flush a contiguous tensor's bytes from the CPU caches (clflush); False where not available.");
  m.def("_allow_amx_emulation", [](bool on) { modlora_cpu::g_emulation = on; },
        "Tests only: accept the ISA 'amx_emulated' (the AMX driver on emulated tile instructions).");
  m.def("_tiles_self_check",
        [](const std::string& isa) {
          const modlora_cpu::Kernel k = modlora_cpu::kernel_for(modlora_cpu::isa_index(isa, "_tiles_self_check"), true);
          TORCH_CHECK(k.tiles, "_tiles_self_check: '", isa, "' has no tile kernel");
          return modlora_cpu::tiles_self_check(k.rows);
        },
        "Tests only: the integer self-check the AMX path passes before it is offered, on 'amx' or 'amx_emulated'.");
}
