// CPU implementations of the napo_C ops: stage 1 as vocabulary-tiled blocks (cpu/tiled_linear.h)
// or, when one tile spans the vocabulary, the chunk loop shared with CUDA (chunked_linear.h), both
// with the OpenMP row passes of row_kernels.cpp; and stage 2.
// Inputs are trusted beyond their shapes and dtypes (csrc/arg_checks.h): the public API validates
// labels once. The one guard on target values is in the row passes, for memory safety.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "chunked_linear.h"
#include "cpu/row_kernels.h"
#include "cpu/tiled_linear.h"

namespace napo {
namespace {

using cpu::team_size;  // torch's intra-op thread count, 1 inside a parallel region

// Calls fn with the storage format (csrc/cpu/formats.h) of a float dtype: fp16/bf16 go to the row
// loops as raw 16-bit patterns.
template <typename Fn>
void with_format(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat:
      return fn(cpu::Float32{});
    case at::kDouble:
      return fn(cpu::Float64{});
    case at::kHalf:
      return fn(cpu::Float16{});
    case at::kBFloat16:
      return fn(cpu::BFloat16{});
    default:
      TORCH_CHECK_TYPE(false, "napo_C: unsupported dtype ", t);
  }
}

struct CpuPasses {
  static constexpr bool kWideHalf = true;  // fp16 products and logits in fp32 (chunked_linear.h)

  static void logprob_rows(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& targets,
                           at::Tensor logp, at::Tensor lse, const LogitSpec& spec) {
    with_format(logits.scalar_type(), [&](auto format) {
      using F = decltype(format);
      using T = typename F::storage;
      using Acc = typename F::acc;
      cpu::logprob_rows<F>(static_cast<const T*>(logits.const_data_ptr()),
                           probs.defined() ? static_cast<T*>(probs.mutable_data_ptr()) : nullptr,
                           logits.size(0), logits.size(1), targets.const_data_ptr<int64_t>(),
                           logp.mutable_data_ptr<Acc>(), lse.mutable_data_ptr<Acc>(), spec, team_size());
    });
  }

  static void logprob_tile_rows(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& targets,
                                int64_t offset, at::Tensor run_max, at::Tensor run_sum,
                                at::Tensor target_logit, at::Tensor scale, const LogitSpec& spec) {
    with_format(logits.scalar_type(), [&](auto format) {
      using F = decltype(format);
      using T = typename F::storage;
      using Acc = typename F::acc;
      cpu::logprob_tile_rows<F>(static_cast<const T*>(logits.const_data_ptr()),
                                probs.defined() ? static_cast<T*>(probs.mutable_data_ptr()) : nullptr,
                                logits.size(0), logits.size(1), offset, targets.const_data_ptr<int64_t>(),
                                run_max.mutable_data_ptr<Acc>(), run_sum.mutable_data_ptr<Acc>(),
                                target_logit.mutable_data_ptr<Acc>(), scale.mutable_data_ptr<Acc>(), spec,
                                team_size());
    });
  }

  // rows[r, :] *= scale[r] where scale[r] != 1 (a running max moved: rare after the first tiles)
  static void rescale_rows(at::Tensor rows, const at::Tensor& scale) {
    AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "napo_rescale_rows", [&] {
      const scalar_t* s = scale.const_data_ptr<scalar_t>();
      scalar_t* x = rows.mutable_data_ptr<scalar_t>();
      const int64_t n = rows.size(0), width = rows.size(1), stride = rows.stride(0);
      for (int64_t r = 0; r < n; ++r)
        if (s[r] != scalar_t(1))
          for (int64_t j = 0; j < width; ++j) x[r * stride + j] *= s[r];
    });
  }

  static void kept_grad_rows(const at::Tensor& q, const at::Tensor& targets, const at::Tensor& grad,
                             const at::Tensor& target_slope, const at::Tensor& d_bias) {
    with_format(q.scalar_type(), [&](auto format) {
      using F = decltype(format);
      using T = typename F::storage;
      using Acc = typename F::acc;
      cpu::kept_grad_rows<F>(static_cast<T*>(q.mutable_data_ptr()), q.size(0), q.size(1),
                             targets.const_data_ptr<int64_t>(), grad.const_data_ptr<Acc>(),
                             target_slope.const_data_ptr<Acc>(),
                             d_bias.defined() ? d_bias.mutable_data_ptr<Acc>() : nullptr, team_size());
    });
  }

  // `offset`: the vocabulary entry of column 0 (a tile's start; 0 for whole rows)
  static void logit_grad_rows(const at::Tensor& in, const at::Tensor& out, const at::Tensor& targets,
                              const at::Tensor& grad, const at::Tensor& lse, const at::Tensor& d_bias,
                              const LogitSpec& spec, int64_t offset = 0) {
    with_format(in.scalar_type(), [&](auto format) {
      using F = decltype(format);
      using T = typename F::storage;
      using Acc = typename F::acc;
      cpu::logit_grad_rows<F>(static_cast<const T*>(in.const_data_ptr()),
                              static_cast<T*>(out.mutable_data_ptr()), in.size(0), in.size(1), offset,
                              targets.const_data_ptr<int64_t>(), grad.const_data_ptr<Acc>(),
                              lse.const_data_ptr<Acc>(),
                              d_bias.defined() ? d_bias.mutable_data_ptr<Acc>() : nullptr, spec, team_size());
    });
  }
};

