"""MaskedDense: keras.layers.Dense with a pruning mask on its kernel."""

import keras
from keras import ops

from dkdp_keras.layers.base import MaskedKernelMixin


@keras.saving.register_keras_serializable(package="dkdp_keras")
class MaskedDense(MaskedKernelMixin, keras.layers.Dense):
    """A `keras.layers.Dense` whose kernel is multiplied by a pruning mask.

    Behaves exactly like `Dense` (same arguments, same weights) with three
    additions: a non-trainable `kernel_mask` of the kernel's shape (1 = kept,
    0 = pruned), optional trainable per-neuron gates, and optional running
    statistics for importance criteria.

    Args:
        units, activation, use_bias, ...: as `keras.layers.Dense`.
        learnable_mask: if True, each neuron's pre-activation is multiplied by
            a trainable gate (initialised to 1) whose magnitude the
            `LearnedMask` criterion reads.
        gate_l1: L1 penalty on the gates (added to the model's losses), which
            drives unimportant neurons' gates towards zero. Needs
            `learnable_mask=True`.
        track_statistics: keep running means of activations and gradients
            for the activation- and gradient-based criteria.

    Example:

    >>> layer = MaskedDense(3)
    >>> y = layer(keras.ops.ones((2, 4)))
    >>> layer.kernel_mask.assign(keras.ops.zeros((4, 3)))
    >>> float(keras.ops.max(keras.ops.abs(layer(keras.ops.ones((2, 4))))))
    0.0
    """

    base_class = keras.layers.Dense

    def _kernel_op(self, inputs, kernel):
        return ops.matmul(inputs, kernel)
