"""The fused loss on sharded models: PyTorch FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3.

The fused loss takes the output head's weight ``W [V, H]`` as a tensor and never calls the head
module. Under a sharding engine that tensor is only whole inside a forward: FSDP2 registers the
``[V / W, H]`` ``DTensor`` shard on the module between forwards and swaps in the all-gathered
weight in its pre-forward hook; ZeRO-3 leaves a 0-element placeholder and fills it in its pre-forward
hook. Read outside a forward, the loss would see the shard (or nothing), and a gradient computed
from a weight gathered by hand would not go through the engine's reduce-scatter.

So the loss runs *as a forward* (forward redirection): :func:`run_as_forward` runs a function as
the forward of the Hugging Face model inside the caller's wrappers (peft, DDP, DeepSpeed's engine,
FSDP2's hooks on the model itself), so the engine's root pre/post-forward hooks run around it, and
:func:`with_gathered_head` runs the head part as the forward of the module that owns the head's
parameters when they are not gathered already:

* FSDP2: the ``FSDPModule`` whose parameter group holds the weight (the root, where accelerate and
  :func:`shard_model` put it; ``lm_head`` with the final norm under transformers'
  ``DistributedConfig``; ``lm_head`` itself if it was sharded on its own). Its pre-forward
  all-gathers the group, its post-forward reshards it (if the group reshards after forward) and
  hooks the loss so the backward all-gathers it again; the weight's gradient accumulates into the
  unsharded parameter and FSDP2 reduce-scatters it into the shard's ``.grad`` in its post-backward.
* ZeRO-3: the head module (``lm_head``) itself: its ZeRO hooks gather ``W`` (and the bias) before,
  release after, gather again when the backward reaches the loss (the op's backward reads ``W``)
  and hand the gradient to ZeRO's reduce hooks. ``deepspeed.zero.GatheredParameters`` alone would
  not do: it gathers only inside its ``with`` block, and the backward runs after the block.

Either way the whole weight lives only for the loss (and again for its backward), and the
optimizer sees the engine's usual sharded gradient. Tied heads need nothing more (the weight is
the embedding's parameter and both uses' gradients add up before the reduce-scatter); a frozen head
(LoRA) is gathered the same way and gets no gradient.

A plain training loop::

    from napo_kernels import lm_head_of, napo_loss
    from napo_kernels.integrations.sharded import run_as_forward, shard_model, with_gathered_head

    model = shard_model(model)        # or fully_shard by hand / transformers' DistributedConfig / ZeRO-3

    def step(batch):                  # runs as the model's forward
        body = lm_head_of(model).body
        hidden = body(input_ids=batch["input_ids"])[0]

        def loss(head, hidden):       # head: the LMHead, its weight gathered
            return napo_loss(hidden, head.weight, batch["labels"], **head.loss_kwargs(),
                             process_group=group)

        return with_gathered_head(model, loss, hidden)

    loss = run_as_forward(model, step, batch)
    loss.backward()                   # the engine's own reduce-scatter of every gradient
    optimizer.step()

The recommender trainers do this by themselves for a sharded model
(:mod:`napo_kernels.recommender.trainer`, ``docs/distributed.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..heads import LMHead, causal_lm_of, lm_head_of

__all__ = [
    "ENGINES",
    "full_parameters",
    "run_as_forward",
    "shard_model",
    "sharding_of",
    "with_gathered_head",
]

T = TypeVar("T")
ENGINES = ("fsdp2", "zero3")
_NO_FORWARD = object()  # the module had no instance-level forward to put back


def _fsdp_module_class() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def _is_shard(weight: Tensor) -> bool:
    """Whether ``weight`` is what a sharding engine leaves outside a forward (a DTensor shard or a
    ZeRO-3 placeholder), not the whole tensor."""
    if type(weight).__name__ == "DTensor":
        return True
    return hasattr(weight, "ds_shape") and tuple(weight.shape) != tuple(weight.ds_shape)


def sharding_of(model: nn.Module) -> str | None:
    """``"fsdp2"`` when a module of ``model`` is an FSDP2 ``FSDPModule``, ``"zero3"`` when its
    parameters are DeepSpeed ZeRO-3 partitioned, else None (plain, DDP, ZeRO-1/2). FSDP1
    (``FullyShardedDataParallel``) raises: its flat parameters hide the head's weight from any
    module-level gather; use FSDP2."""
    fsdp_module = _fsdp_module_class()
    for module in model.modules():
        if fsdp_module is not None and isinstance(module, fsdp_module):
            return "fsdp2"
        if type(module).__name__ == "FullyShardedDataParallel":
            raise NotImplementedError(
                "FSDP1 (FullyShardedDataParallel) is not supported by the fused loss; shard with FSDP2 "
                "(torch.distributed.fsdp.fully_shard, accelerate's fsdp_version: 2)"
            )
        if any(hasattr(p, "ds_id") for p in module.parameters(recurse=False)):
            return "zero3"
    return None


def _restore(module: nn.Module, own: object) -> None:
    if own is _NO_FORWARD:
        vars(module).pop("forward", None)
    else:
        module.forward = own


def _redirect(outer: nn.Module, target: nn.Module, fn: Callable[..., T], *inputs: Any) -> Any:
    """``outer(*inputs)`` with ``target.forward`` replaced, for that one call, by ``fn``: every
    hook and wrapper between ``outer`` and ``target`` runs as in a real forward (``target`` is
    ``outer`` or a module that ``outer``'s forward calls). Returns what ``outer`` returns: the
    engines' hooks may wrap the tensors ``fn`` returned, and those wrappers carry the backward hooks."""
    own = vars(target).get("forward", _NO_FORWARD)
    calls = []

    def forward(*args: Any, **kwargs: Any) -> T:
        _restore(target, own)  # at once: fn may read the model (lm_head_of checks its forward)
        calls.append(None)
        return fn(*args, **kwargs)

    target.forward = forward
    try:
        out = outer(*inputs)
    finally:
        _restore(target, own)
    if len(calls) != 1:
        raise RuntimeError(
            f"forward redirection: {type(outer).__name__} was expected to run the forward of "
            f"{type(target).__name__} once, it ran it {len(calls)} times"
        )
    return out


def run_as_forward(model: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` run as the forward of the Hugging Face model inside ``model``.

    ``model`` is what the training loop calls: the model itself, a peft model, a DDP or DeepSpeed
    engine wrapper. Its forward chain runs down to the Hugging Face model (so the sharding engine's
    root hooks gather the root's parameters, DDP prepares its reducer, ...), whose ``forward`` is
    replaced, for this call only, by ``fn``. The arguments reach ``fn`` directly (the model is
    called without inputs); whatever ``fn`` returns comes back through the wrappers' post-forward
    hooks, which register the engine's backward hooks on the tensors that need a gradient. Return a
    tensor or a tuple / list / dict of tensors and plain values (DeepSpeed's hooks do not look
    inside other containers), and no views (FSDP2 warns: an in-place op on a view loses its hook).
    Under ``no_grad`` FSDP2's modules are resharded after the call (no backward will).
    """
    out = _redirect(model, causal_lm_of(model), lambda *_a, **_k: fn(*args, **kwargs))
    if not torch.is_grad_enabled():
        # No backward follows to reshard what FSDP2 keeps after a forward (the root's group, groups
        # with reshard_after_forward=False such as transformers' norm + head): free it now, or a
        # reference model that only ever runs under no_grad would hold its whole head for good.
        _reshard(model)
    return out


def _reshard(model: nn.Module) -> None:
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp_module):
            module.reshard()


def _owner(model: nn.Module, head: nn.Module) -> nn.Module:
    """The innermost FSDP module on the path from ``model`` down to ``head``: the one whose
    ``fully_shard`` took the head's weight (nested calls take their parameters first)."""
    fsdp_module = _fsdp_module_class()
    path = [model]
    for name, module in model.named_modules():
        if module is head:
            for part in name.split(".") if name else []:
                path.append(path[-1].get_submodule(part))
            break
    owners = [m for m in path if isinstance(m, fsdp_module)]
    if not owners:
        raise RuntimeError(f"no FSDP module of {type(model).__name__} contains the output head")
    return owners[-1]


def _gathered(head: LMHead, shape: tuple[int, ...]) -> LMHead:
    """``head`` with the parameters its module holds now (inside the gather), checked whole."""
    weight, bias = head.module.weight, head.module.bias
    if _is_shard(weight) or tuple(weight.shape) != shape:
        raise RuntimeError(
            f"the output head's weight is still sharded ({type(weight).__name__} {list(weight.shape)}, "
            f"expected the whole {list(shape)}) where the sharding engine should have gathered it"
        )
    return dataclasses.replace(head, weight=weight, bias=bias)


def with_gathered_head(model: nn.Module, fn: Callable[..., T], *inputs: Any) -> T:
    """``fn(head, *inputs)`` with ``head`` (an :class:`~napo_kernels.heads.LMHead`) holding the whole
    head weight and bias, gathered by the sharding engine of ``model`` for this call only.

    Unsharded models (plain, DDP): ``fn(lm_head_of(model), *inputs)``. FSDP2: as the forward of the
    FSDP module owning the weight, unless its group is gathered already (inside the root's forward
    when the root owns it). ZeRO-3: as the forward of the head module. Call it inside
    :func:`run_as_forward` (the engine's root forward must have started: FSDP2 finds its root at
    the first forward), and pass the tensors the loss differentiates (the hidden states) as
    ``inputs``: the engines hook them to release the head once the backward has used it.
    """
    head = lm_head_of(model)
    engine = sharding_of(model)
    if engine is None:
        return fn(head, *inputs)
    weight = head.module.weight
    shape = tuple(getattr(weight, "ds_shape", None) or weight.shape)  # DTensor: its global shape

    def gathered(*xs: Any) -> T:
        return fn(_gathered(head, shape), *xs)

    if engine == "zero3":
        return _redirect(head.module, head.module, gathered, *inputs)
    if not _is_shard(weight):  # the owner's group is unsharded: we are inside its forward
        return gathered(*inputs)
    owner = _owner(model, head.module)
    return _redirect(owner, owner, gathered, *inputs)


def shard_model(
    model: nn.Module,
    *,
    mesh: Any = None,
    mp_policy: Any = None,
    offload_policy: Any = None,
    reshard_after_forward: bool = True,
    separate_head: bool = False,
) -> nn.Module:
    """FSDP2 the way accelerate's ``fsdp_version: 2`` applies it: ``fully_shard`` on every decoder
    layer (the classes in the model's ``_no_split_modules``), then on ``model`` itself (a peft model
    included) as the root, which holds the embeddings, the final norm and the output head.

    Args:
        model: a Hugging Face causal LM, or a peft model around one; sharded in place.
        mesh: the data-parallel ``DeviceMesh`` (default: every rank of the default group).
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` (e.g. bf16 parameters, fp32 gradient reduction).
        offload_policy: an FSDP2 ``OffloadPolicy`` (``CPUOffloadPolicy()``: sharded parameters,
            gradients and optimizer state on the CPU).
        reshard_after_forward: for the layers (the root keeps its parameters until the backward,
            FSDP2's default for a root).
        separate_head: shard an untied ``lm_head`` on its own (its weight is then gathered only
            around the loss, not for the whole forward).

    Returns:
        ``model``, now an ``FSDPModule``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    core = causal_lm_of(model)
    layer_classes = set(getattr(core, "_no_split_modules", None) or ())
    if not layer_classes:
        raise ValueError(f"{type(core).__name__} names no decoder layer class (_no_split_modules)")
    options = dict(
        mesh=mesh,
        mp_policy=mp_policy or MixedPrecisionPolicy(),
        offload_policy=offload_policy or OffloadPolicy(),
    )
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"no module of {type(core).__name__} is one of {sorted(layer_classes)}")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    if separate_head:
        head = lm_head_of(model)
        if head.tied:
            raise ValueError("separate_head: a tied head is the input embedding; it stays in the root group")
        fully_shard(head.module, reshard_after_forward=True, **options)
    fully_shard(model, **options)
    return model


def full_parameters(model: nn.Module, *, trainable_only: bool = False) -> dict[str, Tensor]:
    """Every parameter of ``model`` whole, on every rank, detached (FSDP2 shards all-gathered,
    ZeRO-3 partitions gathered): for checks and for copying a sharded model into a plain one.
    Every rank must call it."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    if sharding_of(model) == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().clone() for n, p in named}
    return {n: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().clone() for n, p in named}
