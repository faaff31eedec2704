"""What the fused loss needs from a causal LM's output head, read from a Hugging Face model.

The fused stage 1 (:func:`napo_kernels.sequence_logprobs`, :func:`napo_kernels.napo_loss`) never
materialises the logits: it takes the body's last hidden states ``h`` and the head's parameters and
computes ``log_softmax(z)[y]`` with

    z = softcap * tanh(logit_scale * (h W^T + b) / softcap)      (no tanh when softcap is None)

That is the head of every model listed in :data:`SUPPORTED_HEADS`, each with its own constants
(Gemma 2/3's ``config.final_logit_softcapping``, Cohere's ``logit_scale``, Granite's division by
``config.logits_scaling``, Phi's bias, the tied heads of GPT-2, Qwen2 and Gemma). Passing
``model.lm_head.weight`` alone would score such a model silently wrong, so :func:`lm_head_of` reads
them from the model and refuses, with an :class:`UnsupportedHeadError` naming the class and what was
not understood, any model whose logits it cannot vouch for:

* a class outside :data:`SUPPORTED_HEADS` (none of its bases is listed);
* a subclass that overrides ``forward`` (it may post-process the logits), a ``forward`` replaced
  on the instance (other than accelerate's mixed-precision / device hooks around the original), or
  forward hooks on the model (those of a sharding engine, FSDP2 or DeepSpeed ZeRO-3, that gather
  parameters around a forward are not counted: :mod:`napo_kernels.integrations.sharded`);
* a head that is not a plain ``torch.nn.Linear`` (a LoRA layer on ``lm_head``, a quantised or
  custom layer), has forward hooks, or whose weight is offloaded (``meta``);
* a peft prompt-learning model (prefix / prompt tuning changes the body's inputs);
* a non-positive or non-finite soft-cap or scale.

Escape hatches for a model known to be right: ``lm_head_of(model, trust_forward=True)`` skips the
class and ``forward`` checks (an unknown class then counts as a plain ``h W^T + b`` head), and
:func:`trust_lm_head` records on the model itself, for the trainers and evaluation helpers that
call :func:`lm_head_of` internally, that its logits are ``softcap``/``logit_scale`` of its head.

Tied heads need nothing special: :attr:`LMHead.weight` *is* the input embedding's Parameter, so
under full fine-tuning autograd adds the head's gradient to the embedding's, as in the model's own
forward (:attr:`LMHead.tied` reports it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SUPPORTED_HEADS",
    "LMHead",
    "UnsupportedHeadError",
    "causal_lm_of",
    "lm_head_of",
    "trust_lm_head",
]

# The attribute trust_lm_head() sets on a model: (softcap, logit_scale).
TRUSTED_ATTRIBUTE = "_napo_trusted_lm_head"


class UnsupportedHeadError(TypeError):
    """The model's logits are not a head napo-kernels understands (see :func:`lm_head_of`)."""


