"""Masked layers: Keras layers whose kernels carry a pruning mask."""

from dkdp_keras.layers.base import MaskedKernelMixin
from dkdp_keras.layers.batch_normalization import MaskedBatchNormalization
from dkdp_keras.layers.conv import MaskedConv1D, MaskedConv2D, MaskedConv3D
from dkdp_keras.layers.dense import MaskedDense
from dkdp_keras.layers.depthwise_conv import (
    MaskedDepthwiseConv1D,
    MaskedDepthwiseConv2D,
)

#: Keras layer class -> its masked twin, as used by `prunable`.
MASKED_TWINS = {
    cls.base_class: cls
    for cls in (
        MaskedDense,
        MaskedConv1D,
        MaskedConv2D,
        MaskedConv3D,
        MaskedDepthwiseConv1D,
        MaskedDepthwiseConv2D,
    )
}

__all__ = [
    "MASKED_TWINS",
    "MaskedBatchNormalization",
    "MaskedKernelMixin",
    "MaskedConv1D",
    "MaskedConv2D",
    "MaskedConv3D",
    "MaskedDense",
    "MaskedDepthwiseConv1D",
    "MaskedDepthwiseConv2D",
]
