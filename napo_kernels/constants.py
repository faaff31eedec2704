"""Constants shared by every layer (the reference oracle, the kernels, the loss API)."""

from __future__ import annotations

# Label value whose position is not scored (the Hugging Face / PyTorch cross-entropy convention).
IGNORE_INDEX = -100

# DynamicPO's exact 1-D 3-means: partitions whose costs lie within this (relative) distance of the
# least cost count as tied; the first in enumeration order wins, so exact ties on a grid of values
# resolve the same everywhere.
THREE_MEANS_RTOL = 1e-9
