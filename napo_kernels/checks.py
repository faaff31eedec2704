"""Input validation: bad input gets a clear error naming the argument (and sequence), never a
silently wrong number. Cheap checks always run; scanning every value for NaN/inf runs only with
``check_finite=True`` (one extra read of each input, and a host sync)."""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require_tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        hint = (
            " (convert it with torch.as_tensor)"
            if isinstance(x, (list, tuple)) or hasattr(x, "__array__")
            else ""
        )
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}{hint}")
    return x


def require_float(name: str, x: Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")


def require_int(name: str, x: Tensor) -> None:
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")


def require_same(name: str, x: Tensor, ref_name: str, ref: Tensor, dtype: bool = True) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; cast one of them")


def require_shape(name: str, x: Tensor, shape: tuple[int, ...], what: str = "") -> None:
    if tuple(x.shape) != tuple(shape):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {list(shape)}{hint}, got {list(x.shape)}")


def require_finite(name: str, x: Tensor | None) -> None:
    if x is None or x.numel() == 0:
        return
    # One reduction pass without a temporary: min/max propagate NaN and expose +-inf.
    lo, hi = torch.aminmax(x.detach().reshape(-1))
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    where = torch.nonzero(~torch.isfinite(x.detach()))[0].tolist()
    raise ValueError(f"{name} has a non-finite value ({x[tuple(where)].item()}) at index {where}")


def require_positive(name: str, value: float) -> None:
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def require_chunk_size(chunk_size: int | None) -> None:
    # a non-positive chunk would make the kernels' row loops empty and return uninitialised memory
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")


def require_rho(rho: float) -> None:
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must lie in (0, 1], got {rho}")


def require_mask(name: str, x: Tensor) -> None:
    """A validity mask: bool, or an integer tensor of 0/1 (a float 0.5 is not silently True)."""
    if x.dtype == torch.bool:
        return
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(f"{name} must be a bool tensor (True where the entry exists), got {x.dtype}")
    bad = (x != 0) & (x != 1)
    if bool(bad.any()):
        where = torch.nonzero(bad)[0].tolist()
        raise ValueError(
            f"{name} must hold only 0/1 (or be bool), got {int(x[tuple(where)])} at index {where}"
        )
