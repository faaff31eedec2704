"""Triton stage 1, fused: per-row log-probs of ``hidden @ weight^T (+ bias)`` without logits in memory.

Three kernels, each recomputing ``[BLOCK_R, BLOCK_V]`` logits tiles with ``tl.dot`` over ``H``:

- ``_forward_kernel``: one program per (row block, vocabulary split); an online log-sum-exp over
  its vocabulary tiles plus the target's logit. Splits are combined by a tiny ``[splits, R]``
  log-sum-exp in PyTorch. Recommendation batches score few rows (answer tokens only) against a
  large vocabulary, so splitting the vocabulary is what fills a GPU. With ``EXPECTED`` (the hidden
  states need a gradient) the same pass also sums ``E = softmax(z) dz/draw @ W`` against the
  running max, rescaling the row's partial when the max moves (as the CPU vocabulary tiles do): the
  logits tile is multiplied by ``W`` while it is still in registers, 2 products in all where a
  second pass over recomputed logits took 3. Each split's partial is relative to its own max; the
  splits are weighted by ``exp(max_s - lse)`` and summed in PyTorch.
- ``_hidden_kernel``: ``d_hidden = G @ W`` with ``G = g (onehot - softmax)``, one program per
  (row block, vocabulary split): only for a backward asked for ``d_hidden`` directly (the autograd
  op takes it from ``E``).
- ``_weight_kernel``: ``d_weight = G^T @ h`` and ``d_bias = colsum(G)``, one program per vocabulary
  block, looping over all row blocks.

Why two backward kernels and no atomics: each output element is owned by exactly one program
(split partials go to separate workspace slices, summed afterwards), so the sums run in a fixed order
and the result is bitwise deterministic run to run. The price is one extra recompute of the logits
when both hidden and weight gradients are needed (forward 1 + backward 4 GEMM-sized products, against
1 + 3 for an atomic-add kernel). Accumulation is float32 (float64 for float64 inputs); gradients come
back in the input dtype. ``chunk_size`` is not used: logits only ever exist as register tiles.
A scaled or soft-capped head (``logit_scale``, ``softcap``) is applied to each tile in registers
(``utils.head_logits``, the chain rule's ``dz/draw`` with it); both are compile-time constants.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .utils import (
    INTERPRET,
    acc_dtype,
    configs,
    dot_precision,
    head_constants,
    head_logits,
    require_dtype,
    require_matching,
    require_targets,
    row_major,
    sm_count,
    tl_acc,
    tl_dot_dtype,
)

# Candidates for Ampere/Hopper, all within the shared memory of sm_80 and sm_90 (`python -m
# napo_kernels.kernels.triton.aot`): for bf16/fp16, 136 of the 200 kernel x config x arch variants
# compile without register spills, the most (568 bytes) in the forward that keeps a soft-capped
# head's logits with 4 warps; autotune picks among them on the GPU. Their speed is unmeasured.
# BLOCK_* >= 16 for tl.dot.
_ROW_PROGRAM_CONFIGS = [
    triton.Config({"BLOCK_R": 64, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_R": 128, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_R": 64, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_R": 32, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=4, num_stages=3),
]
_VOCAB_PROGRAM_CONFIGS = [
    triton.Config({"BLOCK_R": 64, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_R": 128, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_R": 64, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=4, num_stages=3),
]
# Under the interpreter: small blocks, so odd test shapes span several tiles in every dimension.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_R": 16, "BLOCK_V": 32, "BLOCK_H": 16}, num_warps=4, num_stages=1)

_NOMINAL_BLOCK_R = 64  # used to size vocabulary splits before autotune picks BLOCK_R
_MIN_SPLIT_VOCAB = 1024  # no split covers fewer vocabulary columns than this
_SPLIT_WORKSPACE_BYTES = 256 << 20  # cap on the [splits, R, H] partial d_hidden workspace


@triton.jit
def _split_range(V, BLOCK_V: tl.constexpr):
    """``[lo, hi)``: the contiguous run of whole vocabulary tiles of this program's split."""
    tiles = tl.cdiv(tl.cdiv(V, BLOCK_V), tl.num_programs(1))
    lo = tl.program_id(1) * tiles * BLOCK_V
    hi = tl.minimum(V, lo + tiles * BLOCK_V)
    return lo, hi


