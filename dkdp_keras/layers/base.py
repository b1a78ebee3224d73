"""What every masked layer shares: the kernel mask, the optional learnable
unit gates and the running statistics that importance criteria read.

A masked layer computes exactly what its Keras layer computes, with
``kernel * kernel_mask`` in place of ``kernel``. A unit (a Dense neuron, a
convolution filter or depthwise channel) whose kernel column is entirely
masked is *removed*: its bias is masked too, so its pre-activation is exactly
zero, which is what structural compaction relies on.

Statistics (``track_statistics=True``) are running means over training steps,
kept in non-trainable variables so that they survive checkpoints:

- ``activation_nonzero``: per unit, the mean fraction of non-zero outputs
  after the layer's activation (for a linear activation, the fraction of
  positive outputs, i.e. what a following ReLU would let through);
- ``activation_abs``: per unit, the mean absolute output;
- ``gradient_abs``: per kernel entry, the mean of ``|g|``;
- ``taylor``: per kernel entry, the mean of ``|w * g|``;
- ``taylor_unit``: per unit, the mean of ``(sum over the unit of w * g)^2``.

Activation statistics are updated in ``call`` whenever ``training=True``
(from the first 32 examples of the batch, an unbiased sample);
gradient statistics by ``update_gradient_statistics(kernel_gradient)``, which
the DKDP training step calls with the gradient it has already computed.
``gradient_statistics`` (a tuple of the three names above, None for all)
limits that to the ones a criterion will read: the entry-wise means cost
several passes over the kernel at every step, ``taylor_unit`` alone one.
"""

import keras
import numpy as np
from keras import ops

MASK_ARGS = ("learnable_mask", "gate_l1", "track_statistics")
#: Examples of each batch from which activation statistics are taken.
ACTIVATION_SAMPLE = 32

STATISTICS = (
    "activation_nonzero",
    "activation_abs",
    "activation_steps",
    "gradient_abs",
    "taylor",
    "taylor_unit",
    "gradient_steps",
)
#: The running means `update_gradient_statistics` can keep.
GRADIENT_STATISTICS = ("gradient_abs", "taylor", "taylor_unit")


