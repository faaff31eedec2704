// Block-wide reductions for the CUDA kernels: warp shuffles, then one warp over the warp results.
// The combination order is fixed by the thread layout, so results are bitwise reproducible.
// Every thread of the block must call these, and every thread gets the block's result.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "napo_math.h"

namespace napo::cuda {

constexpr int kWarp = 32;

// Storage type <-> accumulation type (float for fp16/bf16/fp32, double for fp64).
template <typename T>
struct Io;
template <>
struct Io<float> {
  using Acc = float;
  __device__ static float load(float x) { return x; }
  __device__ static float store(float x) { return x; }
};
template <>
struct Io<double> {
  using Acc = double;
  __device__ static double load(double x) { return x; }
  __device__ static double store(double x) { return x; }
};
template <>
struct Io<__half> {
  using Acc = float;
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Io<__nv_bfloat16> {
  using Acc = float;
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// Butterfly (xor) exchange: both partners merge the same two values; lse_merge and + are
// commutative, so every lane ends with identical bits.
template <typename Acc>
__device__ inline LsePair<Acc> warp_lse(LsePair<Acc> p) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const LsePair<Acc> other{__shfl_xor_sync(0xffffffffu, p.max, offset),
                             __shfl_xor_sync(0xffffffffu, p.sum, offset)};
    p = lse_merge(p, other);
  }
  return p;
}

template <typename Acc>
__device__ inline Acc warp_sum(Acc x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// blockDim.x must be a multiple of 32 (at most 1024).
template <typename Acc>
__device__ inline LsePair<Acc> block_lse(LsePair<Acc> p) {
  __shared__ Acc warp_max[kWarp], warp_total[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  p = warp_lse(p);
  __syncthreads();  // the shared slots may still be read by a previous call
  if (lane == 0) {
    warp_max[warp] = p.max;
    warp_total[warp] = p.sum;
  }
  __syncthreads();
  p = lane < warps ? LsePair<Acc>{warp_max[lane], warp_total[lane]} : lse_empty<Acc>();
  return warp_lse(p);  // every warp reduces the same slots: all threads get the result
}

template <typename Acc>
__device__ inline Acc block_sum(Acc x) {
  __shared__ Acc warp_total[kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  x = warp_sum(x);
  __syncthreads();
  if (lane == 0) warp_total[warp] = x;
  __syncthreads();
  return warp_sum(lane < warps ? warp_total[lane] : Acc(0));
}

}  // namespace napo::cuda
