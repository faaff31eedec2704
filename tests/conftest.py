"""Shared pytest set-up. Triton kernels run under the interpreter on CPU when no GPU exists; the
variable must be set before triton is first imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402
from strategies import backend_params  # noqa: E402

# Reproducible in CI: the same examples on every run (HYPOTHESIS_PROFILE=dev explores new ones).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", params=backend_params())
def backend(request) -> str:
    """Every kernel backend; one that cannot run CPU tensors here shows up as a skip with its reason,
    or fails when it is required (``NAPO_REQUIRE_BACKENDS``, default ``torch``, plus ``cpp`` under CI)."""
    name, problem = request.param
    if problem:
        pytest.fail(f"{problem} (required by NAPO_REQUIRE_BACKENDS / CI)")
    return name
