// Stage-1 CUDA kernels: the fused per-row passes over a logits chunk (the GEMMs run in ATen/cuBLAS,
// csrc/chunked_linear.h). No torch headers: compiled by nvcc alone (see `make check-cuda`).
#include <cuda_runtime.h>

#include <algorithm>

#include "cuda/block_reduce.cuh"
#include "cuda/launchers.h"
#include "napo_math.h"

namespace napo::cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kColThreads = 256;
constexpr int64_t kRowsPerGroup = 32;  // rows one thread walks down its column in the backward
constexpr int64_t kMaxGridY = 65535;

// The kernels read raw logits and map them to the head's logits z with `map` (PlainLogits,
// ScaledLogits or CappedLogits of napo_math.h, a template parameter: one instantiation each).

// One block per row: online (max, sum-exp) per thread, merged across the block, then the target
// logit and, optionally, softmax * dz/draw written over the row (the frozen head's factor of W).
template <typename T, class M>
__global__ void __launch_bounds__(kRowThreads)
    logprob_rows_kernel(const T* logits, T* probs, int64_t vocab, const int64_t* targets,
                        typename Io<T>::Acc* logp, typename Io<T>::Acc* lse, M map) {
  using Acc = typename Io<T>::Acc;
  const int64_t r = blockIdx.x;
  const T* x = logits + r * vocab;
  LsePair<Acc> p = lse_empty<Acc>();
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) p = lse_push(p, map.value(Io<T>::load(x[v])));
  const Acc row_lse = lse_value(block_lse(p));
  if (threadIdx.x == 0) {
    const int64_t y = targets[r];
    lse[r] = row_lse;
    logp[r] = (y >= 0 && y < vocab) ? map.value(Io<T>::load(x[y])) - row_lse : static_cast<Acc>(NAN);
  }
  if (probs != nullptr) {
    __syncthreads();  // thread 0 has read x[y] before the row is overwritten in place
    T* out = probs + r * vocab;
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
      Acc slope;
      const Acc z = map.value(Io<T>::load(x[v]), slope);
      out[v] = Io<T>::store(softmax_prob(z, row_lse) * slope);
    }
  }
}

// The element of the backward from logits: grad_r * (onehot - softmax(z)) * dz/draw, z = map(raw).
template <typename Acc, class M>
struct FromLogits {
  const int64_t* targets;
  const Acc* grad;
  const Acc* lse;
  M map;
  __device__ Acc operator()(int64_t r, int64_t v, Acc raw) const {
    Acc slope;
    const Acc z = map.value(raw, slope);
    return logit_grad(grad[r], targets[r] == v, z, lse[r], slope);
  }
};

// The element of the backward from kept probabilities q (napo_math.h kept_grad).
template <typename Acc>
struct FromKept {
  const int64_t* targets;
  const Acc* grad;
  const Acc* target_slope;
  __device__ Acc operator()(int64_t r, int64_t v, Acc q) const {
    return kept_grad(grad[r], targets[r] == v, target_slope[r], q);
  }
};

// Thread per (column, group of rows): writes grad(r, v, in) down its column and, when asked, the
// group's column sum into scratch[group, column] (summed by bias_sum_kernel).
template <typename T, class G>
__global__ void __launch_bounds__(kColThreads)
    grad_kernel(const T* in, T* out, int64_t rows, int64_t vocab, int64_t rows_per_group,
                typename Io<T>::Acc* scratch, G grad) {
  using Acc = typename Io<T>::Acc;
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= vocab) return;
  const int64_t lo = blockIdx.y * rows_per_group;
  const int64_t hi = lo + rows_per_group < rows ? lo + rows_per_group : rows;
  Acc column = 0;
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t i = r * vocab + v;
    const Acc d = grad(r, v, Io<T>::load(in[i]));
    out[i] = Io<T>::store(d);
    column += d;
  }
  if (scratch != nullptr) scratch[blockIdx.y * vocab + v] = column;
}

template <typename Acc>
__global__ void bias_sum_kernel(const Acc* scratch, int64_t groups, int64_t vocab, Acc* d_bias) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v >= vocab) return;
  Acc total = 0;
  for (int64_t g = 0; g < groups; ++g) total += scratch[g * vocab + v];
  d_bias[v] += total;
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

int64_t rows_per_group(int64_t rows) { return std::max(kRowsPerGroup, (rows + kMaxGridY - 1) / kMaxGridY); }