@triton.jit
def _raw_tile(
    h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """The raw logits ``h[rows] @ W[cols]^T (+ b[cols])`` in ``ACC``: one product over ``H``."""
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=ACC)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PREC, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def _head_tile(raw, col_ok, SCALE: tl.constexpr, SOFTCAP: tl.constexpr):
    """``(z, dz/draw)`` of raw logits (``head_logits``), ``z = -inf`` in columns outside the
    vocabulary (mapped first: a cap would turn -inf into -SOFTCAP)."""
    z, slope = head_logits(raw, SCALE, SOFTCAP)
    return tl.where(col_ok[None, :], z, float("-inf")), slope


@triton.jit
def _kept_offsets(rows, cols, V):
    """Where the tile's raw logits lie in the forward's kept ``[R, V]`` buffer."""
    return rows.to(tl.int64)[:, None] * V + cols[None, :]


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, k_ptr, rows, row_ok, cols, col_ok, V, H, stride_h, stride_w,
    KEPT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """``(z, dz/draw)`` of the tile (``_head_tile``): with ``KEPT`` read from the raw logits the
    forward kept (no product), else recomputed (``_raw_tile``). The same values; the same bits
    where the forward's and the backward's launch configurations round their products alike
    (always under the interpreter, which has one)."""
    if KEPT:
        ok = row_ok[:, None] & col_ok[None, :]
        raw = tl.load(k_ptr + _kept_offsets(rows, cols, V), mask=ok, other=0.0)
    else:
        raw = _raw_tile(
            h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w,
            HAS_BIAS, ACC, DOT, PREC, BLOCK_R, BLOCK_V, BLOCK_H,
        )  # fmt: skip
    return _head_tile(raw, col_ok, SCALE, SOFTCAP)


@triton.jit
def _grad_tile(logits, slope, lse, g, target, cols):
    """``d s / d raw logits`` scaled by ``g``: ``g (onehot - p) dz/draw`` (``slope`` = dz/draw; the
    constant 1 for a plain head). Exactly 0 in padding: columns have -inf logits, rows are loaded
    with ``lse = +inf`` and ``g = 0`` (``lse = 0`` there would let ``exp(bias)`` overflow into
    ``inf * 0 = NaN`` in the GEMMs)."""
    p = tl.exp(logits - lse[:, None])
    onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    return g[:, None] * (onehot - p) * slope


@triton.autotune(
    configs=configs(_ROW_PROGRAM_CONFIGS, _INTERPRETER_CONFIG), key=["V", "H", "HAS_BIAS", "EXPECTED", "KEEP"]
)
@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, max_ptr, sum_ptr, pick_ptr, e_ptr, k_ptr, R, V, H, stride_h, stride_w,
    EXPECTED: tl.constexpr, KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    target = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    v_lo, v_hi = _split_range(V, BLOCK_V)
    run_max = tl.full((BLOCK_R,), float("-inf"), ACC)
    run_sum = tl.zeros((BLOCK_R,), ACC)
    picked = tl.zeros((BLOCK_R,), ACC)
    # EXPECTED: this split's [R, H] slice of the unnormalised E; only this program touches these rows
    e_rows = e_ptr + (tl.program_id(1) * R + rows).to(tl.int64)[:, None] * H
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        raw = _raw_tile(
            h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_h, stride_w,
            HAS_BIAS, ACC, DOT, PREC, BLOCK_R, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        if KEEP:  # for the weight gradient: the backward reads them instead of a product
            tl.store(k_ptr + _kept_offsets(rows, cols, V), raw, mask=row_ok[:, None] & col_ok[None, :])
        logits, slope = _head_tile(raw, col_ok, SCALE, SOFTCAP)
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows of only -inf logits so far
        rescale = tl.exp(run_max - shift)  # what the partials summed so far are worth now (0 at first)
        p = tl.exp(logits - shift[:, None])
        run_sum = run_sum * rescale + tl.sum(p, 1)
        run_max = new_max
        picked += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), 1)
        if EXPECTED:  # E += exp(z - max) dz/draw @ W[cols], the tile still in registers
            p = (p * slope).to(DOT)
            w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
                ok = row_ok[:, None] & k_ok[None, :]
                # the first tile overwrites instead of adding: no zero-fill, autotune reruns are harmless
                again = ok & ((ks[None, :] * 0 + v0) > v_lo)
                prev = tl.load(e_rows + ks[None, :], mask=again, other=0.0) * rescale[:, None]
                tl.store(
                    e_rows + ks[None, :], tl.dot(p, w, prev, input_precision=PREC, out_dtype=ACC), mask=ok
                )
    # an empty split (more splits than tiles) stores the neutral (-inf, 0, 0)
    out = tl.program_id(1) * R + rows
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sum_ptr + out, run_sum, mask=row_ok)
    tl.store(pick_ptr + out, picked, mask=row_ok)


