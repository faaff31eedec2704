"""Who is measured: every way a user could compute the same loss, forward + backward.

Each contender turns the canonical :class:`~benchmarks.cases.Inputs` into a :class:`Prepared` step.
Everything a contender needs before the step (its own input layout, an import, a compiled
function object) is done in ``prepare``, outside the measured region; the step itself runs the
forward and the backward and leaves the gradients in ``.grad``. All contenders compute the same
loss: stage 1 gives one score per candidate, and the loss on top of the scores comes from
``napo_kernels.reference`` (the ground truth) for every contender but napo-kernels itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import napo_kernels
from napo_kernels import dispatch, reference
from napo_kernels.constants import IGNORE_INDEX
from napo_kernels.ops.linear_logprobs import keeps_logits

from .cases import DTYPES, Inputs, Shape

BASELINES = ("plain", "sliced", "compile", "liger", "cce")
LABELS = {
    "plain": "plain PyTorch, all positions (TRL)",
    "sliced": "plain PyTorch, scored rows only",
    "compile": "torch.compile(plain)",
    "liger": "Liger-Kernel LigerFusedLinearDPOLoss",
    "cce": "Cut Cross-Entropy linear_cross_entropy",
    "bare": "bare GEMMs (hardware limit)",
}


class NotApplicable(Exception):
    """The contender cannot compute this loss (or is not installed); the message says why."""


@dataclass
class Prepared:
    """A ready-to-run step. ``run()`` does forward + backward and returns the detached loss;
    ``grads()`` gives the gradients of the canonical inputs after a run; ``reset()`` drops them."""

    run: Callable[[], Tensor]
    grads: Callable[[], dict[str, Tensor]]
    reset: Callable[[], None]
    note: str = ""
    leaves: list[Tensor] = field(default_factory=list)


def label(name: str) -> str:
    if name.startswith("napo-"):
        return f"napo-kernels [{name[5:]}]"
    return LABELS.get(name, name)


def _loss_from_scores(scores: Tensor, shape: Shape) -> Tensor:
    """The reference loss (mean over prompts) from ``scores [B, C]``; candidate 0 is the positive."""
    loss, _ = reference.family_loss(scores[:, 0], scores[:, 1:], method=shape.method, sharing=shape.sharing)
    return loss


def _standard(inputs: Inputs, loss_fn: Callable[[], Tensor], note: str = "") -> Prepared:
    """A step on the canonical leaves ``hidden`` (and ``weight`` when trainable)."""
    leaves = [inputs.hidden] + ([inputs.weight] if inputs.weight.requires_grad else [])

    def run() -> Tensor:
        loss = loss_fn()
        loss.backward()
        return loss.detach()

    def grads() -> dict[str, Tensor]:
        out = {"hidden": inputs.hidden.grad}
        if inputs.weight.requires_grad:
            out["weight"] = inputs.weight.grad
        return out

    def reset() -> None:
        for leaf in leaves:
            leaf.grad = None

    return Prepared(run, grads, reset, note, leaves)


def _plain_scores(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """What a Hugging Face model + TRL do: logits at every position, log_softmax, gather, mask, sum."""
    logits = hidden @ weight.T  # [B, C, T, V]
    logp = logits.float().log_softmax(-1)
    mask = labels != IGNORE_INDEX
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return token.sum(-1)


def _sliced_scores(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """The strongest simple baseline: project only the scored rows onto the vocabulary."""
    b, c, t, h = hidden.shape
    mask = labels.reshape(-1) != IGNORE_INDEX
    rows = hidden.reshape(-1, h)[mask]
    logp = (rows @ weight.T).float().log_softmax(-1)
    token = logp.gather(1, labels.reshape(-1)[mask].unsqueeze(1)).squeeze(1)
    seq = torch.arange(b * c, device=hidden.device).repeat_interleave(t)[mask]
    return token.new_zeros(b * c).index_add(0, seq, token).reshape(b, c)


def _prepare_plain(shape: Shape, x: Inputs) -> Prepared:
    return _standard(x, lambda: _loss_from_scores(_plain_scores(x.hidden, x.weight, x.labels), shape))


def _prepare_sliced(shape: Shape, x: Inputs) -> Prepared:
    return _standard(x, lambda: _loss_from_scores(_sliced_scores(x.hidden, x.weight, x.labels), shape))


def _prepare_compile(shape: Shape, x: Inputs) -> Prepared:
    # stage 1 (all the vocabulary work) compiled; the tiny reference loss on top stays eager
    scores = torch.compile(_plain_scores, dynamic=False)
    return _standard(
        x, lambda: _loss_from_scores(scores(x.hidden, x.weight, x.labels), shape), "inductor, dynamic=False"
    )


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise NotApplicable(f"not installed (pip install {package}): {exc}") from exc


def _prepare_cce(shape: Shape, x: Inputs) -> Prepared:
    cce = _import("cut_cross_entropy", "cut-cross-entropy")
    impl = "cce" if x.hidden.is_cuda else "torch_compile"  # its Triton kernel needs a GPU

    def loss_fn() -> Tensor:
        # per-token negative log-likelihood (0 at ignored positions) -> sequence scores -> loss
        nll = cce.linear_cross_entropy(x.hidden, x.weight, x.labels, reduction="none", impl=impl)
        return _loss_from_scores(-nll.float().sum(-1), shape)

    return _standard(x, loss_fn, f"impl={impl}")


def _prepare_liger(shape: Shape, x: Inputs) -> Prepared:
    if shape.method != "dpo" or shape.negatives != 1 or shape.sharing != "own":
        raise NotApplicable("pairwise DPO only: cannot express K > 1 or a shared multi-negative pool")
    mod = _import("liger_kernel.chunked_loss", "liger-kernel")
    b, _, t, h = x.hidden.shape
    # Liger's layout: [chosen rows; rejected rows] stacked on the batch axis (its native input)
    hid = x.hidden.detach().transpose(0, 1).reshape(2 * b, t, h).clone().requires_grad_()
    lab = x.labels.transpose(0, 1).reshape(2 * b, t).contiguous()
    fn = mod.LigerFusedLinearDPOLoss(beta=1.0, use_ref_model=False, compiled=True)
    leaves = [hid] + ([x.weight] if x.weight.requires_grad else [])

    def run() -> Tensor:
        out = fn(x.weight, hid, lab)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss.detach()

    def grads() -> dict[str, Tensor]:
        g = hid.grad.reshape(2, b, t, h).transpose(0, 1)
        return {"hidden": g} | ({"weight": x.weight.grad} if x.weight.requires_grad else {})

    def reset() -> None:
        for leaf in leaves:
            leaf.grad = None

    return Prepared(run, grads, reset, "compiled=True, chunk_size=1 pair", leaves)


def napo_strategy(shape: Shape, device: torch.device | str, backend: str = "cpp") -> tuple[int, str]:
    """The chunk size napo-kernels uses for ``shape`` and what its backward does."""
    chunk = shape.chunk_size or napo_kernels.choose_chunk_size(
        shape.scored_rows, shape.vocab, torch.device(device)
    )
    block = f"chunk {chunk} rows x V ({chunk * shape.vocab * 4 / 2**20:.1f} MiB fp32 budget)"
    if backend == "cpp" and torch.device(device).type == "cpu":
        from napo_kernels.kernels.extension import cpu_block_shape

        rows, cols = cpu_block_shape(shape.scored_rows, shape.vocab, chunk)
        if cols < shape.vocab:
            block += (
                f" worked as {rows} rows x {cols}-column vocabulary tiles ({rows * cols * 4 / 2**20:.1f} MiB)"
            )
    head = torch.empty(0, shape.hidden, dtype=DTYPES[shape.dtype], device=device)  # its device, dtype, H
    if shape.trainable and keeps_logits(backend, shape.scored_rows, head, chunk):
        where = "in the weight gradient's memory" if backend == "cpp" else "within the budget"
        how = (
            "trainable lm_head: softmax(logits) @ W from the forward for dH, the forward's logits kept "
            f"{where} for dW (3 matrix products)"
        )
    elif shape.trainable:
        how = (
            "trainable lm_head: softmax(logits) @ W from the forward for dH, logits recomputed in the "
            "backward for dW (4 matrix products)"
        )
    else:
        how = "frozen lm_head: softmax(logits) @ W kept from the forward, no vocabulary work in the backward"
    return chunk, f"{block}; {how}"


def _prepare_napo(shape: Shape, x: Inputs, backend: str) -> Prepared:
    info = napo_kernels.backends()[backend]
    if not info.available:
        raise NotApplicable(f"backend unavailable: {info.reason}")
    try:
        dispatch.kernels(backend)
    except ImportError as exc:  # e.g. a backend whose kernels have not landed in this checkout
        raise NotApplicable(f"backend kernels not importable: {exc}") from exc

    def loss_fn() -> Tensor:
        margin = (
            napo_kernels.DynamicMargin(1.0) if shape.method == "napo" else None
        )  # fresh EMA, as reference
        return napo_kernels.napo_loss(
            x.hidden,
            x.weight,
            x.labels,
            method=shape.method,
            sharing=shape.sharing,
            margin_state=margin,
            chunk_size=shape.chunk_size,
            backend=backend,
        )

    return _standard(x, loss_fn, napo_strategy(shape, x.hidden.device, backend)[1])


def _prepare_bare(shape: Shape, x: Inputs) -> Prepared:
    """The matrix products the computation needs on the scored rows, into preallocated outputs:
    frozen: logits = A W^T and dA = P W; trainable: also dW = P^T A."""
    r, v, h = shape.scored_rows, shape.vocab, shape.hidden
    dev, dt = x.hidden.device, x.hidden.dtype
    a, p = torch.randn(r, h, device=dev, dtype=dt), torch.randn(r, v, device=dev, dtype=dt)
    logits, d_a = torch.empty(r, v, device=dev, dtype=dt), torch.empty(r, h, device=dev, dtype=dt)
    d_w = torch.empty(v, h, device=dev, dtype=dt) if shape.trainable else None
    w = x.weight.detach()

    def run() -> Tensor:
        torch.mm(a, w.T, out=logits)
        torch.mm(p, w, out=d_a)
        if d_w is not None:
            torch.mm(p.T, a, out=d_w)
        return d_a[0, 0]

    n = 3 if shape.trainable else 2
    return Prepared(run, dict, lambda: None, f"{n} GEMMs on {r} scored rows")


def prepare(name: str, shape: Shape, inputs: Inputs) -> Prepared:
    """The step of contender ``name`` (``plain``, ``sliced``, ``compile``, ``liger``, ``cce``,
    ``bare`` or ``napo-<backend>``); raises :class:`NotApplicable` with the reason when it cannot run."""
    if name.startswith("napo-"):
        return _prepare_napo(shape, inputs, name[5:])
    makers = {
        "plain": _prepare_plain,
        "sliced": _prepare_sliced,
        "compile": _prepare_compile,
        "liger": _prepare_liger,
        "cce": _prepare_cce,
        "bare": _prepare_bare,
    }
    if name not in makers:
        raise ValueError(f"unknown contender {name!r}; choose from {BASELINES} or napo-<backend>")
    return makers[name](shape, inputs)
