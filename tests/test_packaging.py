"""Packaging: the project metadata and the build script's choices (no compiler runs here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_string_with_a_setuptools_that_reads_it():
    meta = _pyproject()
    assert meta["project"]["license"] == "Apache-2.0"  # a table is deprecated: warnings at every build
    setuptools = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert len(setuptools) == 1
    minimum = re.fullmatch(r"setuptools>=(\d+).*", setuptools[0])
    assert minimum and int(minimum.group(1)) >= 77  # the first release with PEP 639 license strings
