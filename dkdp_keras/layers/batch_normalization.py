"""MaskedBatchNormalization: BatchNormalization whose channels can be removed."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="dkdp_keras")
class MaskedBatchNormalization(keras.layers.BatchNormalization):
    """A `keras.layers.BatchNormalization` whose output is multiplied by a
    non-trainable per-channel `channel_mask` (1 = kept, 0 = removed).

    `prunable` puts it where a BatchNormalization reads a masked layer, and
    the mask follows that layer's units (`sync_batchnorm`): a removed filter
    then gives exact zeros after normalisation too, in training and in
    inference, instead of the trainable constant beta, and gamma and beta of
    removed channels get no gradient. That is what lets `compact` remove the
    channel for real. `strip` folds the mask into gamma and beta.

    Args: as `keras.layers.BatchNormalization`.

    Example:

    >>> bn = MaskedBatchNormalization()
    >>> y = bn(keras.ops.ones((2, 4, 4, 3)))
    >>> tuple(bn.channel_mask.shape)
    (3,)
    """

    base_class = keras.layers.BatchNormalization

    def build(self, input_shape):
        super().build(input_shape)
        channels = int(input_shape[self.axis])
        self.channel_mask = self.add_weight(
            name="channel_mask", shape=(channels,), initializer="ones",
            trainable=False,
        )

    def call(self, inputs, training=None, mask=None):
        if mask is None and self.scale and self.center and not (
                getattr(self, "renorm", False) or getattr(self, "synchronized", False)):
            return self._folded_call(inputs, training)
        outputs = super().call(inputs, training=training, mask=mask)
        shape = [1] * len(outputs.shape)
        shape[self.axis] = int(self.channel_mask.shape[0])
        return ops.multiply(
            outputs, ops.cast(ops.reshape(self.channel_mask, shape), outputs.dtype)
        )

    def _folded_call(self, inputs, training):
        """The same outputs, gradients and moving statistics as multiplying
        the normalised output by the 0/1 mask, with the mask folded into
        gamma and beta instead: a multiply over C values, not over every
        activation (on reference_cnn, 4.8 M a step, forward and backward).
        Keras' own path (moments, moving averages, then
        `ops.batch_normalization`) with the masked scale and offset; masks
        over time steps, renorm and synchronized moments take the general
        path above."""
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        m = ops.cast(self.channel_mask, x.dtype)
        if training and self.trainable:
            axis = self.axis % len(x.shape)
            mean, variance = ops.moments(
                x, axes=[i for i in range(len(x.shape)) if i != axis])
            moving_mean = ops.cast(self.moving_mean, x.dtype)
            moving_variance = ops.cast(self.moving_variance, x.dtype)
            self.moving_mean.assign(
                moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(
                moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            mean = ops.cast(self.moving_mean, x.dtype)
            variance = ops.cast(self.moving_variance, x.dtype)
        outputs = ops.batch_normalization(
            x, mean, variance, axis=self.axis,
            offset=ops.cast(self.beta, x.dtype) * m,
            scale=ops.cast(self.gamma, x.dtype) * m, epsilon=self.epsilon)
        return ops.cast(outputs, self.compute_dtype)

    def stripped_weights(self, channel_mask=None, read=ops.convert_to_numpy):
        """[gamma, beta, moving_mean, moving_variance] of the plain layer,
        with the channel mask (or `channel_mask`, instead of the layer's
        own) folded into gamma and beta; `read`: variable -> numpy."""
        m = read(self.channel_mask) if channel_mask is None else channel_mask
        weights = []
        if self.scale:
            weights.append(read(self.gamma) * m)
        if self.center:
            weights.append(read(self.beta) * m)
        weights.append(read(self.moving_mean))
        weights.append(read(self.moving_variance))
        return weights

    def base_config(self):
        return self.get_config()
