"""Models: the part A CNN builder and the part B backbone head swap."""

from .cnn import (
    ACTIVATION_NAMES,
    GLOBAL_POOLS,
    ConvActPool,
    SmallCNN,
    build_cnn,
    canonical_activation,
    filter_counts,
    make_activation,
    min_image_size,
)
from .errors import ModelConfigError
from .summary import ModelSummary, summarize
from .whiten import WHITEN_MODES, first_conv, whiten_first_conv_

__all__ = [
    "ACTIVATION_NAMES",
    "GLOBAL_POOLS",
    "ConvActPool",
    "SmallCNN",
    "build_cnn",
    "canonical_activation",
    "filter_counts",
    "make_activation",
    "min_image_size",
    "ModelConfigError",
    "ModelSummary",
    "summarize",
    "WHITEN_MODES",
    "first_conv",
    "whiten_first_conv_",
]
