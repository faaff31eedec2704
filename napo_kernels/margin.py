"""NAPO's dynamic reward margin: an EMA of the batch's negative confidence, kept as module state."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

MARGIN_MODES = ("batch", "per_negative", "none")
# NAPO's margin defaults (released code): the only place they are written.
MARGIN_DEFAULTS = {"gamma0": 1.0, "alpha": 0.3, "mu": 0.9, "margin_mode": "batch"}


class DynamicMargin(nn.Module):
    """Holds ``Mbar`` (the EMA of the mean negative confidence) as a buffer, so it is saved in
    ``state_dict`` and restored with a checkpoint.

    Per step: ``M_t`` = mean confidence over every pair ``(i, n in P_i)``;
    ``Mbar_t = mu Mbar_{t-1} + (1 - mu) M_t`` (updated before use, ``Mbar_0 = 0``);
    ``mode="batch"``: ``gamma_t = gamma0 (1 - alpha (M_t - Mbar_t))`` for every pair;
    ``mode="per_negative"``: ``gamma_{i,n} = gamma0 (1 - alpha (c_n - Mbar_t))``;
    ``mode="none"``: the constant ``gamma0``.

    ``reduce_mean`` (optional) averages ``(sum, count)`` across data-parallel ranks so that every
    rank's EMA sees the global batch.
    """

    ema: Tensor
    steps: Tensor

    def __init__(
        self,
        gamma0: float = MARGIN_DEFAULTS["gamma0"],
        alpha: float = MARGIN_DEFAULTS["alpha"],
        mu: float = MARGIN_DEFAULTS["mu"],
        mode: str = MARGIN_DEFAULTS["margin_mode"],
        reduce_mean: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if mode not in MARGIN_MODES:
            raise ValueError(f"margin mode must be one of {MARGIN_MODES}, got {mode!r}")
        for name, value in (("gamma0", gamma0), ("alpha", alpha), ("mu", mu)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"mu must lie in [0, 1), got {mu}")
        self.gamma0, self.alpha, self.mu, self.mode = float(gamma0), float(alpha), float(mu), mode
        self.reduce_mean = reduce_mean
        self.register_buffer("ema", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"gamma0={self.gamma0}, alpha={self.alpha}, mu={self.mu}, mode={self.mode!r}"

    @torch.no_grad()
    def forward(self, confidence: Tensor, pool: Tensor, update: bool = True) -> tuple[Tensor, Tensor]:
        """``confidence [M]`` (one per negative) and ``pool [B, M]`` to ``(margin [B, M], M_t)``,
        both float64 and detached. ``update=False`` reads the margin without moving the EMA."""
        c = confidence.detach().to(torch.float64).reshape(1, -1)
        pairs = pool.to(torch.float64)
        total = torch.stack([(c * pairs).sum(), pairs.sum()])
        if self.reduce_mean is not None:
            total = self.reduce_mean(total)
        m_t = total[0] / total[1]
        ema = self.mu * self.ema.to(pool.device) + (1.0 - self.mu) * m_t
        if update and self.training:
            # item assignment, not copy_: torch.compile (2.13, aot_eager/inductor) drops a copy_ into a
            # 0-dim float64 buffer, so the EMA silently stayed at 0 in compiled training loops
            self.ema[()] = ema
            self.steps.add_(1)
        if self.mode == "batch":
            margin = (self.gamma0 * (1.0 - self.alpha * (m_t - ema))).expand(pool.shape)
        elif self.mode == "per_negative":
            margin = (self.gamma0 * (1.0 - self.alpha * (c - ema))).expand(pool.shape)
        else:
            margin = torch.full(pool.shape, self.gamma0, dtype=torch.float64, device=pool.device)
        return margin, m_t
