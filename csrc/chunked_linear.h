// The device-independent part of stage 1: the chunk loop and its GEMMs (ATen: MKL/oneDNN on CPU,
// cuBLAS on CUDA). Each device supplies its fused per-row passes as a `Passes` policy:
//
//   Passes::logprob_rows(logits [n, V], probs [n, V] or undefined, targets, logp, lse, spec)
//   Passes::logit_grad_rows(in [n, V], out [n, V], targets, grad, lse, d_bias or undefined, spec)
//   Passes::kept_grad_rows(q [n, V] in place, targets, grad, target_slope [n], d_bias or undefined)
//
// (contracts as in csrc/cpu/row_kernels.h: the GEMMs write raw logits, the passes map them to the
// head's logits of `spec`, scale and soft cap). The CPU build instantiates it with the CPU passes, so
// the CPU tests also cover the loop the CUDA build runs. Targets are trusted (arg_checks.h).
//
// fp16 holds at most 65504: where `Passes::kWideHalf` (the CPU), fp16 operands are converted to fp32
// and the logits block and every product run in fp32, as the Triton kernels keep their tiles (an
// fp16 GEMM output overflows to inf beyond 65504). bf16 has fp32's range and stays bf16. The CUDA
// passes keep fp16 blocks for now (cuBLAS would need an fp32-output product and fp16 copies of the
// probabilities).
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <tuple>

#include "arg_checks.h"

namespace napo {

// Whether fp16 inputs run their products and logits in fp32 (see above).
template <class Passes>
bool wide_half(const at::Tensor& hidden) {
  return Passes::kWideHalf && hidden.scalar_type() == at::kHalf;
}

// An operand of the products: converted to fp32 for a wide fp16 problem, else x itself.
inline at::Tensor operand(const at::Tensor& x, bool wide) { return wide ? x.to(at::kFloat) : x; }
inline std::optional<at::Tensor> operand(const std::optional<at::Tensor>& x, bool wide) {
  return x.has_value() ? std::optional<at::Tensor>(operand(*x, wide)) : std::nullopt;
}

// logits = hidden @ weight^T (+ bias), in the operands' dtype, written into `out`.
inline void chunk_logits(at::Tensor& out, const at::Tensor& hidden, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  if (bias.has_value())
    at::addmm_out(out, *bias, hidden, weight.t());
  else
    at::mm_out(out, hidden, weight.t());
}

// c_r = dz/draw at each row's target in the accumulation dtype: the head's scale, with a soft cap
// scale / cosh^2(scale raw_y / cap) from the target's raw logit raw_y = h_r . W[y_r] + b[y_r] (one
// dot product per row; 1 / cosh^2 keeps its precision where tanh saturates). NaN for a target
// outside [0, V).
inline at::Tensor target_slope(const at::Tensor& hidden, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                               const LogitSpec& spec) {
  const auto acc = hidden.options().dtype(acc_type(hidden.scalar_type()));
  const int64_t vocab = weight.size(0);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (vocab == 0) return at::full({hidden.size(0)}, nan, acc);
  at::Tensor slope;
  if (spec.cap > 0) {
    const at::Tensor safe = targets.clamp(0, vocab - 1);
    at::Tensor raw = (hidden.to(acc.dtype()) * weight.index_select(0, safe).to(acc.dtype())).sum(1);
    if (bias.has_value()) raw = raw + bias->index_select(0, safe).to(acc.dtype());
    slope = at::cosh(raw * (spec.scale / spec.cap)).square().reciprocal() * spec.scale;
  } else {
    slope = at::full({hidden.size(0)}, spec.scale, acc);
  }
  return at::where(targets.ge(0).logical_and(targets.lt(vocab)), slope, nan);
}

// The forward's outputs in the accumulation type: logp [rows], lse [rows] and, for a frozen head,
// expected [rows, H] (else an empty [0]).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_fwd_outputs(const at::Tensor& hidden,
                                                                         bool compute_expected) {
  const int64_t rows = hidden.size(0);
  const auto acc = hidden.options().dtype(acc_type(hidden.scalar_type()));
  return {at::empty({rows}, acc), at::empty({rows}, acc),
          compute_expected ? at::empty({rows, hidden.size(1)}, acc) : at::empty({0}, acc)};
}

