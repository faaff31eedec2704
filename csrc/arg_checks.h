// Argument validation shared by the CPU and CUDA implementations of the napo_C ops: bad input
// raises ValueError / TypeError naming the argument, never yields a silently wrong number.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <vector>

#include "napo_math.h"

namespace napo {

// fp64 accumulates in fp64, every other float dtype in fp32 (as kernels/torch_chunked.py).
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_float(const char* op, const char* name, const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble, op, ": ",
                   name, " must be float16, bfloat16, float32 or float64, got ", t);
}

inline void check_device(const char* op, const char* name, const at::Tensor& x, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(x.device() == ref.device(), op, ": ", name, " is on ", x.device(),
                    " but the first input is on ", ref.device());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& x, at::ScalarType want) {
  TORCH_CHECK_TYPE(x.scalar_type() == want, op, ": ", name, " must have dtype ", want, ", got ",
                   x.scalar_type());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& x, at::IntArrayRef want) {
  TORCH_CHECK_VALUE(x.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", x.sizes());
}

// targets: int64 [rows], same device as the data. Their values are trusted, not checked: the public
// API (napo_kernels.sequence_logprobs / napo_loss) validates labels once, naming the sequence. The
// row passes never read outside a row: an out-of-range target gives that row logp = NaN.
inline void check_targets(const char* op, const at::Tensor& targets, const at::Tensor& ref, int64_t rows) {
  check_device(op, "targets", targets, ref);
  check_dtype(op, "targets", targets, at::kLong);
  check_shape(op, "targets", targets, {rows});
}

// Stage 1 from hidden states: hidden [R, H], weight [V, H], bias [V] (all one float dtype).
inline void check_linear(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                         int64_t chunk_size) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, op, ": hidden must be [R, H], got ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [V, H], got ", weight.sizes());
  TORCH_CHECK_VALUE(hidden.size(1) == weight.size(1), op, ": hidden is ", hidden.sizes(), " but weight is ",
                    weight.sizes(), " (the H dimensions differ)");
  check_float(op, "hidden", hidden);
  check_dtype(op, "weight", weight, hidden.scalar_type());
  check_device(op, "weight", weight, hidden);
  if (bias.has_value()) {
    check_dtype(op, "bias", *bias, hidden.scalar_type());
    check_device(op, "bias", *bias, hidden);
    check_shape(op, "bias", *bias, {weight.size(0)});
  }
  check_targets(op, targets, hidden, hidden.size(0));
  TORCH_CHECK_VALUE(chunk_size >= 1, op, ": chunk_size must be >= 1, got ", chunk_size);
}

// The head's logit map (napo_math.h) from the ops' softcap (None or > 0) and logit_scale (> 0).
inline LogitSpec logit_spec(const char* op, std::optional<double> softcap, double logit_scale) {
  TORCH_CHECK_VALUE(std::isfinite(logit_scale) && logit_scale > 0, op,
                    ": logit_scale must be finite and > 0, got ", logit_scale);
  TORCH_CHECK_VALUE(!softcap.has_value() || (std::isfinite(*softcap) && *softcap > 0), op,
                    ": softcap must be None or finite and > 0, got ", softcap.value_or(0.0));
  return {logit_scale, softcap.value_or(0.0)};
}

// The forward's kept logits (csrc/cpu/tiled_linear.h): None, or [V, H] in the accumulation dtype.
inline bool check_kept(const char* op, const std::optional<at::Tensor>& kept, const at::Tensor& hidden,
                       const at::Tensor& weight) {
  if (!kept.has_value()) return false;
  check_device(op, "kept", *kept, hidden);
  check_dtype(op, "kept", *kept, acc_type(hidden.scalar_type()));
  check_shape(op, "kept", *kept, weight.sizes());
  TORCH_CHECK_VALUE(kept->is_contiguous(), op, ": kept must be contiguous");
  return true;
}

// Stage 1 from logits: logits [R, V].
inline void check_logits(const char* op, const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be [R, V], got ", logits.sizes());
  check_float(op, "logits", logits);
  check_targets(op, targets, logits, logits.size(0));
}

// A per-row accumulation-dtype vector of the backward (grad, lse): [R] in acc dtype.
inline void check_row_vector(const char* op, const char* name, const at::Tensor& x, const at::Tensor& ref) {
  check_device(op, name, x, ref);
  check_dtype(op, name, x, acc_type(ref.scalar_type()));
  check_shape(op, name, x, {ref.size(0)});
}

// Stage 2: chosen [B], rejected [M], select bool [B, M], coef and margin [B, M], all float32 or
// all float64 (the accumulation dtype), agg 0 (LSE) or 1 (mean).
inline void check_preference(const at::Tensor& chosen, const at::Tensor& rejected, const at::Tensor& select,
                             const at::Tensor& coef, const at::Tensor& margin, int64_t agg) {
  const char* op = "napo_C::preference_fwd";
  TORCH_CHECK_VALUE(chosen.dim() == 1, op, ": chosen must be [B], got ", chosen.sizes());
  TORCH_CHECK_VALUE(rejected.dim() == 1, op, ": rejected must be [M], got ", rejected.sizes());
  TORCH_CHECK_TYPE(chosen.scalar_type() == at::kFloat || chosen.scalar_type() == at::kDouble, op,
                   ": chosen must be float32 or float64 (the accumulation dtype), got ",
                   chosen.scalar_type());
  const std::vector<int64_t> bm{chosen.size(0), rejected.size(0)};
  check_dtype(op, "rejected", rejected, chosen.scalar_type());
  check_dtype(op, "select", select, at::kBool);
  check_dtype(op, "coef", coef, chosen.scalar_type());
  check_dtype(op, "margin", margin, chosen.scalar_type());
  check_shape(op, "select", select, bm);
  check_shape(op, "coef", coef, bm);
  check_shape(op, "margin", margin, bm);
  check_device(op, "rejected", rejected, chosen);
  check_device(op, "select", select, chosen);
  check_device(op, "coef", coef, chosen);
  check_device(op, "margin", margin, chosen);
  TORCH_CHECK_VALUE(agg == 0 || agg == 1, op, ": agg must be 0 (log-sum-exp) or 1 (mean), got ", agg);
}

}  // namespace napo
