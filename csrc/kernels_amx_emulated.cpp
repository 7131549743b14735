// The AMX driver (amx_body.h) on a scalar emulation of the tile instructions, compiled without any
// target attribute: it runs the whole driver (tiling, x's pair layout, tails, several C tiles,
// epilogue) on every CPU. Reachable only from tests (the ISA "amx_emulated", enabled by
// modlora._C._allow_amx_emulation).
#include <cmath>

#include "amx_body.h"
#include "scalar_traits.h"

namespace modlora_cpu {
namespace {

float daz(uint16_t h) {  // a bf16 input: denormals read as zero
  const float f = bf16_to_f32(h);
  return std::fpclassify(f) == FP_SUBNORMAL ? std::copysign(0.f, f) : f;
}

float ftz(float f) { return std::fpclassify(f) == FP_SUBNORMAL ? std::copysign(0.f, f) : f; }

// Tiles of 16 rows x 16 dwords: fp32 in C tiles, bf16 pairs (element 2k low, 2k + 1 high) in A, B.
using TileRegs = uint32_t[16][16];

// TDPBF16PS as the SDM's pseudo-code states it: c[m][n] += a[m][2k] * b[k][2n], then
// += a[m][2k + 1] * b[k][2n + 1], for k in order; the bf16 products are exact in fp32, each sum is
// rounded to nearest even; denormal inputs read as zero, denormal results flushed to zero; MXCSR
// is not consulted.
void tdpbf16ps(TileRegs& c, const TileRegs& a, const TileRegs& b) {
  for (int m = 0; m < 16; ++m)
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < 16; ++n) {
        float acc;
        std::memcpy(&acc, &c[m][n], 4);
        for (int h = 0; h < 2; ++h) {
          const auto ah = static_cast<uint16_t>(a[m][k] >> (16 * h)), bh = static_cast<uint16_t>(b[k][n] >> (16 * h));
          acc = ftz(acc + daz(ah) * daz(bh));
        }
        std::memcpy(&c[m][n], &acc, 4);
      }
}

struct EmulatedTiles {
  using V = Scalar;
  static inline thread_local TileRegs regs[8];
  static void begin() {}
  static void end() {}
  template <int t>
  static void zero() {
    std::memset(regs[t], 0, sizeof(TileRegs));
  }
  template <int t>
  static void load(const void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(regs[t][r], static_cast<const char*>(p) + r * stride, 64);
  }
  template <int c, int a, int b>
  static void dot() {
    tdpbf16ps(regs[c], regs[a], regs[b]);
  }
  template <int t>
  static void store(void* p, int64_t stride) {
    for (int r = 0; r < 16; ++r) std::memcpy(static_cast<char*>(p) + r * stride, regs[t][r], 64);
  }
};

}  // namespace

void rows_amx_emulated(const BankArgs& a, int64_t n0, int64_t n1) { rows_tiles<EmulatedTiles>(a, n0, n1); }

}  // namespace modlora_cpu
