"""MaskedConv1D/2D/3D: convolutions with a pruning mask on their kernel."""

import keras

from dkdp_keras.layers.base import MaskedKernelMixin

_DOC = """A `keras.layers.{name}` whose kernel is multiplied by a pruning mask.

    Behaves exactly like `{name}` (same arguments, same weights) with a
    non-trainable `kernel_mask` of the kernel's shape (1 = kept, 0 = pruned);
    a filter whose whole kernel slice is masked is removed (its bias too).

    Args:
        filters, kernel_size, ...: as `keras.layers.{name}`.
        learnable_mask: if True, each filter's output is multiplied by a
            trainable gate (initialised to 1), read by `LearnedMask`.
        gate_l1: L1 penalty on the gates; needs `learnable_mask=True`.
        track_statistics: keep running means of activations and gradients
            for the activation- and gradient-based criteria.

    Example:

    >>> layer = {masked}(4, 3, padding="same")
    >>> y = layer(keras.ops.ones((1, {example_shape})))
    >>> tuple(layer.kernel_mask.shape) == tuple(layer.kernel.shape)
    True
    """


class _MaskedConv(MaskedKernelMixin):
    def _kernel_op(self, inputs, kernel):
        return self.convolution_op(inputs, kernel)


@keras.saving.register_keras_serializable(package="dkdp_keras")
class MaskedConv1D(_MaskedConv, keras.layers.Conv1D):
    __doc__ = _DOC.format(name="Conv1D", masked="MaskedConv1D", example_shape="8, 2")
    base_class = keras.layers.Conv1D


@keras.saving.register_keras_serializable(package="dkdp_keras")
class MaskedConv2D(_MaskedConv, keras.layers.Conv2D):
    __doc__ = _DOC.format(
        name="Conv2D", masked="MaskedConv2D", example_shape="8, 8, 2"
    )
    base_class = keras.layers.Conv2D


@keras.saving.register_keras_serializable(package="dkdp_keras")
class MaskedConv3D(_MaskedConv, keras.layers.Conv3D):
    __doc__ = _DOC.format(
        name="Conv3D", masked="MaskedConv3D", example_shape="4, 4, 4, 2"
    )
    base_class = keras.layers.Conv3D