template <typename T>
const char* launch_logprob(const LogprobRowsArgs& a) {
  using Acc = typename Io<T>::Acc;
  if (a.rows == 0) return nullptr;
  with_logit_map<Acc>(a.spec, [&](auto map) {
    logprob_rows_kernel<T, decltype(map)>
        <<<static_cast<unsigned>(a.rows), kRowThreads, 0, static_cast<cudaStream_t>(a.stream)>>>(
            static_cast<const T*>(a.logits), static_cast<T*>(a.probs), a.vocab, a.targets,
            static_cast<Acc*>(a.logp), static_cast<Acc*>(a.lse), map);
  });
  return last_error();
}

// Both backward passes: grad_kernel over [rows, vocab], then the bias gradient's fixed-order sum.
template <typename T, class G>
const char* launch_grad(const void* in, void* out, int64_t rows, int64_t vocab, void* d_bias,
                        void* scratch_in, void* stream_in, G grad) {
  using Acc = typename Io<T>::Acc;
  if (rows == 0 || vocab == 0) return nullptr;
  const auto stream = static_cast<cudaStream_t>(stream_in);
  const int64_t per_group = rows_per_group(rows);
  const int64_t groups = (rows + per_group - 1) / per_group;
  const dim3 grid(static_cast<unsigned>((vocab + kColThreads - 1) / kColThreads),
                  static_cast<unsigned>(groups));
  Acc* scratch = d_bias != nullptr ? static_cast<Acc*>(scratch_in) : nullptr;
  grad_kernel<T, G><<<grid, kColThreads, 0, stream>>>(static_cast<const T*>(in), static_cast<T*>(out), rows,
                                                      vocab, per_group, scratch, grad);
  if (d_bias != nullptr)
    bias_sum_kernel<Acc>
        <<<grid.x, kColThreads, 0, stream>>>(scratch, groups, vocab, static_cast<Acc*>(d_bias));
  return last_error();
}

template <typename T>
const char* launch_logit_grad(const LogitGradRowsArgs& a) {
  using Acc = typename Io<T>::Acc;
  const char* error = nullptr;
  with_logit_map<Acc>(a.spec, [&](auto map) {
    const FromLogits<Acc, decltype(map)> grad{a.targets, static_cast<const Acc*>(a.grad),
                                              static_cast<const Acc*>(a.lse), map};
    error = launch_grad<T>(a.in, a.out, a.rows, a.vocab, a.d_bias, a.scratch, a.stream, grad);
  });
  return error;
}

template <typename T>
const char* launch_kept_grad(const KeptGradRowsArgs& a) {
  using Acc = typename Io<T>::Acc;
  const FromKept<Acc> grad{a.targets, static_cast<const Acc*>(a.grad),
                           static_cast<const Acc*>(a.target_slope)};
  return launch_grad<T>(a.q, a.q, a.rows, a.vocab, a.d_bias, a.scratch, a.stream, grad);
}

}  // namespace

int64_t bias_scratch_groups(int64_t rows) {
  const int64_t per_group = rows_per_group(rows);
  return (rows + per_group - 1) / per_group;
}

const char* logprob_rows(const LogprobRowsArgs& args) {
  switch (args.dtype) {
    case DType::kFloat16:
      return launch_logprob<__half>(args);
    case DType::kBFloat16:
      return launch_logprob<__nv_bfloat16>(args);
    case DType::kFloat32:
      return launch_logprob<float>(args);
    case DType::kFloat64:
      return launch_logprob<double>(args);
  }
  return "napo_C: unsupported dtype";
}

const char* kept_grad_rows(const KeptGradRowsArgs& args) {
  switch (args.dtype) {
    case DType::kFloat16:
      return launch_kept_grad<__half>(args);
    case DType::kBFloat16:
      return launch_kept_grad<__nv_bfloat16>(args);
    case DType::kFloat32:
      return launch_kept_grad<float>(args);
    case DType::kFloat64:
      return launch_kept_grad<double>(args);
  }
  return "napo_C: unsupported dtype";
}

const char* logit_grad_rows(const LogitGradRowsArgs& args) {
  switch (args.dtype) {
    case DType::kFloat16:
      return launch_logit_grad<__half>(args);
    case DType::kBFloat16:
      return launch_logit_grad<__nv_bfloat16>(args);
    case DType::kFloat32:
      return launch_logit_grad<float>(args);
    case DType::kFloat64:
      return launch_logit_grad<double>(args);
  }
  return "napo_C: unsupported dtype";
}

}  // namespace napo::cuda