// The backward's outputs, allocated before the chunk loop: empty [0] tensors for what is not
// needed. fp32/fp64: the weight gradient accumulates in place (the first chunk writes it, no zero
// fill); fp16/bf16: in an fp32 buffer, each chunk's product rounded once (as the torch backend).
// The bias gradient is summed in the accumulation type.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_grads_begin(const at::Tensor& hidden,
                                                                         const at::Tensor& weight,
                                                                         bool need_hidden, bool need_weight,
                                                                         bool need_bias) {
  const auto acc = hidden.options().dtype(acc_type(hidden.scalar_type()));
  const bool acc_is_input = acc.dtype() == hidden.dtype();
  at::Tensor d_hidden =
      need_hidden ? at::empty(hidden.sizes(), hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor d_weight = !need_weight   ? at::empty({0}, weight.options())
                        : acc_is_input ? at::empty(weight.sizes(), weight.options())
                                       : at::zeros(weight.sizes(), acc);
  at::Tensor d_bias = need_bias ? at::zeros({weight.size(0)}, acc) : at::empty({0}, weight.options());
  if (need_weight && acc_is_input && hidden.size(0) == 0) d_weight.zero_();
  return {d_hidden, d_weight, d_bias};
}

// The accumulators of linear_grads_begin rounded to the parameters' dtypes.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_grads_end(
    const at::Tensor& d_hidden, at::Tensor d_weight, at::Tensor d_bias, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias) {
  if (d_weight.scalar_type() != weight.scalar_type()) d_weight = d_weight.to(weight.scalar_type());
  const auto bias_type = bias.has_value() ? bias->scalar_type() : weight.scalar_type();
  if (d_bias.scalar_type() != bias_type) d_bias = d_bias.to(bias_type);
  return {d_hidden, d_weight, d_bias};
}

// keep_logits (a trainable head whose rows fit one chunk, rows <= chunk_size): the chunk's block comes
// back as `kept`, holding softmax * dz/draw (computed with or without E), and the backward turns it
// into the logits' gradient in place (Passes::kept_grad_rows, no exp): no product recomputes the
// logits, 3 per step instead of 4, for a block that lives from the forward to the backward. This is
// the CUDA build's kept path (within the [chunk_size, V] budget; the block is in the products'
// dtype); the CPU keeps raw logits in the weight gradient's memory instead (cpu/tiled_linear.h) and
// runs this one only through the test ops napo_C::_chunked_linear_logprobs_fwd / _bwd.
template <class Passes>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets_in, int64_t chunk_size, bool compute_expected, std::optional<double> softcap,
    double logit_scale, bool keep_logits) {
  check_linear("napo_C::linear_logprobs_fwd", hidden, weight, bias, targets_in, chunk_size);
  TORCH_CHECK_VALUE(
      !keep_logits || hidden.size(0) <= chunk_size,
      "napo_C::linear_logprobs_fwd: keep_logits needs every row in one chunk (rows <= chunk_size), "
      "got ",
      hidden.size(0), " rows and chunk_size ", chunk_size);
  const LogitSpec spec = logit_spec("napo_C::linear_logprobs_fwd", softcap, logit_scale);
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  const auto acc = hidden.options().dtype(acc_type(hidden.scalar_type()));
  const at::Tensor targets = targets_in.contiguous();
  auto [logp, lse, expected] = linear_fwd_outputs(hidden, compute_expected);
  // One [chunk, V] block in the products' dtype is reused by every chunk (and becomes the softmax).
  // Wide fp16: the weight converted once (the CPU takes this loop only when V fits one tile).
  const bool wide = wide_half<Passes>(hidden);
  const auto block_options = hidden.options().dtype(wide ? at::kFloat : hidden.scalar_type());
  const at::Tensor kept = keep_logits ? at::empty({0, vocab}, block_options) : at::empty({0}, acc);
  if (rows == 0) return {logp, lse, expected, kept};
  const at::Tensor w = operand(weight, wide);
  const std::optional<at::Tensor> b = operand(bias, wide);
  at::Tensor block = at::empty({std::min(chunk_size, rows), vocab}, w.options());
  const bool acc_is_input = acc.dtype() == w.dtype();
  for (int64_t lo = 0; lo < rows; lo += chunk_size) {
    const int64_t n = std::min(chunk_size, rows - lo);
    at::Tensor logits = block.narrow(0, 0, n);
    chunk_logits(logits, operand(hidden.narrow(0, lo, n), wide), w, b);
    Passes::logprob_rows(logits, compute_expected || keep_logits ? logits : at::Tensor(),
                         targets.narrow(0, lo, n), logp.narrow(0, lo, n), lse.narrow(0, lo, n), spec);
    if (compute_expected) {
      at::Tensor out = expected.narrow(0, lo, n);
      if (acc_is_input)
        at::mm_out(out, logits, w);
      else  // bf16: the GEMM runs in the input dtype (as the torch backend), stored in fp32
        out.copy_(at::mm(logits, w));
    }
  }
  return {logp, lse, expected, keep_logits ? block : kept};
}

