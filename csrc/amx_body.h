// The AMX kernel (bf16 x and bf16 W), templated over a tile policy so that one driver runs on the
// hardware (kernels_amx.cpp) and on a scalar emulation of the tile instructions
// (kernels_amx_emulated.cpp, which the tests run on every CPU).
//
// It computes C^T = W x^T: W's rows are the A operand as they lie in memory (16 rows x 32 bf16 per
// tile, row stride ldw), so W is never copied or packed. x is repacked once per call
// (lora_bank_cpu.cpp, pack_x_tiles) into the B operand's pair layout, one tile per 16 rows of x and
// 32 of K: B[kp][2i + h] = x[16 mt + i][32 ks + 2 kp + h], zero past M and K. A C tile is
// [16 n x 16 m] fp32. Per 16 rows of W, up to 4 C tiles (64 rows of x) stay in tile registers for
// the whole K loop; W's tile is loaded once per K step and multiplied by each x tile; the C tiles
// then go through the common epilogue (bias, LoRA expand, store).
//
// A tile policy T supplies (tile numbers are compile-time constants, as the instructions need):
//   T::V                      vector traits for the epilogue (kernel_body.h)
//   T::begin(), T::end()      configure every tile as 16 rows x 64 bytes (palette 1) / release
//   T::zero<t>()              tile t = 0
//   T::load<t>(p, stride)     tile t = 16 rows of 64 bytes at p, p + stride, ... (bytes)
//   T::dot<c, a, b>()         tile c += tile a . tile b, TDPBF16PS
//   T::store<t>(p, stride)
// Tiles 0-3 hold C, tile 4 W's rows (A), tile 5 x (B).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernel_body.h"

namespace modlora_cpu {
namespace {

constexpr int kCTiles = 4, kTileA = 4, kTileB = 5;
constexpr int64_t kTileElems = kTileRows * kTileK;  // bf16 elements of one A or B tile

// f(std::integral_constant<int, t>{}) for t = 0 .. n - 1 (n <= kCTiles).
template <int I = 0, typename F>
inline void each_tile(int n, const F& f) {
  if constexpr (I < kCTiles) {
    if (I < n) {
      f(std::integral_constant<int, I>{});
      each_tile<I + 1>(n, f);
    }
  }
}

struct TileSource {
  const uint16_t* p;
  int64_t stride;  // bytes
};

// Where W's A tile for rows [n, n + nb) and K [k, k + kTileK) is read from: W itself, or, for the
// last partial block of rows or the K tail, a zero-padded copy in pad (a full tile load would read
// past the row or past W).
inline TileSource a_tile(const BankArgs& a, int64_t n, int nb, int64_t k, uint16_t (&pad)[kTileRows][kTileK]) {
  const auto* W = static_cast<const uint16_t*>(a.w);
  const int64_t kb = a.K - k < kTileK ? a.K - k : kTileK;
  if (nb == kTileRows && kb == kTileK) return {W + n * a.ldw + k, a.ldw * 2};
  std::memset(pad, 0, sizeof pad);
  for (int j = 0; j < nb; ++j) std::memcpy(pad[j], W + (n + j) * a.ldw + k, kb * 2);
  return {&pad[0][0], kTileK * 2};
}

// The epilogue for the nt C tiles of x rows from 16 * t0, W rows [n, n + nb): c[t][j][i] is row
// n + j of W times row 16 (t0 + t) + i of x.
template <typename V>
void tile_epilogue(const BankArgs& a, int64_t t0, int nt, int64_t n, int nb, const float (*c)[kTileRows][kTileRows]) {
  for (int t = 0; t < nt; ++t) {
    const int64_t m0 = (t0 + t) * kTileRows;
    const int mb = static_cast<int>(a.M - m0 < kTileRows ? a.M - m0 : kTileRows);
    for (int j0 = 0; j0 < nb; j0 += 4) {
      const int jb = nb - j0 < 4 ? nb - j0 : 4;
      Tile acc;
      for (int i = 0; i < mb; ++i)
        for (int j = 0; j < jb; ++j) acc[i][j] = c[t][j0 + j][i];
      const Rest rest = rest_of(a, n + j0, jb);
      if (a.b_bf16)
        epilogue<V, uint16_t>(a, m0, mb, n + j0, jb, acc, rest);
      else
        epilogue<V, float>(a, m0, mb, n + j0, jb, acc, rest);
    }
  }
}

// Output columns [n0, n1) for all M rows.
template <typename T>
void rows_tiles(const BankArgs& a, int64_t n0, int64_t n1) {
  const auto* W = static_cast<const uint16_t*>(a.w);
  const int64_t m_tiles = (a.M + kTileRows - 1) / kTileRows, k_steps = (a.K + kTileK - 1) / kTileK;
  uint16_t pad[kTileRows][kTileK];
  alignas(64) float c[kCTiles][kTileRows][kTileRows];
  T::begin();
  for (int64_t n = n0; n < n1; n += kTileRows) {
    const int nb = static_cast<int>(n1 - n < kTileRows ? n1 - n : kTileRows);
    // A block of W rows ahead (prefetch_block), prefetched as in FmaDot::block (kernel_body.h).
    const uint16_t* pf = W + prefetch_block(n, n1, kTileRows, a.prefetch_l2) * a.ldw;
    // 64 rows of x per pass; a second pass reads these 16 rows of W from L2, not memory.
    for (int64_t t0 = 0; t0 < m_tiles; t0 += kCTiles) {
      const int nt = static_cast<int>(m_tiles - t0 < kCTiles ? m_tiles - t0 : kCTiles);
      each_tile(nt, [](auto t) { T::template zero<decltype(t)::value>(); });
      for (int64_t ks = 0; ks < k_steps; ++ks) {
        const int64_t k = ks * kTileK;
        if (a.prefetch_l2)
          prefetch_lines<true, kTileRows * 64>(pf + kTileRows * k);
        else
          prefetch_lines<false, kTileRows * 64>(pf + kTileRows * k);
        const TileSource src = a_tile(a, n, nb, k, pad);
        T::template load<kTileA>(src.p, src.stride);
        each_tile(nt, [&](auto t) {
          constexpr int ct = decltype(t)::value;
          T::template load<kTileB>(a.xt + ((t0 + ct) * k_steps + ks) * kTileElems, kTileK * 2);
          T::template dot<ct, kTileA, kTileB>();
        });
      }
      each_tile(nt, [&](auto t) {
        constexpr int ct = decltype(t)::value;
        T::template store<ct>(&c[ct][0][0], kTileRows * 4);
      });
      tile_epilogue<typename T::V>(a, t0, nt, n, nb, c);
    }
  }
  T::end();
}

}  // namespace
}  // namespace modlora_cpu
