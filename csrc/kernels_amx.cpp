// AMX (AMX-TILE + AMX-BF16): the tile driver of amx_body.h on the tile instructions. Only called
// for bf16 x and bf16 W when the CPU has AMX-BF16 and AMX-TILE, AVX-512 (the epilogue), and Linux
// granted the tile state (lora_bank_cpu.cpp, amx_granted). Not yet run on AMX hardware: the same
// driver is tested on every CPU through kernels_amx_emulated.cpp.
// x86 only: on other CPUs this file compiles to nothing.
#if defined(__x86_64__)
// GCC 12 warns about deliberately undefined lanes inside its own avx512fintrin.h.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")

#include <immintrin.h>

#include "amx_body.h"
#include "avx512_traits.h"

namespace modlora_cpu {
namespace {

// The tile configuration (ldtilecfg's 64-byte memory operand): palette 1, every tile 16 x 64 B.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) {
      colsb[t] = 64;
      rows[t] = kTileRows;
    }
  }
};

// GCC's tile intrinsics paste the tile number into the mnemonic by the preprocessor, so they take
// only literal numbers: these take a template argument (%c: the constant without its '$').
struct AmxTiles {
  using V = Avx512;
  // Per call, not per thread: other code on this thread (oneDNN) may load its own configuration.
  static void begin() {
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  static void end() { _tile_release(); }
  template <int t>
  static void zero() {
    asm volatile("{tilezero %%tmm%c0|tilezero tmm%c0}" ::"i"(t));
  }
  template <int t>
  static void load(const void* p, int64_t stride) {
    asm volatile("{tileloadd (%0,%1,1), %%tmm%c2|tileloadd tmm%c2, [%0+%1*1]}" ::"r"(p), "r"(stride), "i"(t)
                 : "memory");
  }
  template <int c, int a, int b>
  static void dot() {
    asm volatile("{tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0|tdpbf16ps tmm%c0, tmm%c1, tmm%c2}" ::"i"(c), "i"(a),
                 "i"(b));
  }
  template <int t>
  static void store(void* p, int64_t stride) {
    asm volatile("{tilestored %%tmm%c2, (%0,%1,1)|tilestored [%0+%1*1], tmm%c2}" ::"r"(p), "r"(stride), "i"(t)
                 : "memory");
  }
};

}  // namespace

void rows_amx(const BankArgs& a, int64_t n0, int64_t n1) { rows_tiles<AmxTiles>(a, n0, n1); }

}  // namespace modlora_cpu

#pragma GCC pop_options

#endif  // x86-64