@dataclass(frozen=True, eq=False)
class LMHead:
    """What the fused loss needs from a causal LM: its logits are
    ``softcap * tanh(logit_scale * (body(x) W^T + b) / softcap)`` (no tanh when ``softcap`` is None).

    Attributes:
        body: the module that returns the last hidden states, after the final norm (``model.model``,
            ``model.transformer`` for GPT-2); the packing helpers run it.
        module: the head module whose parameters are read (``model.lm_head``, or the active copy
            inside a peft ``modules_to_save`` wrapper).
        weight: ``[V, H]`` head weight (for a tied head: the input embedding's Parameter itself).
        bias: ``[V]`` head bias, or None.
        softcap: final logit soft-cap (Gemma 2/3), or None.
        logit_scale: positive multiplier of ``h W^T + b`` before the cap (Cohere's ``logit_scale``,
            ``1 / logits_scaling`` for Granite; 1.0 otherwise).
        tied: whether ``weight`` is the input embedding's weight.
        model_class: the class name of the Hugging Face model (after unwrapping DDP / peft).
    """

    body: nn.Module
    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    softcap: float | None
    logit_scale: float
    tied: bool
    model_class: str

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~napo_kernels.napo_loss`, :class:`~napo_kernels.PreferenceLoss`
        and :func:`~napo_kernels.sequence_logprobs` (the weight is their positional argument):
        ``bias``, and ``softcap`` / ``logit_scale`` where they differ from a plain head's.

        >>> head = lm_head_of(model)
        >>> loss = napo_loss(rows, head.weight, labels, **head.loss_kwargs(), sequence_ids=...)
        """
        kwargs: dict[str, Any] = {"bias": self.bias}
        if self.softcap is not None:
            kwargs["softcap"] = self.softcap
        if self.logit_scale != 1.0:
            kwargs["logit_scale"] = self.logit_scale
        return kwargs

    def logits(self, hidden: Tensor) -> Tensor:
        """The model's full logits ``[..., V]`` for last hidden states ``[..., H]`` (materialised:
        for checks and small inputs; the fused ops never build this tensor)."""
        z = F.linear(hidden, self.weight, self.bias)
        if self.logit_scale != 1.0:
            z = z * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z


# ----------------------------------------------------------------------------- known models

_Reader = Callable[[nn.Module], tuple[float | None, float]]


def _plain(model: nn.Module) -> tuple[float | None, float]:
    return None, 1.0


def _final_softcap(model: nn.Module) -> tuple[float | None, float]:
    # Gemma 2/3: logits = cap * tanh(lm_head(h) / cap) when config.final_logit_softcapping is not None
    return model.config.final_logit_softcapping, 1.0


def _cohere_scale(model: nn.Module) -> tuple[float | None, float]:
    # Cohere / Cohere2: logits = lm_head(h) * self.logit_scale (copied from the config at init)
    return None, model.logit_scale


def _granite_scale(model: nn.Module) -> tuple[float | None, float]:
    # Granite: logits = lm_head(h) / config.logits_scaling
    scaling = model.config.logits_scaling
    if not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
        raise UnsupportedHeadError(
            f"{type(model).__name__}: config.logits_scaling must be a positive finite number, got {scaling!r}"
        )
    return None, 1.0 / scaling


@dataclass(frozen=True)
class _Known:
    """A model class whose ``forward`` computes ``cap(scale * lm_head(body(x)))`` exactly."""

    body: str
    read: _Reader
    head: str = "lm_head"
    how: str = "plain"


def _entry(
    module: str, cls: str, body: str = "model", read: _Reader = _plain, how: str = "plain"
) -> tuple[str, _Known]:
    return f"transformers.models.{module}.modeling_{module}.{cls}", _Known(body, read, how=how)


# Every class here is checked against the installed transformers by tests/test_heads.py (the
# fused log-probs equal the model's own full-logits log-probs). Mixture-of-experts classes are
# left out on purpose: their training loss adds a router auxiliary loss that the fused path omits.
_SOFTCAP = "soft-cap: config.final_logit_softcapping"
_COHERE = "scale: model.logit_scale (from config.logit_scale)"
_GRANITE = "scale: 1 / config.logits_scaling"
_KNOWN: dict[str, _Known] = dict(
    [
        _entry("llama", "LlamaForCausalLM"),
        _entry("mistral", "MistralForCausalLM"),
        _entry("qwen2", "Qwen2ForCausalLM"),
        _entry("qwen3", "Qwen3ForCausalLM"),
        _entry("gemma", "GemmaForCausalLM"),
        _entry("gemma2", "Gemma2ForCausalLM", read=_final_softcap, how=_SOFTCAP),
        _entry("gemma3", "Gemma3ForCausalLM", read=_final_softcap, how=_SOFTCAP),
        _entry("cohere", "CohereForCausalLM", read=_cohere_scale, how=_COHERE),
        _entry("cohere2", "Cohere2ForCausalLM", read=_cohere_scale, how=_COHERE),
        _entry("granite", "GraniteForCausalLM", read=_granite_scale, how=_GRANITE),
        _entry("phi", "PhiForCausalLM", how="plain, with a bias"),
        _entry("phi3", "Phi3ForCausalLM"),
        _entry("opt", "OPTForCausalLM"),
        _entry("gpt2", "GPT2LMHeadModel", body="transformer"),
    ]
)

SUPPORTED_HEADS: dict[str, str] = {key.rsplit(".", 1)[1]: known.how for key, known in _KNOWN.items()}
"""Supported Hugging Face classes (and their subclasses that keep ``forward``) -> how the head is read."""

# config attributes that make a head non-plain in the classes above; an unknown class trusted as
# plain (trust_forward=True) must not carry them
_HEAD_CONFIG_ATTRIBUTES = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(cls: type) -> str:
    return f"{cls.__name__} ({cls.__module__})"


# ----------------------------------------------------------------------------- unwrapping


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / FSDP / DataParallel / DeepSpeed engine (``.module``),
    ``torch.compile`` (``._orig_mod``) and peft (``get_base_model()``) wrappers, in any nesting."""
    for _ in range(16):
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            config = getattr(model, "active_peft_config", None)
            if getattr(config, "is_prompt_learning", False):
                raise UnsupportedHeadError(
                    f"{type(model).__name__}: a peft prompt-learning model ({type(config).__name__}) adds "
                    "virtual tokens to the body's inputs, which the packed path does not; use an adapter "
                    "method (LoRA)"
                )
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model._modules.get("module"), nn.Module) and not hasattr(
            type(model), "get_output_embeddings"
        ):
            # the class, not the instance: DeepSpeed's engine forwards unknown attributes to its module
            model = model.module
        else:
            return model
    raise UnsupportedHeadError(f"{type(model).__name__}: too many nested wrappers around the model")


# Sharding engines register forward hooks that gather a module's parameters before its forward and
# release them after (FSDP2's fully_shard, DeepSpeed ZeRO-3, whose engine also hooks the root for its
# own bookkeeping); they leave the values computed alone.
_ENGINE_HOOK_MODULES = ("torch.distributed.fsdp.", "deepspeed.runtime.", "deepspeed.utils.nvtx")


def _foreign_hooks(module: nn.Module) -> tuple[int, int]:
    """The numbers of forward pre- and post-hooks on ``module`` that no sharding engine registered."""

    def foreign(hooks: dict) -> int:
        owner = (getattr(getattr(h, "__func__", h), "__module__", None) or "" for h in hooks.values())
        return sum(not name.startswith(_ENGINE_HOOK_MODULES) for name in owner)

    return foreign(module._forward_pre_hooks), foreign(module._forward_hooks)


def _active_module(module: nn.Module) -> nn.Module:
    """The module a peft ``ModulesToSaveWrapper`` runs (the trained copy, or the original while
    adapters are disabled), as its ``forward`` chooses; other modules are returned as they are."""
    cls = type(module)
    if not (cls.__name__ == "ModulesToSaveWrapper" and cls.__module__.startswith("peft.")):
        return module
    active = list(module.active_adapters)
    available = getattr(module, "_adapters", set(module.modules_to_save))
    if module.disable_adapters or not active or any(a not in available for a in active):
        return module.original_module
    return module.modules_to_save[active[0]]


def _forward_is(model: nn.Module, expected: Callable) -> bool:
    """Whether ``model.forward`` runs ``expected``: the class attribute, or accelerate's instance
    wrappers (mixed-precision autocast: ``_original_forward``; device hooks: ``_old_forward``)
    around a bound ``expected``."""
    if getattr(type(model), "forward", None) is not expected:
        return False
    own = vars(model)
    if "forward" not in own:
        return True
    inner = own.get("_old_forward", own.get("_original_forward"))
    return getattr(inner, "__func__", None) is expected


def _plain_linear(module: nn.Module, where: str) -> nn.Linear:
    """``module`` if it is a plain ``nn.Linear`` whose output is exactly ``x W^T + b``; raises otherwise."""
    cls = type(module)
    if not isinstance(module, nn.Linear):
        hint = ""
        if cls.__module__.startswith("peft.") or hasattr(module, "lora_A"):
            hint = (
                " (an adapter on the output head: the fused loss reads weight and bias only; leave lm_head "
                "out of target_modules, put it in modules_to_save, or merge the adapter first)"
            )
        raise UnsupportedHeadError(
            f"{where}: the output head is a {_describe(cls)}, not a torch.nn.Linear{hint}"
        )
    if cls.forward is not nn.Linear.forward:
        raise UnsupportedHeadError(
            f"{where}: the output head's class {_describe(cls)} overrides nn.Linear.forward (a quantised or "
            "custom layer), so its output is not known to be x W^T + b"
        )
    if not _forward_is(module, nn.Linear.forward):
        raise UnsupportedHeadError(f"{where}: the output head's forward was replaced on the instance")
    pre, post = _foreign_hooks(module)
    if pre or post:
        raise UnsupportedHeadError(
            f"{where}: the output head has forward hooks ({pre} pre, {post} post) that may change its "
            "inputs or output"
        )
    weight = module.weight
    # a ZeRO-3 partitioned weight is a 0-element placeholder; its shape is ds_shape
    shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", ())
    if not isinstance(weight, Tensor) or len(shape) != 2 or not weight.is_floating_point():
        raise UnsupportedHeadError(f"{where}: the output head's weight is not a floating-point [V, H] tensor")
    if weight.is_meta:
        raise UnsupportedHeadError(
            f"{where}: the output head's weight is on the meta device (offloaded); load the head on a device"
        )
    return module


def _positive(value: Any, name: str, where: str, allow_none: bool) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise UnsupportedHeadError(f"{where}: {name} must be a positive finite number, got {value!r}")
    return float(value)


def _tied(weight: Tensor, model: nn.Module) -> bool:
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    emb = getattr(_active_module(embeddings), "weight", None) if isinstance(embeddings, nn.Module) else None
    if not isinstance(emb, Tensor):
        return False
    if emb is weight:
        return True
    if type(emb) is not type(weight) or hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor":
        return False  # shards and ZeRO-3 placeholders share no storage to compare: identity only
    return (
        weight.numel() > 0
        and emb.data_ptr() == weight.data_ptr()
        and emb.shape == weight.shape
        and emb.stride() == weight.stride()
    )


# ----------------------------------------------------------------------------- public API


def trust_lm_head(model: nn.Module, *, softcap: float | None = None, logit_scale: float = 1.0) -> nn.Module:
    """Declare that ``model``'s logits are ``softcap * tanh(logit_scale * lm_head(h) / softcap)``
    (no tanh for ``softcap=None``) of its output head, for a model :func:`lm_head_of` refuses (an
    unlisted class, a subclass that overrides ``forward``). The declaration is stored on the
    underlying Hugging Face model, so every later :func:`lm_head_of` (the trainers, the packing and
    evaluation helpers) uses these constants and skips the class and ``forward`` checks; the head
    must still be a plain ``nn.Linear``. Returns ``model``.
    """
    inner = _unwrap(model)
    where = _describe(type(inner))
    cap = _positive(softcap, "softcap", where, allow_none=True)
    scale = _positive(logit_scale, "logit_scale", where, allow_none=False)
    setattr(inner, TRUSTED_ATTRIBUTE, (cap, scale))
    return model


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``model``'s wrappers (peft, DDP, DeepSpeed's engine,
    ``torch.compile``), whose ``forward`` :func:`lm_head_of` reads the head of. FSDP2 wraps nothing
    (``fully_shard`` changes the module's class in place), so a sharded model is its own."""
    return _unwrap(model)


def lm_head_of(model: nn.Module, *, trust_forward: bool = False) -> LMHead:
    """Read what the fused loss needs from a Hugging Face causal LM.

    Args:
        model: a ``*ForCausalLM`` of :data:`SUPPORTED_HEADS` (or a subclass that keeps its
            ``forward``), possibly inside a peft model (``get_base_model()``), DDP / FSDP /
            DataParallel (``.module``) or ``torch.compile`` (``._orig_mod``), in any nesting.
        trust_forward: skip the class and ``forward`` checks: a subclass of a listed class is read
            like that class, an unlisted class as a plain ``h W^T + b`` head (refused if its config
            sets ``final_logit_softcapping``, ``logit_scale`` or ``logits_scaling``; declare those
            with :func:`trust_lm_head`). The head module checks still apply.

    Returns:
        An :class:`LMHead`; its parameters are the model's own (no copy), read at call time (the
        active peft ``modules_to_save`` copy, the current config constants).

    Raises:
        UnsupportedHeadError: (a ``TypeError``) naming the model class and what was not understood.
    """
    inner = _unwrap(model)
    cls = type(inner)
    where = _describe(cls)
    trusted = vars(inner).get(TRUSTED_ATTRIBUTE)
    known_cls = next((c for c in cls.__mro__ if _qualified(c) in _KNOWN), None)
    known = _KNOWN[_qualified(known_cls)] if known_cls is not None else None

    if known is None and not (trust_forward or trusted):
        supported = ", ".join(SUPPORTED_HEADS)
        raise UnsupportedHeadError(
            f"{where} is not a supported causal LM (*ForCausalLM): napo-kernels does not know how its "
            "forward turns the output head's values into logits. Supported classes (and subclasses that "
            f"keep their forward): {supported}. If its logits are exactly lm_head(hidden), pass "
            "trust_forward=True or call napo_kernels.heads.trust_lm_head(model, softcap=..., logit_scale=...)"
        )
    if known is not None and not (trust_forward or trusted) and not _forward_is(inner, known_cls.forward):
        what = (
            "replaces forward on the instance"
            if getattr(cls, "forward", None) is known_cls.forward
            else f"overrides {known_cls.__name__}.forward"
        )
        raise UnsupportedHeadError(
            f"{where} {what}, so its logits may be post-processed in a way napo-kernels cannot see (the "
            f"fused loss computes {known_cls.__name__}'s head: {known.how}). If the logits are still "
            "exactly that, pass trust_forward=True or call napo_kernels.heads.trust_lm_head(model, "
            "softcap=..., logit_scale=...)"
        )
    pre, post = _foreign_hooks(inner)
    if known is not None and not (trust_forward or trusted) and (pre or post):
        raise UnsupportedHeadError(
            f"{where} has forward hooks ({pre} pre, {post} post) that may change its inputs or logits; "
            "pass trust_forward=True if they do not"
        )

    if known is not None:
        body = getattr(inner, known.body, None)
        head = getattr(inner, known.head, None)
        output_embeddings = inner.get_output_embeddings()
        if output_embeddings is not head:
            raise UnsupportedHeadError(
                f"{where}: get_output_embeddings() is not the {known.head} that "
                f"{known_cls.__name__}.forward uses"
            )
    else:
        body = getattr(inner, "base_model", None)
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        if body is inner:
            body = None
    if not isinstance(body, nn.Module) or head is None:
        raise UnsupportedHeadError(f"{where}: no body module and output head (get_output_embeddings()) found")
    head = _plain_linear(_active_module(head), where)

    if trusted:
        softcap, scale = trusted
    elif known is not None:
        softcap, scale = known.read(inner)
    else:
        config = getattr(inner, "config", None)
        for name, plain in _HEAD_CONFIG_ATTRIBUTES.items():
            value = getattr(config, name, plain)
            if value != plain:
                raise UnsupportedHeadError(
                    f"{where}: trust_forward=True reads an unlisted class as a plain head, but its config "
                    f"sets {name}={value!r}; declare the head with napo_kernels.heads.trust_lm_head(model, "
                    "softcap=..., logit_scale=...)"
                )
        softcap, scale = None, 1.0
    return LMHead(
        body=body,
        module=head,
        weight=head.weight,
        bias=head.bias,
        softcap=_positive(softcap, "the final logit soft-cap", where, allow_none=True),
        logit_scale=_positive(scale, "the logit scale", where, allow_none=False),
        tied=_tied(head.weight, inner),
        model_class=cls.__name__,
    )
