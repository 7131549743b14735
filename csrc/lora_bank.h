// modlora._C CPU "LoRA bank" linear: shared declarations (plain C++, no torch headers).
//
//   y[m, n] = sum_k x[m, k] W[n, k] + b[n] + sum_r u[m, r] B_bank[p_m, n, r],   u[m] = A_bank[p_m] x[m]
//
// The ISA files (kernels_*.cpp) compile the same body (kernel_body.h; amx_body.h for AMX) under different
// `#pragma GCC target` regions; lora_bank_cpu.cpp picks one at run time with __builtin_cpu_supports.
// Nothing here may include torch headers: inline functions of torch compiled under an AVX target
// could be merged by the linker into code that runs on CPUs without that ISA.
#pragma once
#include <cstdint>

namespace modlora_cpu {

// One call of the main phase: output columns [n0, n1) for all M rows.
struct BankArgs {
  int64_t M = 0, N = 0, K = 0, R = 0;
  const void* w = nullptr;      // W [N, K], row stride ldw elements; fp32 or bf16 (raw uint16)
  bool w_bf16 = false;
  int64_t ldw = 0;
  const float* xf = nullptr;    // x [M, K] fp32, row stride K
  const uint16_t* xb = nullptr; // x [M, K] bf16, row stride K, or null (only used by the bf16-dot path)
  const uint16_t* xt = nullptr; // x in the AMX B-tile layout (amx_body.h), or null (only used by AMX)
  const float* u = nullptr;     // u [M, R] fp32 (rank intermediate), null when R == 0
  const void* bank_b = nullptr; // B_bank [P, N, ldb] contiguous; fp32 or bf16
  bool b_bf16 = false;
  int64_t ldb = 0;              // B_bank's last dim: R, or with parts the widest part's ranks
  const int64_t* pair = nullptr;  // [M] pair of each row, null: all rows use pair 0
  // Rank ranges per block of output columns, null: every column reads ranks [0, R). Part q is
  // parts[3q .. 3q + 2] = (n_end, r_lo, r_hi): columns [previous n_end, n_end) read only ranks
  // [r_lo, r_hi) of u, against their B_bank row's first r_hi - r_lo entries (a grouped call's
  // block-diagonal B stored without its zeros).
  const int64_t* parts = nullptr;
  int64_t n_parts = 0;
  const float* bias = nullptr;  // [N] fp32 or null
  void* y = nullptr;            // y [M, N], row stride N; fp32 or bf16
  bool y_bf16 = false;
  // Where the K loop prefetches W ahead of its reads: L1 (false) or L2 only (true).
  // Neither wins everywhere (kernel_body.h, prefetch_w): modlora.dispatch measures both.
  bool prefetch_l2 = false;
  // K in chunks of this many elements, the dot products kept between them in `partial` ([N, M]
  // fp32, allocated by the caller; kernel_body.h, rows_blocked); 0: all of K at once. The tile
  // kernels (amx_body.h) read whole rows: the caller leaves it 0 for them.
  int64_t k_chunk = 0;
  float* partial = nullptr;
};

// AMX tiles: 16 rows of 32 bf16 (A: W's rows; B: 16 rows of x as 16 pairs).
constexpr int64_t kTileRows = 16, kTileK = 32;

using RowsFn = void (*)(const BankArgs&, int64_t n0, int64_t n1);

void rows_scalar(const BankArgs& a, int64_t n0, int64_t n1);
void rows_avx2(const BankArgs& a, int64_t n0, int64_t n1);
void rows_avx512(const BankArgs& a, int64_t n0, int64_t n1);
void rows_avx512bf16(const BankArgs& a, int64_t n0, int64_t n1);
void rows_amx(const BankArgs& a, int64_t n0, int64_t n1);
void rows_amx_emulated(const BankArgs& a, int64_t n0, int64_t n1);

}  // namespace modlora_cpu
