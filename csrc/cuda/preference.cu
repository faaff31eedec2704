// Stage-2 CUDA kernel: one block per prompt row of the [B, M] reward matrix. No torch headers.
#include <cuda_runtime.h>

#include "cuda/block_reduce.cuh"
#include "cuda/launchers.h"
#include "napo_math.h"

namespace napo::cuda {
namespace {

constexpr int kThreads = 128;

template <typename Acc>
__global__ void __launch_bounds__(kThreads)
    preference_kernel(const Acc* chosen, const Acc* rejected, const bool* select, const Acc* coef,
                      const Acc* margin, int64_t pool, int agg, Acc* loss_rows, Acc* weights) {
  const int64_t i = blockIdx.x;
  const int64_t base = i * pool;
  const Acc c = chosen[i];
  LsePair<Acc> p = lse_empty<Acc>();
  Acc sum = 0, count = 0;
  for (int64_t n = threadIdx.x; n < pool; n += blockDim.x) {
    if (!select[base + n]) continue;
    const Acc x = preference_term(c, rejected[n], coef[base + n], margin[base + n]);
    p = lse_push(p, x);
    sum += x;
    count += Acc(1);
  }
  p = block_lse(p);
  sum = block_sum(sum);
  count = block_sum(count);
  if (count == Acc(0)) {  // nothing selected: the loss is undefined, say so loudly
    if (threadIdx.x == 0) loss_rows[i] = static_cast<Acc>(NAN);
    for (int64_t n = threadIdx.x; n < pool; n += blockDim.x) weights[base + n] = static_cast<Acc>(NAN);
    return;
  }
  const Acc z = preference_z(agg, p, sum, count);
  const Acc sig = sigmoid(z);
  if (threadIdx.x == 0) loss_rows[i] = softplus(z);
  for (int64_t n = threadIdx.x; n < pool; n += blockDim.x) {
    const Acc x = preference_term(c, rejected[n], coef[base + n], margin[base + n]);
    weights[base + n] = select[base + n] ? preference_weight(agg, x, coef[base + n], z, sig, count) : Acc(0);
  }
}

template <typename Acc>
const char* launch(const PreferenceRowsArgs& a) {
  if (a.batch == 0) return nullptr;
  preference_kernel<Acc>
      <<<static_cast<unsigned>(a.batch), kThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(
          static_cast<const Acc*>(a.chosen), static_cast<const Acc*>(a.rejected), a.select,
          static_cast<const Acc*>(a.coef), static_cast<const Acc*>(a.margin), a.pool, a.agg,
          static_cast<Acc*>(a.loss_rows), static_cast<Acc*>(a.weights));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* preference_rows(const PreferenceRowsArgs& args) {
  switch (args.dtype) {
    case DType::kFloat32:
      return launch<float>(args);
    case DType::kFloat64:
      return launch<double>(args);
    default:
      return "napo_C: stage 2 runs in float32 or float64";
  }
}

}  // namespace napo::cuda
