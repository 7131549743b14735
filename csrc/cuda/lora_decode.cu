// Decode-shaped dual-LoRA linear on CUDA (sm80+): few rows, so every byte of W is read once, at
// memory bandwidth, by one warp per output column with 16-byte loads; x (M <= 16 rows) stays in
// L1/L2. Two launches: the rank shrink v = (x A^T) * coef rounded to the input dtype (as the Triton
// kernel and the torch reference round it), then the base GEMV with the LoRA expand folded into
// each lane's partial sum before the warp reduction. fp32 accumulation throughout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <tuple>

#include "lora_decode.h"

namespace modlora_cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct Vec {  // 16 bytes of T
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

template <typename T>
__device__ __forceinline__ Vec<T> load16(const T* p) {
  Vec<T> out;
  *reinterpret_cast<uint4*>(out.v) = __ldg(reinterpret_cast<const uint4*>(p));
  return out;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// This lane's share of the dot products of x's rows with one row of a matrix (W or A), K split
// across the warp in 16-byte steps: acc[m] = sum over the lane's k of x[m, k] * row[k].
template <typename T, int MB>
__device__ __forceinline__ void lane_dots(const T* __restrict__ x, const T* __restrict__ row, int M, int K, int lane,
                                          float (&acc)[MB]) {
  constexpr int E = Vec<T>::kN;
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;
  for (int k = lane * E; k < K; k += kWarp * E) {
    const Vec<T> rv = load16(row + k);
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m >= M) break;
      const Vec<T> xv = load16(x + static_cast<int64_t>(m) * K + k);
#pragma unroll
      for (int e = 0; e < E; ++e) acc[m] = fmaf(to_f(xv.v[e]), to_f(rv.v[e]), acc[m]);
    }
  }
}

// Kernels are instantiated for row buckets MB in {1, 2, 4, 8, 16}; rows m >= M of a bucket are
// skipped (MB - M < MB / 2 rows of a bucket idle, not 16 instantiations per dtype to compile).

// v_ws[m, r] = float(T(coef[r] * sum_k x[m, k] a[r, k])): one warp per rank.
template <typename T, int MB>
__global__ void shrink_kernel(const T* __restrict__ x, const T* __restrict__ a, const float* __restrict__ coef,
                              float* __restrict__ v_ws, int M, int K, int R) {
  const int lane = threadIdx.x % kWarp;
  const int r = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (r >= R) return;
  float acc[MB];
  lane_dots<T, MB>(x, a + static_cast<int64_t>(r) * K, M, K, lane, acc);
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m >= M) break;
    const float s = warp_sum(acc[m]);
    if (lane == 0) v_ws[m * R + r] = to_f(from_f<T>(s * coef[r]));
  }
}

// y[m, n] = T(sum_k x[m, k] w[n, k] + sum_r v_ws[m, r] b[n, r] + bias[n]): one warp per column.
template <typename T, int MB>
__global__ void gemv_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                            const T* __restrict__ b, const float* __restrict__ v_ws, T* __restrict__ y,
                            int M, int N, int K, int R) {
  const int lane = threadIdx.x % kWarp;
  const int n = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;
  float acc[MB];
  lane_dots<T, MB>(x, w + static_cast<int64_t>(n) * K, M, K, lane, acc);
  for (int r = lane; r < R; r += kWarp) {  // the expand, spread over the lanes
    const float br = to_f(b[static_cast<int64_t>(n) * R + r]);
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m < M) acc[m] = fmaf(v_ws[m * R + r], br, acc[m]);
    }
  }
  const float bn = bias != nullptr ? to_f(bias[n]) : 0.f;
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    if (m >= M) break;
    const float s = warp_sum(acc[m]);
    if (lane == 0) y[static_cast<int64_t>(m) * N + n] = from_f<T>(s + bn);
  }
}

template <typename T, int MB>
cudaError_t launch(const T* x, const T* w, const T* bias, const T* a, const T* b, const float* coef, float* v_ws,
                   T* y, int M, int N, int K, int R, cudaStream_t stream) {
  const dim3 block(kWarp * kWarpsPerBlock);
  if (R > 0) {
    shrink_kernel<T, MB><<<(R + kWarpsPerBlock - 1) / kWarpsPerBlock, block, 0, stream>>>(x, a, coef, v_ws, M, K, R);
  }
  gemv_kernel<T, MB><<<(N + kWarpsPerBlock - 1) / kWarpsPerBlock, block, 0, stream>>>(x, w, bias, b, v_ws, y, M, N,
                                                                                       K, R);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run(const void* x, const void* w, const void* bias, const void* a, const void* b, const float* coef,
                float* v_ws, void* y, int M, int N, int K, int R, void* stream) {
  const auto args = std::make_tuple(static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias),
                                    static_cast<const T*>(a), static_cast<const T*>(b), coef, v_ws, static_cast<T*>(y),
                                    M, N, K, R, static_cast<cudaStream_t>(stream));
  if (M <= 1) return std::apply(launch<T, 1>, args);
  if (M <= 2) return std::apply(launch<T, 2>, args);
  if (M <= 4) return std::apply(launch<T, 4>, args);
  if (M <= 8) return std::apply(launch<T, 8>, args);
  return std::apply(launch<T, 16>, args);
}

}  // namespace

int lora_decode(DType dtype, const void* x, const void* w, const void* bias, const void* a, const void* b,
                const float* coef, float* v_ws, void* y, int M, int N, int K, int R, void* stream) {
  if (M < 1 || M > kMaxRows || R < 0 || R > kMaxRank || K % 8 != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case kFloat32: return run<float>(x, w, bias, a, b, coef, v_ws, y, M, N, K, R, stream);
    case kFloat16: return run<__half>(x, w, bias, a, b, coef, v_ws, y, M, N, K, R, stream);
    case kBFloat16: return run<__nv_bfloat16>(x, w, bias, a, b, coef, v_ws, y, M, N, K, R, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace modlora_cuda