// Stage 1 entry points: vocabulary tiles when the vocabulary is wider than one tile or the logits
// are kept (cpu/tiled_linear.h: in the weight gradient's memory, when rows <= H and the products run
// in the accumulation dtype, i.e. not bf16).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, int64_t chunk_size, bool compute_expected, std::optional<double> softcap,
    double logit_scale, bool keep_logits) {
  const char* op = "napo_C::linear_logprobs_fwd";
  check_linear(op, hidden, weight, bias, targets, chunk_size);
  const LogitSpec spec = logit_spec(op, softcap, logit_scale);
  const cpu::TilePlan plan = cpu::plan_tiles(hidden.size(0), weight.size(0), chunk_size);
  if (!plan.tiled && !keep_logits)
    return linear_logprobs_fwd<CpuPasses>(hidden, weight, bias, targets, chunk_size, compute_expected,
                                          softcap, logit_scale, false);
  const auto acc = hidden.options().dtype(acc_type(hidden.scalar_type()));
  if (keep_logits) {
    TORCH_CHECK_VALUE(
        hidden.size(0) <= hidden.size(1), op, ": keep_logits needs rows <= H (the logits then fit ",
        "the weight gradient's memory), got ", hidden.size(0), " rows and H = ", hidden.size(1));
    TORCH_CHECK_VALUE(hidden.scalar_type() != at::kBFloat16, op,
                      ": keep_logits: bf16 logits are not kept (its products do not run in fp32)");
    TORCH_CHECK_VALUE(hidden.size(0) * plan.width <= chunk_size * weight.size(0), op,
                      ": keep_logits: the backward's scratch (all rows of one vocabulary tile) exceeds the [",
                      chunk_size, ", V] budget");
  }
  at::Tensor kept = keep_logits ? at::empty(weight.sizes(), acc) : at::empty({0}, acc);
  auto [logp, lse, expected] = cpu::tiled_linear_fwd<CpuPasses>(
      hidden, weight, bias, targets, plan, compute_expected, spec, keep_logits ? kept : at::Tensor());
  return {logp, lse, expected, kept};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& lse,
    int64_t chunk_size, bool need_hidden, bool need_weight, bool need_bias, std::optional<double> softcap,
    double logit_scale, const std::optional<at::Tensor>& kept) {
  const char* op = "napo_C::linear_logprobs_bwd";
  check_linear(op, hidden, weight, bias, targets, chunk_size);
  check_row_vector(op, "grad", grad, hidden);
  check_row_vector(op, "lse", lse, hidden);
  const bool keep = check_kept(op, kept, hidden, weight);
  const LogitSpec spec = logit_spec(op, softcap, logit_scale);
  const cpu::TilePlan plan = cpu::plan_tiles(hidden.size(0), weight.size(0), chunk_size);
  if (!plan.tiled && !keep)
    return linear_logprobs_bwd<CpuPasses>(grad, hidden, weight, bias, targets, lse, chunk_size, need_hidden,
                                          need_weight, need_bias, softcap, logit_scale, std::nullopt);
  return cpu::tiled_linear_bwd<CpuPasses>(grad, hidden, weight, bias, targets, lse, plan, need_hidden,
                                          need_weight, need_bias, spec, keep ? *kept : at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> preference_fwd(const at::Tensor& chosen_in, const at::Tensor& rejected_in,
                                                  const at::Tensor& select_in, const at::Tensor& coef_in,
                                                  const at::Tensor& margin_in, int64_t agg) {
  check_preference(chosen_in, rejected_in, select_in, coef_in, margin_in, agg);
  const at::Tensor chosen = chosen_in.contiguous(), rejected = rejected_in.contiguous();
  const at::Tensor select = select_in.contiguous(), coef = coef_in.contiguous(),
                   margin = margin_in.contiguous();
  const int64_t batch = chosen.size(0), pool = rejected.size(0);
  at::Tensor rows = at::empty({batch}, chosen.options());
  at::Tensor weights = at::empty({batch, pool}, chosen.options());
  int64_t empty_row = -1;
  AT_DISPATCH_FLOATING_TYPES(chosen.scalar_type(), "napo_preference_rows", [&] {
    empty_row = cpu::preference_rows<scalar_t>(
        chosen.const_data_ptr<scalar_t>(), rejected.const_data_ptr<scalar_t>(), select.const_data_ptr<bool>(),
        coef.const_data_ptr<scalar_t>(), margin.const_data_ptr<scalar_t>(), batch, pool,
        static_cast<int>(agg), rows.mutable_data_ptr<scalar_t>(), weights.mutable_data_ptr<scalar_t>(),
        team_size());
  });
  TORCH_CHECK_VALUE(empty_row < 0, "napo_C::preference_fwd: prompt ", empty_row,
                    " has no selected negative (select[", empty_row,
                    "] is all False), so its loss is undefined");
  return {rows, weights};
}

}  // namespace
}  // namespace napo

TORCH_LIBRARY_IMPL(napo_C, CPU, m) {
  m.impl("linear_logprobs_fwd", &napo::linear_logprobs_fwd_cpu);
  m.impl("linear_logprobs_bwd", &napo::linear_logprobs_bwd_cpu);
  m.impl("logits_logprobs_fwd", &napo::logits_logprobs_fwd<napo::CpuPasses>);
  m.impl("logits_logprobs_bwd", &napo::logits_logprobs_bwd<napo::CpuPasses>);
  m.impl("preference_fwd", &napo::preference_fwd);
  // the CUDA build's chunk loop with the CPU passes (its kept path included), for the tests
  m.impl("_chunked_linear_logprobs_fwd", &napo::linear_logprobs_fwd<napo::CpuPasses>);
  m.impl("_chunked_linear_logprobs_bwd", &napo::linear_logprobs_bwd<napo::CpuPasses>);
}
