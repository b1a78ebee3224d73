"""MaskedDepthwiseConv1D/2D: depthwise convolutions with a kernel mask."""

import keras
from keras import ops

from dkdp_keras.layers.base import MaskedKernelMixin


class _MaskedDepthwise(MaskedKernelMixin):
    """Units are the output channels: input channel ``c`` with depth
    multiplier ``m`` is unit ``c * depth_multiplier + m``, which is the order
    in which the kernel ``(..., in_channels, depth_multiplier)`` flattens."""

    @property
    def num_units(self):
        return int(self.kernel.shape[-2]) * int(self.kernel.shape[-1])

    def _kernel_op(self, inputs, kernel):
        return ops.depthwise_conv(
            inputs,
            kernel,
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )


@keras.saving.register_keras_serializable(package="dkdp_keras")
class MaskedDepthwiseConv2D(_MaskedDepthwise, keras.layers.DepthwiseConv2D):
    """A `keras.layers.DepthwiseConv2D` whose kernel is multiplied by a mask.

    Units are output channels (``in_channels * depth_multiplier`` of them).

    Args:
        kernel_size, depth_multiplier, ...: as `keras.layers.DepthwiseConv2D`.
        learnable_mask: trainable per-output-channel gates, read by
            `LearnedMask`.
        gate_l1: L1 penalty on the gates; needs `learnable_mask=True`.
        track_statistics: keep running means of activations and gradients.

    Example:

    >>> layer = MaskedDepthwiseConv2D(3, padding="same")
    >>> y = layer(keras.ops.ones((1, 8, 8, 2)))
    >>> layer.num_units
    2
    """

    base_class = keras.layers.DepthwiseConv2D


@keras.saving.register_keras_serializable(package="dkdp_keras")
class MaskedDepthwiseConv1D(_MaskedDepthwise, keras.layers.DepthwiseConv1D):
    """A `keras.layers.DepthwiseConv1D` whose kernel is multiplied by a mask.

    Args: as `MaskedDepthwiseConv2D`.

    Example:

    >>> layer = MaskedDepthwiseConv1D(3, padding="same")
    >>> y = layer(keras.ops.ones((1, 8, 2)))
    >>> layer.num_units
    2
    """

    base_class = keras.layers.DepthwiseConv1D
