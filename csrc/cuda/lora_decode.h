// The CUDA decode op of modlora: y = x W^T + b + (v * coef) B^T, v = x A^T, for M <= 16 rows.
// Plain C types only (no torch, no CUDA headers), so the kernel file compiles standalone with nvcc
// and the torch binding (lora_decode_op.cpp) with the host compiler.
#pragma once

namespace modlora_cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kMaxRows = 16;   // one fp32 accumulator per row and lane: the decode regime only
constexpr int kMaxRank = 256;  // a pair of rank-128 adapters stacked

// x [M, K], w [N, K], a [R, K], b [N, R] contiguous, of `dtype`; bias [N] or null; coef [R] fp32;
// v_ws: fp32 workspace of M * R floats; y [M, N]. K must be a multiple of 8 and every pointer
// 16-byte aligned (the launcher checks). `stream` is a cudaStream_t. Returns a cudaError_t.
int lora_decode(DType dtype, const void* x, const void* w, const void* bias, const void* a, const void* b,
                const float* coef, float* v_ws, void* y, int M, int N, int K, int R, void* stream);

}  // namespace modlora_cuda
