"""The loss's hyper-parameters in one place: the method table and :class:`LossConfig`.

Every public entry (:func:`~napo_kernels.preference_loss`, :func:`~napo_kernels.napo_loss`,
:class:`~napo_kernels.PreferenceLoss`, the cross-rank pool) takes its hyper-parameters as the fields
of one frozen :class:`LossConfig`, validated once when it is built. Adding a method that reuses an
aggregation costs its reference formula, one :data:`METHOD_TABLE` row and a README row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .kernels.torch_chunked import AGG_LSE, AGG_MEAN
from .margin import MARGIN_DEFAULTS, MARGIN_MODES, DynamicMargin

SHARING_MODES = ("own", "all", "similarity")
DETACH_MODES = ("none", "shared", "all")


@dataclass(frozen=True)
class MethodSpec:
    """How one method turns the reward matrix into a per-prompt loss."""

    aggregation: int  # AGG_LSE: softplus(LSE(...)); AGG_MEAN: softplus(mean(...))
    shares_by_default: bool  # default pool: the batch (NAPO) or the prompt's own negatives
    dynamic_margin: bool  # NAPO's EMA margin (stateful: gamma0, alpha, mu, margin_mode apply)
    constant_margin: bool  # accepts the additive margin ``gamma``
    boundary_selection: bool  # DynamicPO: aggregate over the boundary set with per-negative beta_n
    single_negative: bool = False  # DPO: exactly one own negative per prompt


METHOD_TABLE: dict[str, MethodSpec] = {
    "dpo": MethodSpec(AGG_LSE, False, False, True, False, single_negative=True),
    "s_dpo": MethodSpec(AGG_LSE, False, False, True, False),
    "dmpo": MethodSpec(AGG_MEAN, False, False, True, False),
    "napo": MethodSpec(AGG_LSE, True, True, False, False),
    "dynamicpo": MethodSpec(AGG_MEAN, False, False, False, True),
}
METHODS = tuple(METHOD_TABLE)


def _choices(values: tuple[str, ...]) -> dict[str, Any]:
    return {"choices": values}


@dataclass(frozen=True)
class LossConfig:
    """The hyper-parameters of the multi-negative preference loss (validated at construction).

    Attributes:
        method: ``"dpo"``, ``"s_dpo"``, ``"dmpo"``, ``"napo"`` or ``"dynamicpo"``.
        beta: temperature ``beta > 0``.
        gamma: additive constant margin of ``dpo``, ``s_dpo`` and ``dmpo`` (default 0). NAPO's
            margin is ``gamma0``; DynamicPO has none.
        gamma0: NAPO's base margin ``gamma_0`` (default 1); NAPO only.
        sharing: the negative pool: ``"own"``, ``"all"`` or ``"similarity"`` (top
            ``floor(rho (B - 1) + 1e-9)`` other prompts by user embedding). Default: NAPO shares
            (``"similarity"`` when user embeddings are given, else ``"all"``), the others ``"own"``.
            A ``[B, B]`` bool matrix is data, passed to the loss call, not configuration.
        rho: fraction of the other prompts shared with ``sharing="similarity"``, in ``(0, 1]``.
        margin_mode: NAPO: ``"batch"`` (one ``gamma_t`` per step), ``"per_negative"`` or ``"none"``.
        alpha: NAPO: strength of the margin's adaptation.
        mu: NAPO: EMA momentum in ``[0, 1)``.
        tau: DynamicPO's offset in ``beta_n``.
        detach_negatives: ``"none"`` (the exact gradient), ``"shared"`` (negatives borrowed from
            other prompts get no gradient, own ones do) or ``"all"`` (no negative gets a gradient,
            as in NAPO's released code, which reads every negative score from a ``no_grad`` gather).
    """

    method: str = field(default="napo", metadata=_choices(METHODS))
    beta: float = 1.0
    gamma: float | None = None
    gamma0: float | None = None
    sharing: str | None = field(default=None, metadata=_choices(SHARING_MODES))
    rho: float = 0.7
    margin_mode: str | None = field(default=None, metadata=_choices(MARGIN_MODES))
    alpha: float | None = None
    mu: float | None = None
    tau: float = 2.0
    detach_negatives: str = field(default="none", metadata=_choices(DETACH_MODES))

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if "choices" in f.metadata:
                if value is None and f.default is None:
                    continue
                if value not in f.metadata["choices"]:
                    raise ValueError(f"{f.name} must be one of {f.metadata['choices']}, got {value!r}")
            elif value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"{f.name} must be a number, got {type(value).__name__}")
                if not math.isfinite(value):
                    raise ValueError(f"{f.name} must be a finite number, got {value}")
        if self.beta <= 0:
            raise ValueError(f"beta must be a finite number > 0, got {self.beta}")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"rho must lie in (0, 1], got {self.rho}")
        if self.mu is not None and not 0.0 <= self.mu < 1.0:
            raise ValueError(f"mu must lie in [0, 1), got {self.mu}")
        spec = self.spec
        if not spec.constant_margin and self.gamma not in (None, 0, 0.0):
            hint = "NAPO's base margin is gamma0" if spec.dynamic_margin else "DynamicPO has no margin"
            raise ValueError(f"gamma (an additive margin) does not apply to method={self.method!r}: {hint}")
        if not spec.dynamic_margin:
            given = [name for name in MARGIN_DEFAULTS if getattr(self, name) is not None]
            if given:
                names = ", ".join(given)
                raise ValueError(f"{names} configure NAPO's dynamic margin; method={self.method!r} has none")
        if spec.single_negative and self.sharing not in (None, "own"):
            raise ValueError(
                "method='dpo' compares each positive with exactly one own negative (K = 1, sharing='own'); "
                "use 's_dpo' or 'napo' for several or shared negatives"
            )

    @classmethod
    def build(cls, config: LossConfig | None, hyper: dict[str, Any]) -> LossConfig:
        """``config`` as given, or one built from keyword hyper-parameters (never both)."""
        if config is not None:
            if not isinstance(config, LossConfig):
                raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
            if hyper:
                raise ValueError(f"give either config= or hyper-parameters ({', '.join(hyper)}), not both")
            return config
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(hyper) - names)
        if unknown:
            raise TypeError(f"unknown loss option(s) {unknown}; the hyper-parameters are {sorted(names)}")
        return cls(**hyper)

    @property
    def spec(self) -> MethodSpec:
        return METHOD_TABLE[self.method]

    def explicit_margin_options(self) -> list[str]:
        """NAPO margin options given explicitly (which a ``margin_state`` would contradict)."""
        return [name for name in MARGIN_DEFAULTS if getattr(self, name) is not None]

    def resolved_sharing(self, has_user_embeddings: bool) -> str:
        if self.sharing is not None:
            return self.sharing
        if self.spec.shares_by_default:
            return "similarity" if has_user_embeddings else "all"
        return "own"

    def additive_margin(self) -> float:
        return 0.0 if self.gamma is None else float(self.gamma)

    def margin_option(self, name: str) -> Any:
        value = getattr(self, name)
        return MARGIN_DEFAULTS[name] if value is None else value

    def new_margin(self) -> DynamicMargin | None:
        """A fresh EMA margin for NAPO (``None`` for the other methods)."""
        if not self.spec.dynamic_margin:
            return None
        opt = self.margin_option
        return DynamicMargin(opt("gamma0"), opt("alpha"), opt("mu"), opt("margin_mode"))