class MaskedKernelMixin:
    """Shared behaviour of masked layers; combine with a Keras layer class.

    Subclasses set ``base_class`` (the Keras layer they mask) and implement
    ``_kernel_op(inputs, kernel)``, the layer's linear operation.
    """

    base_class = None
    #: While a criterion that reads the layer's inputs (`Wanda`) runs the
    #: model eagerly, a callable that each call passes its input's mean
    #: square per input feature and the number of values it averaged (a
    #: callable, not a list, so that Keras does not track it as state).
    input_probe = None

    def __init__(
        self,
        *args,
        learnable_mask=False,
        gate_l1=0.0,
        track_statistics=False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if not isinstance(learnable_mask, bool):
            raise TypeError(
                f"learnable_mask must be True or False, got {learnable_mask!r}."
            )
        if isinstance(gate_l1, bool) or not isinstance(gate_l1, (int, float)):
            raise TypeError(f"gate_l1 must be a number >= 0, got {gate_l1!r}.")
        if not gate_l1 >= 0 or gate_l1 == float("inf"):
            raise ValueError(
                f"gate_l1 must be a finite number >= 0, got {gate_l1!r}."
            )
        if gate_l1 > 0 and not learnable_mask:
            raise ValueError(
                f"gate_l1={gate_l1!r} penalises the learnable unit gates, "
                "which exist only with learnable_mask=True: set "
                "learnable_mask=True or leave gate_l1 at 0."
            )
        if not isinstance(track_statistics, bool):
            raise TypeError(
                "track_statistics must be True or False, got "
                f"{track_statistics!r}."
            )
        self.learnable_mask = learnable_mask
        self.gate_l1 = float(gate_l1)
        self.track_statistics = track_statistics
        # Runtime switch (not config): DKDPModel turns activation statistics
        # off when no criterion reads them, before the training step traces.
        self.collect_activations = track_statistics
        self.gradient_statistics = None

    # ------------------------------------------------------------------ build
    def build(self, input_shape):
        super().build(input_shape)
        kernel_shape = tuple(self.kernel.shape)
        self.kernel_mask = self.add_weight(
            name="kernel_mask",
            shape=kernel_shape,
            initializer="ones",
            trainable=False,
        )
        units = self.num_units
        self.gate = None
        if self.learnable_mask:
            self.gate = self.add_weight(
                name="gate",
                shape=(units,),
                initializer="ones",
                regularizer=(
                    keras.regularizers.L1(self.gate_l1) if self.gate_l1 else None
                ),
                trainable=True,
            )
        if self.track_statistics:
            def stat(name, shape):
                # Updated inside the training step, on every replica of a
                # distribution strategy: "mean" combines the replicas' values.
                return self.add_weight(
                    name=name, shape=shape, initializer="zeros",
                    trainable=False, aggregation="mean",
                )

            self.activation_nonzero = stat("activation_nonzero", (units,))
            self.activation_abs = stat("activation_abs", (units,))
            self.activation_steps = stat("activation_steps", ())
            self.gradient_abs = stat("gradient_abs", kernel_shape)
            self.taylor = stat("taylor", kernel_shape)
            self.taylor_unit = stat("taylor_unit", (units,))
            self.gradient_steps = stat("gradient_steps", ())

    # ------------------------------------------------------------ structure
    @property
    def num_units(self):
        """Number of output units (neurons, filters or output channels)."""
        return int(self.kernel.shape[-1])

    def as_units(self, x):
        """Reshape a kernel-shaped tensor to ``(fan_in, num_units)``."""
        return ops.reshape(x, (-1, self.num_units))

    def from_units(self, unit_values):
        """Broadcast a ``(num_units,)`` tensor to the kernel's shape."""
        fan_in = 1
        for dim in self.kernel.shape:
            fan_in *= int(dim)
        fan_in //= self.num_units
        tiled = ops.broadcast_to(
            ops.reshape(unit_values, (1, self.num_units)), (fan_in, self.num_units)
        )
        return ops.reshape(tiled, tuple(self.kernel.shape))

    def unit_mask(self):
        """1.0 for each unit with at least one kept kernel entry, else 0.0."""
        return ops.max(self.as_units(self.kernel_mask), axis=0)

    def effective_kernel(self):
        """``kernel * kernel_mask``: the kernel the forward pass uses."""
        return ops.multiply(self.kernel, self.kernel_mask)

    # ---------------------------------------------------------------- call
    def _channel_shape(self, rank):
        """Shape that broadcasts a per-unit vector against the output."""
        data_format = getattr(self, "data_format", "channels_last")
        if data_format == "channels_first":
            return (1, self.num_units) + (1,) * (rank - 2)
        return (1,) * (rank - 1) + (self.num_units,)

    def call(self, inputs, training=None):
        if self.input_probe is not None:
            self.input_probe(self._input_mean_square(inputs))
        outputs = self._kernel_op(inputs, self.effective_kernel())
        shape = self._channel_shape(len(outputs.shape))
        if self.bias is not None:
            bias = ops.multiply(self.bias, self.unit_mask())
            outputs = ops.add(outputs, ops.reshape(bias, shape))
        if self.gate is not None:
            outputs = ops.multiply(outputs, ops.reshape(self.gate, shape))
        if self.activation is not None:
            outputs = self.activation(outputs)
        if self.track_statistics and self.collect_activations and training:
            self._update_activation_statistics(outputs)
        return outputs

    # ----------------------------------------------------------- statistics
    def _non_channel_axes(self, rank):
        """The axes of a rank-`rank` input or output other than its
        channels (features) axis."""
        data_format = getattr(self, "data_format", "channels_last")
        channel_axis = 1 if data_format == "channels_first" else rank - 1
        return tuple(a for a in range(rank) if a != channel_axis)

    def _input_mean_square(self, inputs):
        """The mean of x² per input feature (a Dense row, a convolution's
        input channel) over every other axis, and how many values each mean
        is over."""
        inputs = ops.cast(inputs, "float32")
        axes = self._non_channel_axes(len(inputs.shape))
        count = int(np.prod([int(ops.shape(inputs)[a]) for a in axes]))
        return ops.convert_to_numpy(ops.mean(ops.square(inputs), axis=axes)), count

    def _update_activation_statistics(self, outputs):
        # The first ACTIVATION_SAMPLE examples of the batch estimate the
        # batch's statistics without bias, at a fraction of the memory
        # traffic of the whole batch's activations.
        outputs = outputs[:ACTIVATION_SAMPLE]
        axes = self._non_channel_axes(len(outputs.shape))
        outputs = ops.cast(outputs, "float32")
        if self.activation in (None, keras.activations.linear):
            alive = ops.cast(ops.greater(outputs, 0.0), "float32")
        else:
            alive = ops.cast(ops.not_equal(outputs, 0.0), "float32")
        # A batch with NaN/Inf outputs leaves the statistics as they were
        # (the training step then applies no update either).
        ok = ops.all(ops.isfinite(outputs))
        n = self.activation_steps + 1.0
        nonzero = self.activation_nonzero + (
            ops.mean(alive, axis=axes) - self.activation_nonzero) / n
        mean_abs = self.activation_abs + (
            ops.mean(ops.abs(outputs), axis=axes) - self.activation_abs) / n
        self.activation_nonzero.assign(
            ops.where(ok, nonzero, self.activation_nonzero))
        self.activation_abs.assign(ops.where(ok, mean_abs, self.activation_abs))
        self.activation_steps.assign(ops.where(ok, n, self.activation_steps))

    def update_gradient_statistics(self, kernel_gradient):
        """Fold one step's gradient of the loss w.r.t. ``kernel`` into the
        running means read by gradient-based criteria.

        Args:
            kernel_gradient: a tensor of the kernel's shape, as computed by the
                training step (it is already zero at pruned entries).
        """
        if not self.track_statistics:
            raise ValueError(
                f"Layer '{self.name}' does not track statistics: build it with "
                "track_statistics=True (prunable(model, track_statistics=True))."
            )
        g = ops.cast(kernel_gradient, "float32")
        wanted = self.gradient_statistics
        wanted = GRADIENT_STATISTICS if wanted is None else wanted
        n = self.gradient_steps + 1.0
        if "gradient_abs" in wanted:
            self.gradient_abs.assign(
                self.gradient_abs + (ops.abs(g) - self.gradient_abs) / n
            )
        if "taylor" in wanted or "taylor_unit" in wanted:
            wg = ops.multiply(ops.cast(self.effective_kernel(), "float32"), g)
        if "taylor" in wanted:
            self.taylor.assign(self.taylor + (ops.abs(wg) - self.taylor) / n)
        if "taylor_unit" in wanted:
            unit_taylor = ops.square(ops.sum(self.as_units(wg), axis=0))
            self.taylor_unit.assign(
                self.taylor_unit + (unit_taylor - self.taylor_unit) / n
            )
        self.gradient_steps.assign(n)

    def reset_statistics(self):
        """Restart all running means (called after masks change)."""
        if not self.track_statistics:
            return
        for name in STATISTICS:
            var = getattr(self, name)
            var.assign(ops.zeros(var.shape, dtype=var.dtype))

    # --------------------------------------------------------------- saving
    def _saved_variables(self):
        names = ["kernel", "bias", "kernel_mask", "gate"]
        if self.track_statistics:
            names += list(STATISTICS)
        found = (getattr(self, name, None) for name in names)
        return [var for var in found if var is not None]

    def save_own_variables(self, store):
        # Keras' Dense and Conv save only their own kernel and bias; masks,
        # gates and statistics must travel in `.keras` files too.
        if not self.built:
            return
        for i, var in enumerate(self._saved_variables()):
            store[str(i)] = var

    def load_own_variables(self, store):
        if not self.built:
            return
        variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer '{self.name}' expects {len(variables)} saved variables "
                f"({', '.join(v.name for v in variables)}), the file has "
                f"{len(store.keys())}: was it saved with other learnable_mask "
                "or track_statistics settings?"
            )
        for i, var in enumerate(variables):
            var.assign(store[str(i)])

    # ------------------------------------------------------------- stripping
    def stripped_weights(self, mask=None, read=ops.convert_to_numpy):
        """Weights of the equivalent plain layer: mask and gate baked in.

        Args:
            mask: a kernel mask to bake in instead of the layer's own (to
                count what other masks would leave, without assigning them).
            read: variable -> numpy (`counting.Snapshot.read` reads each
                variable once for many counts).

        Returns:
            A list ``[kernel]`` or ``[kernel, bias]`` of numpy arrays, in the
            order ``base_class.set_weights`` expects.
        """
        # In numpy, as `as_units`/`from_units` lay units out: budget checks
        # call this many times per pruning event.
        n = self.num_units
        if mask is None:
            mask = read(self.kernel_mask)
        mask = np.asarray(mask).reshape(-1, n)
        kernel = read(self.kernel).reshape(-1, n) * mask
        scale = None if self.gate is None else read(self.gate)
        if scale is not None:
            kernel = kernel * scale
        weights = [kernel.reshape(tuple(self.kernel.shape))]
        if self.bias is not None:
            bias = read(self.bias) * mask.max(axis=0)
            if scale is not None:
                bias = bias * scale
            weights.append(bias)
        return weights

    def base_config(self):
        """The config of the equivalent plain Keras layer."""
        config = self.get_config()
        for key in MASK_ARGS:
            config.pop(key, None)
        return config

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "learnable_mask": self.learnable_mask,
                "gate_l1": self.gate_l1,
                "track_statistics": self.track_statistics,
            }
        )
        return config
