// CUDA implementations of the napo_C ops (compiled only in a CUDA build): the shared chunk loop
// (chunked_linear.h, GEMMs through ATen/cuBLAS) with the fused row passes of row_kernels.cu, and
// stage 2 from preference.cu. This file wraps tensors; the .cu files see raw pointers only.
// Inputs are trusted beyond their shapes and dtypes (csrc/arg_checks.h): the public API validates
// labels once; a target outside [0, V) gives its row logp = NaN on the device (no host sync).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "chunked_linear.h"
#include "cuda/launchers.h"

namespace napo {
namespace {

cuda::DType device_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "napo_C: unsupported dtype ", t);
}

void* current_stream(const at::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

void check_launch(const char* error, const char* kernel) {
  TORCH_CHECK(error == nullptr, "napo_C: CUDA kernel ", kernel, " failed to launch: ", error);
}

struct CudaPasses {
  static constexpr bool kWideHalf = false;  // fp16 logits blocks stay fp16 here (chunked_linear.h)

  static void logprob_rows(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& targets,
                           at::Tensor logp, at::Tensor lse, const LogitSpec& spec) {
    const c10::cuda::CUDAGuard guard(logits.device());
    check_launch(cuda::logprob_rows({
                     .dtype = device_dtype(logits.scalar_type()),
                     .logits = logits.const_data_ptr(),
                     .probs = probs.defined() ? probs.mutable_data_ptr() : nullptr,
                     .rows = logits.size(0),
                     .vocab = logits.size(1),
                     .targets = targets.const_data_ptr<int64_t>(),
                     .logp = logp.mutable_data_ptr(),
                     .lse = lse.mutable_data_ptr(),
                     .spec = spec,
                     .stream = current_stream(logits),
                 }),
                 "logprob_rows");
  }

  static void logit_grad_rows(const at::Tensor& in, const at::Tensor& out, const at::Tensor& targets,
                              const at::Tensor& grad, const at::Tensor& lse, const at::Tensor& d_bias,
                              const LogitSpec& spec) {
    const c10::cuda::CUDAGuard guard(in.device());
    at::Tensor scratch;
    if (d_bias.defined())  // per-group column sums, reduced in a fixed order by the second kernel
      scratch = at::empty({cuda::bias_scratch_groups(in.size(0)), in.size(1)}, d_bias.options());
    check_launch(cuda::logit_grad_rows({
                     .dtype = device_dtype(in.scalar_type()),
                     .in = in.const_data_ptr(),
                     .out = out.mutable_data_ptr(),
                     .rows = in.size(0),
                     .vocab = in.size(1),
                     .targets = targets.const_data_ptr<int64_t>(),
                     .grad = grad.const_data_ptr(),
                     .lse = lse.const_data_ptr(),
                     .d_bias = d_bias.defined() ? d_bias.mutable_data_ptr() : nullptr,
                     .scratch = scratch.defined() ? scratch.mutable_data_ptr() : nullptr,
                     .spec = spec,
                     .stream = current_stream(in),
                 }),
                 "logit_grad_rows");
  }

  static void kept_grad_rows(const at::Tensor& q, const at::Tensor& targets, const at::Tensor& grad,
                             const at::Tensor& target_slope, const at::Tensor& d_bias) {
    const c10::cuda::CUDAGuard guard(q.device());
    at::Tensor scratch;
    if (d_bias.defined())
      scratch = at::empty({cuda::bias_scratch_groups(q.size(0)), q.size(1)}, d_bias.options());
    check_launch(cuda::kept_grad_rows({
                     .dtype = device_dtype(q.scalar_type()),
                     .q = q.mutable_data_ptr(),
                     .rows = q.size(0),
                     .vocab = q.size(1),
                     .targets = targets.const_data_ptr<int64_t>(),
                     .grad = grad.const_data_ptr(),
                     .target_slope = target_slope.const_data_ptr(),
                     .d_bias = d_bias.defined() ? d_bias.mutable_data_ptr() : nullptr,
                     .scratch = scratch.defined() ? scratch.mutable_data_ptr() : nullptr,
                     .stream = current_stream(q),
                 }),
                 "kept_grad_rows");
  }
};

std::tuple<at::Tensor, at::Tensor> preference_fwd(const at::Tensor& chosen_in, const at::Tensor& rejected_in,
                                                  const at::Tensor& select_in, const at::Tensor& coef_in,
                                                  const at::Tensor& margin_in, int64_t agg) {
  check_preference(chosen_in, rejected_in, select_in, coef_in, margin_in, agg);
  const c10::cuda::CUDAGuard guard(chosen_in.device());
  const at::Tensor chosen = chosen_in.contiguous(), rejected = rejected_in.contiguous();
  const at::Tensor select = select_in.contiguous(), coef = coef_in.contiguous(),
                   margin = margin_in.contiguous();
  const int64_t batch = chosen.size(0), pool = rejected.size(0);
  at::Tensor rows = at::empty({batch}, chosen.options());
  at::Tensor weights = at::empty({batch, pool}, chosen.options());
  check_launch(cuda::preference_rows({
                   .dtype = device_dtype(chosen.scalar_type()),
                   .chosen = chosen.const_data_ptr(),
                   .rejected = rejected.const_data_ptr(),
                   .select = select.const_data_ptr<bool>(),
                   .coef = coef.const_data_ptr(),
                   .margin = margin.const_data_ptr(),
                   .batch = batch,
                   .pool = pool,
                   .agg = static_cast<int>(agg),
                   .loss_rows = rows.mutable_data_ptr(),
                   .weights = weights.mutable_data_ptr(),
                   .stream = current_stream(chosen),
               }),
               "preference_rows");
  return {rows, weights};
}

}  // namespace
}  // namespace napo

TORCH_LIBRARY_IMPL(napo_C, CUDA, m) {
  m.impl("linear_logprobs_fwd", &napo::linear_logprobs_fwd<napo::CudaPasses>);
  m.impl("linear_logprobs_bwd", &napo::linear_logprobs_bwd<napo::CudaPasses>);
  m.impl("logits_logprobs_fwd", &napo::logits_logprobs_fwd<napo::CudaPasses>);
  m.impl("logits_logprobs_bwd", &napo::logits_logprobs_bwd<napo::CudaPasses>);
  m.impl("preference_fwd", &napo::preference_fwd);
}