@triton.autotune(
    configs=configs(_ROW_PROGRAM_CONFIGS, _INTERPRETER_CONFIG), key=["V", "H", "HAS_BIAS", "KEPT"]
)
@triton.jit
def _hidden_kernel(
    g_ptr, h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, k_ptr, out_ptr, R, V, H, stride_h, stride_w,
    KEPT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
    PREC: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
    target = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    v_lo, v_hi = _split_range(V, BLOCK_V)
    # this split's [R, H] slice of the output; only this program touches these rows
    out_rows = out_ptr + (tl.program_id(1) * R + rows).to(tl.int64)[:, None] * H
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        logits, slope = _logits_tile(
            h_ptr, w_ptr, b_ptr, k_ptr, rows, row_ok, cols, col_ok, V, H, stride_h, stride_w,
            KEPT, HAS_BIAS, ACC, DOT, PREC, SCALE, SOFTCAP, BLOCK_R, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        grad = _grad_tile(logits, slope, lse, g, target, cols).to(DOT)
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
            ok = row_ok[:, None] & k_ok[None, :]
            # the first tile overwrites instead of adding: no zero-fill, and autotune reruns are harmless
            again = ok & ((ks[None, :] * 0 + v0) > v_lo)
            prev = tl.load(out_rows + ks[None, :], mask=again, other=0.0)
            tl.store(
                out_rows + ks[None, :], tl.dot(grad, w, prev, input_precision=PREC, out_dtype=ACC), mask=ok
            )


@triton.autotune(
    configs=configs(_VOCAB_PROGRAM_CONFIGS, _INTERPRETER_CONFIG),
    key=["V", "H", "HAS_BIAS", "NEED_WEIGHT", "NEED_BIAS", "KEPT"],
)
@triton.jit
def _weight_kernel(
    g_ptr, h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, k_ptr, dw_ptr, db_ptr, R, V, H, stride_h, stride_w,
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, KEPT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    col_sum = tl.zeros((BLOCK_V,), ACC)
    dw_rows = dw_ptr + cols.to(tl.int64)[:, None] * H
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
        target = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        logits, slope = _logits_tile(
            h_ptr, w_ptr, b_ptr, k_ptr, rows, row_ok, cols, col_ok, V, H, stride_h, stride_w,
            KEPT, HAS_BIAS, ACC, DOT, PREC, SCALE, SOFTCAP, BLOCK_R, BLOCK_V, BLOCK_H,
        )  # fmt: skip
        grad = _grad_tile(logits, slope, lse, g, target, cols)
        if NEED_BIAS:
            col_sum += tl.sum(grad, 0)
        if NEED_WEIGHT:
            grad_t = tl.trans(grad.to(DOT))
            h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(DOT)
                ok = col_ok[:, None] & k_ok[None, :]
                again = ok & ((ks[None, :] * 0 + r0) > 0)
                prev = tl.load(dw_rows + ks[None, :], mask=again, other=0.0)
                tl.store(
                    dw_rows + ks[None, :],
                    tl.dot(grad_t, h, prev, input_precision=PREC, out_dtype=ACC),
                    mask=ok,
                )
    if NEED_BIAS:
        tl.store(db_ptr + cols, col_sum, mask=col_ok)


def vocab_splits(rows: int, vocab: int, hidden_size: int, device: torch.device) -> int:
    """How many programs share one row block's vocabulary sweep: enough for ~2 programs per SM,
    each split at least ``_MIN_SPLIT_VOCAB`` columns, partial sums within the workspace cap.
    Always 1 under the interpreter (each program instance costs time there)."""
    if INTERPRET or device.type != "cuda":
        return 1
    row_blocks = triton.cdiv(rows, _NOMINAL_BLOCK_R)
    want = triton.cdiv(2 * sm_count(device), row_blocks)
    fit = max(1, _SPLIT_WORKSPACE_BYTES // max(1, 4 * rows * hidden_size))
    return max(1, min(want, triton.cdiv(vocab, _MIN_SPLIT_VOCAB), fit))


def _check(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> None:
    require_dtype("hidden", hidden)
    require_matching("weight", weight, "hidden", hidden)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [R, H] and weight [V, H]; got {list(hidden.shape)} and {list(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0): no log-probability is defined")
    if bias is not None:
        require_matching("bias", bias, "weight", weight)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V={weight.shape[0]}], got {list(bias.shape)}")
    require_targets(targets, hidden.shape[0])


def _common(hidden: Tensor, bias: Tensor | None, softcap: float | None, logit_scale: float) -> dict:
    return dict(
        HAS_BIAS=bias is not None,
        ACC=tl_acc(hidden.dtype),
        DOT=tl_dot_dtype(hidden.dtype),
        PREC=dot_precision(hidden.dtype),
        **head_constants(softcap, logit_scale),
    )


def _hidden_pass(
    grad: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
    splits: int | None, softcap: float | None, logit_scale: float, kept: Tensor | None,
) -> Tensor:  # fmt: skip
    """``G @ W`` over the whole vocabulary, ``[R, H]`` in the accumulation dtype."""
    (r, h), v = hidden.shape, weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    s = splits or vocab_splits(r, v, h, hidden.device)
    # split > 1: one [R, H] partial per split (zeros: a split may own no tile), summed below
    out = hidden.new_empty((r, h), dtype=acc) if s == 1 else hidden.new_zeros((s, r, h), dtype=acc)
    grid = lambda meta: (triton.cdiv(r, meta["BLOCK_R"]), s)
    _hidden_kernel[grid](
        grad, hidden, weight, weight if bias is None else bias, targets, lse,
        lse if kept is None else kept, out, r, v, h, hidden.stride(0), weight.stride(0),
        KEPT=kept is not None, **_common(hidden, bias, softcap, logit_scale),
    )  # fmt: skip
    return out if s == 1 else out.sum(0)


def linear_logprobs_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    chunk_size: int,
    compute_expected: bool,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    splits: int | None = None,
    keep_logits: bool = False,
) -> tuple[Tensor, ...]:
    """``(logp [R], lse [R], expected [R, H] or [0])`` in the accumulation dtype (contract of
    ``torch_chunked``); ``chunk_size`` is ignored, ``splits`` overrides the vocabulary split.
    ``softcap`` / ``logit_scale`` are compile-time constants of the kernels (one compilation per
    value: a model has one). With ``keep_logits`` a fourth output: the raw logits ``[R, V]`` in the
    accumulation dtype, for ``linear_logprobs_bwd(kept=...)`` (the caller decides whether they fit
    its memory budget: ``napo_kernels.ops.linear_logprobs.keeps_logits``)."""
    _check(hidden, weight, bias, targets)
    hidden, weight, targets = row_major(hidden), row_major(weight), targets.contiguous()
    bias = None if bias is None else bias.contiguous()
    (r, h), v = hidden.shape, weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    expected = hidden.new_empty((r, h) if compute_expected else (0,), dtype=acc)
    kept = hidden.new_empty((r, v) if keep_logits else (0,), dtype=acc)
    if r == 0:
        out = hidden.new_empty(0, dtype=acc), hidden.new_empty(0, dtype=acc), expected
        return (*out, kept) if keep_logits else out
    s = splits or vocab_splits(r, v, h, hidden.device)
    run_max, run_sum, picked = (hidden.new_empty((s, r), dtype=acc) for _ in range(3))
    # E partials: [R, H] (one split) or one per split (zeros: a split may own no tile)
    partial = expected if s == 1 else hidden.new_zeros((s, r, h) if compute_expected else (0,), dtype=acc)
    grid = lambda meta: (triton.cdiv(r, meta["BLOCK_R"]), s)
    _forward_kernel[grid](
        hidden, weight, weight if bias is None else bias, targets, run_max, run_sum, picked, partial,
        kept, r, v, h, hidden.stride(0), weight.stride(0), EXPECTED=compute_expected, KEEP=keep_logits,
        **_common(hidden, bias, softcap, logit_scale),
    )  # fmt: skip
    lse = torch.logsumexp(run_max + run_sum.log(), dim=0)  # combine the splits: [splits, R] -> [R]
    # targets are trusted (no host sync to check them): one outside [0, V) picked nothing, so NaN
    logp = torch.where((targets >= 0) & (targets < v), picked.sum(0) - lse, float("nan"))
    if compute_expected:
        # each split summed exp(z - its max): worth exp(max_s - lse) of the softmax (0 for an empty one)
        weight_s = torch.where(run_max == float("-inf"), 0.0, torch.exp(run_max - lse))
        if s == 1:
            expected.mul_(weight_s[0, :, None])
        else:
            expected = torch.einsum("sr,srh->rh", weight_s, partial)
    return (logp, lse, expected, kept) if keep_logits else (logp, lse, expected)


def linear_logprobs_bwd(
    grad: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    chunk_size: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    splits: int | None = None,
    kept: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_hidden, d_weight, d_bias)`` in the input dtypes, empty ``[0]`` where not needed. With
    ``kept`` (the forward's raw logits ``[R, V]``) the kernels read the logits instead of
    recomputing them: one product fewer (the same values: see ``_logits_tile``)."""
    _check(hidden, weight, bias, targets)
    hidden, weight, targets = row_major(hidden), row_major(weight), targets.contiguous()
    bias = None if bias is None else bias.contiguous()
    (r, h), v = hidden.shape, weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    grad, lse = grad.to(acc).contiguous(), lse.to(acc).contiguous()
    if kept is not None and (kept.shape != (r, v) or kept.dtype != acc or not kept.is_contiguous()):
        raise ValueError(
            f"kept must be the forward's contiguous [R={r}, V={v}] {acc} logits, got {list(kept.shape)} "
            f"{kept.dtype}"
        )
    bias_dtype = weight.dtype if bias is None else bias.dtype
    d_hidden = hidden.new_empty(0)
    if need_hidden:
        d_hidden = (
            _hidden_pass(grad, hidden, weight, bias, targets, lse, splits, softcap, logit_scale, kept).to(
                hidden.dtype
            )
            if r
            else torch.empty_like(hidden)
        )
    d_weight, d_bias = weight.new_empty(0), weight.new_empty(0)
    if need_weight or need_bias:
        alloc = weight.new_empty if r else weight.new_zeros  # the kernel writes every element it owns
        dw = alloc((v, h) if need_weight else (0,), dtype=acc)
        db = alloc(v if need_bias else 0, dtype=acc)
        if r:  # no rows: the zero gradients stand (the kernel writes only rows it sees)
            _weight_kernel[lambda meta: (triton.cdiv(v, meta["BLOCK_V"]),)](
                grad, hidden, weight, weight if bias is None else bias, targets, lse,
                lse if kept is None else kept, dw, db, r, v, h, hidden.stride(0), weight.stride(0),
                NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, KEPT=kept is not None,
                **_common(hidden, bias, softcap, logit_scale),
            )  # fmt: skip
        if need_weight:
            d_weight = dw.to(weight.dtype)
        if need_bias:
            d_bias = db.to(bias_dtype)
    return d_hidden, d_weight, d_bias