template <class Passes>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_bwd(
    const at::Tensor& grad_in, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets_in, const at::Tensor& lse_in,
    int64_t chunk_size, bool need_hidden, bool need_weight, bool need_bias, std::optional<double> softcap,
    double logit_scale, const std::optional<at::Tensor>& kept) {
  const char* op = "napo_C::linear_logprobs_bwd";
  check_linear(op, hidden, weight, bias, targets_in, chunk_size);
  const LogitSpec spec = logit_spec(op, softcap, logit_scale);
  check_row_vector(op, "grad", grad_in, hidden);
  check_row_vector(op, "lse", lse_in, hidden);
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  const auto acc = hidden.options().dtype(acc_type(hidden.scalar_type()));
  const at::Tensor targets = targets_in.contiguous(), grad = grad_in.contiguous(), lse = lse_in.contiguous();
  const bool wide = wide_half<Passes>(hidden);
  const at::Tensor w = operand(weight, wide);
  const std::optional<at::Tensor> b = operand(bias, wide);
  const bool acc_is_input = acc.dtype() == w.dtype();  // the products run in the accumulation dtype
  const bool keep = kept.has_value();
  if (keep)
    TORCH_CHECK_VALUE(kept->dim() == 2 && kept->size(0) == rows && kept->size(1) == vocab &&
                          kept->scalar_type() == w.scalar_type() && kept->device() == hidden.device() &&
                          kept->is_contiguous(),
                      op, ": kept must be the forward's contiguous [", rows, ", ", vocab, "] ",
                      w.scalar_type(), " block of probabilities, got ", kept->sizes(), " ",
                      kept->scalar_type());

  auto [d_hidden, d_weight, d_bias] = linear_grads_begin(hidden, weight, need_hidden, need_weight, need_bias);

  if (rows > 0 && (need_hidden || need_weight || need_bias)) {
    // kept: one chunk of every row, the forward's probabilities (consumed: they become the gradient)
    const int64_t step = keep ? rows : chunk_size;
    at::Tensor block = keep ? *kept : at::empty({std::min(chunk_size, rows), vocab}, w.options());
    const at::Tensor slope = keep ? target_slope(hidden, weight, bias, targets, spec) : at::Tensor();
    for (int64_t lo = 0; lo < rows; lo += step) {
      const int64_t n = std::min(step, rows - lo);
      const at::Tensor h = operand(hidden.narrow(0, lo, n), wide);
      at::Tensor g = block.narrow(0, 0, n);
      // in place: the chunk becomes grad_r * (onehot - softmax) * dz/draw, the bias gradient is summed
      if (keep) {
        Passes::kept_grad_rows(g, targets, grad, slope, need_bias ? d_bias : at::Tensor());
      } else {
        chunk_logits(g, h, w, b);
        Passes::logit_grad_rows(g, g, targets.narrow(0, lo, n), grad.narrow(0, lo, n), lse.narrow(0, lo, n),
                                need_bias ? d_bias : at::Tensor(), spec);
      }
      if (need_hidden) {
        at::Tensor out = d_hidden.narrow(0, lo, n);
        if (wide)
          out.copy_(at::mm(g, w));  // rounded to fp16 once
        else
          at::mm_out(out, g, w);
      }
      if (need_weight) {
        if (!acc_is_input)
          d_weight.add_(at::mm(g.t(), h));
        else if (lo == 0 && !wide)  // fp32/fp64: the first chunk writes it (wide fp16: zero-filled)
          at::mm_out(d_weight, g.t(), h);
        else
          d_weight.addmm_(g.t(), h);
      }
    }
  }
  return linear_grads_end(d_hidden, d_weight, d_bias, weight, bias);
}

template <class Passes>
std::tuple<at::Tensor, at::Tensor> logits_logprobs_fwd(const at::Tensor& logits_in,
                                                       const at::Tensor& targets_in) {
  check_logits("napo_C::logits_logprobs_fwd", logits_in, targets_in);
  const at::Tensor logits = logits_in.contiguous(), targets = targets_in.contiguous();
  const auto acc = logits.options().dtype(acc_type(logits.scalar_type()));
  at::Tensor logp = at::empty({logits.size(0)}, acc), lse = at::empty({logits.size(0)}, acc);
  if (logits.size(0) > 0) Passes::logprob_rows(logits, at::Tensor(), targets, logp, lse, LogitSpec{});
  return {logp, lse};
}

template <class Passes>
at::Tensor logits_logprobs_bwd(const at::Tensor& grad_in, const at::Tensor& logits_in,
                               const at::Tensor& targets_in, const at::Tensor& lse_in) {
  const char* op = "napo_C::logits_logprobs_bwd";
  check_logits(op, logits_in, targets_in);
  check_row_vector(op, "grad", grad_in, logits_in);
  check_row_vector(op, "lse", lse_in, logits_in);
  const at::Tensor logits = logits_in.contiguous(), targets = targets_in.contiguous();
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  if (logits.numel() > 0)
    Passes::logit_grad_rows(logits, out, targets, grad_in.contiguous(), lse_in.contiguous(), at::Tensor(),
                            LogitSpec{});
  return out;
}

}  // namespace napo
